"""jaxgpt models in EleutherAI's lm-evaluation-harness (`pip install lm_eval`): any of its
tasks on a run directory (GPT-2 or with the newer components) or an HF GPT-2, unconverted.

    python -m jaxgpt.harness --model jaxgpt --model_args run=runs/default --tasks arc_easy,piqa
    # the rest is lm_eval's own command line (--batch_size, --limit, --output_path, ...)

`Adapter` answers the harness's three kinds of request with jaxgpt's own scorer and sampler:
log-likelihoods of continuations (the context/continuation split of `tasks.encode_pair`),
rolling log-likelihoods of whole texts (the harness's disjoint windows of n_positions
tokens), and generation until a stop string (greedy unless the task asks to sample).
`register()` makes it the harness's `jaxgpt` model.
"""

import sys
from collections.abc import Sequence

from jaxgpt import eval as evaluation
from jaxgpt import sample, tasks


def rolling_windows(ids: Sequence[int], prefix: int, max_len: int) -> list[tuple[list, list]]:
    """(context, targets) pairs scoring every id once, as the harness windows a text: the
    first predicts ids[:max_len] after `prefix`; each later one the next max_len ids (fewer
    at the end) after as many preceding ids as fill max_len inputs."""
    ids = list(ids)
    if not ids:
        return []
    done = min(max_len, len(ids))
    out = [([prefix], ids[:done])]
    while done < len(ids):
        end = done + min(len(ids) - done, max_len)
        out.append((ids[max(end - max_len - 1, 0):done], ids[done:end]))
        done = end
    return out


class Adapter:
    """The harness's LM interface over one `eval.LM` (requests carry `.args`)."""

    def __init__(self, lm: evaluation.LM, batch_size: int = 16, max_gen_toks: int = 256):
        self.lm, self.batch_size, self.max_gen_toks = lm, batch_size, max_gen_toks

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives it) per request."""
        examples = [tasks.Example(context, (continuation,), 0, f"request {i}")
                    for i, (context, continuation) in enumerate(r.args for r in requests)]
        return [s[0] for s in tasks.score(self.lm, examples, batch_size=self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text | end-of-text) per request, window by window (`rolling_windows`)."""
        rows, owners = [], []
        for i, r in enumerate(requests):
            for context, targets in rolling_windows(self.lm.tok.encode(r.args[0]),
                                                    self.lm.tok.eot_id, self.lm.cfg.n_positions):
                rows.append(context + targets)
                owners.append((i, len(targets)))
        totals = [0.0] * len(requests)
        lps = self.lm.logprobs(rows, batch_size=self.batch_size) if rows else []
        for lp, (i, n) in zip(lps, owners):
            totals[i] += float(lp[-n:].sum())
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, cut before the first of its `until` strings."""
        tok, n_positions = self.lm.tok, self.lm.cfg.n_positions
        jobs = {}     # (max new tokens, method) -> [(request index, prompt ids, stops)]
        for i, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), n_positions - 1)
            # As HF generate: greedy unless do_sample, which samples at temperature 1 by default.
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = kwargs.pop("temperature", None)
            temperature = (1.0 if do_sample else 0.0) if temperature is None else float(temperature)
            method = (sample.Sampling(temperature=temperature,
                                      top_k=int(kwargs.pop("top_k", 0) or 0),
                                      top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
                      if do_sample and temperature > 0 else sample.Greedy())
            ids = (tok.encode(context) or [tok.eot_id])[-(n_positions - max_new):]
            jobs.setdefault((max_new, method), []).append((i, ids, until))
        out = [""] * len(requests)
        for (max_new, method), items in jobs.items():
            for lo in range(0, len(items), self.batch_size):
                batch = items[lo:lo + self.batch_size]
                new = sample.generate(self.lm.cfg, self.lm.params, [ids for _, ids, _ in batch],
                                      max_new_tokens=max_new, method=method,
                                      eot_id=tok.eot_id, n_valid_vocab=tok.vocab_size)
                for (i, _, until), ids in zip(batch, new):
                    text = tok.decode(ids)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
        return out


def register():
    """Make `Adapter` the harness's `jaxgpt` model: `--model jaxgpt --model_args
    run=SPEC[,max_gen_toks=N]` (SPEC as eval.load_lm takes it); --batch_size applies."""
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    @register_model("jaxgpt")
    class HarnessLM(Adapter, LM):
        def __init__(self, run: str, batch_size=16, max_gen_toks=256, **_unused):
            LM.__init__(self)
            size = int(batch_size) if str(batch_size).isdigit() else 16    # "auto": 16
            Adapter.__init__(self, evaluation.load_lm(run), size, int(max_gen_toks))

    return HarnessLM


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("jaxgpt.harness runs EleutherAI's lm-evaluation-harness: "
                 "pip install 'jaxgpt[harness]' (lm_eval)")
    register()
    cli_evaluate()


if __name__ == "__main__":
    main()
