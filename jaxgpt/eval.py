"""Evaluation: token-weighted perplexity (per data source, sliding window over long text),
generation metrics (coherence, prompt-continuation PMI, distinct-n, repetition), cloze
factuality, and `python -m jaxgpt.eval --checkpoint=RUN|--hf=gpt2 --data=PATH`.

Perplexity is always exp(total NLL / total scored tokens): sources and batches are combined
by summing NLL and token counts, never by averaging per-batch or per-source perplexities.
"""

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import checkpoint, data, model, sample, sources, tokenizer
from jaxgpt import config as config_schema

log = logging.getLogger(__name__)

# rows of token ids -> for each row of n ids, the n - 1 log-probs log p(row[t] | row[:t]).
LogprobFn = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]


def perplexity(nll_sum: float, tokens: float) -> float:
    """exp of the token-weighted mean NLL (capped at e^50 so a diverged run stays finite)."""
    if tokens <= 0:
        raise ValueError(f"perplexity needs at least one scored token, got {tokens}")
    return math.exp(min(nll_sum / tokens, 50.0))


# ---------------------------------------------------------------------------------------
# Models and their log-probabilities


@dataclasses.dataclass(frozen=True)
class LM:
    """A model under evaluation: config, params, its own tokenizer, and where it came from."""

    name: str                  # the spec it was loaded from: a run directory or hf:NAME|DIR
    cfg: model.GPTConfig
    params: Any
    tok: tokenizer.Tokenizer
    step: int | None = None    # training step of a jaxgpt checkpoint

    def logprobs(self, rows: Sequence[Sequence[int]], batch_size: int = 16,
                 greedy: bool = False) -> list:
        """`target_logprobs` of this model over its tokenizer's ids."""
        return target_logprobs(self.cfg, self.params, rows, batch_size=batch_size,
                               greedy=greedy, n_valid_vocab=self.n_valid_vocab)

    @property
    def n_valid_vocab(self) -> int:
        """The ids scoring ranks over: the tokenizer's (a padded vocabulary's extra rows
        are no token and get no probability)."""
        return min(self.tok.vocab_size, self.cfg.vocab_size)


def split_spec(spec: str) -> tuple[str, int | None]:
    """(run directory, step or None) of a `RUN` or `RUN@STEP` spec. A spec naming an existing
    directory is that directory, whatever it contains (`runs/lr@3e-4`, `runs/exp@10`); only
    otherwise is a trailing `@DIGITS` split off as the step."""
    if not os.path.isdir(spec):
        workdir, at, step = spec.rpartition("@")
        if at and workdir and step.isdigit():
            return workdir, int(step)
    return spec, None


def load_lm(spec: str) -> LM:
    """A run directory (its latest checkpoint; `RUN@STEP` for another one) or `hf:NAME|DIR`
    (an HF GPT-2 through convert.hf, with its GPT-2 BPE tokenizer).

    A spec that is an existing directory is that run, even if its name ends in `@DIGITS`;
    only otherwise is a trailing `@STEP` split off (`split_spec`)."""
    if spec.startswith("hf:"):
        name = spec[3:]
        if not name:
            raise ValueError(f"model {spec!r} names no HF model: write hf:NAME (a hub name "
                             f"such as hf:gpt2) or hf:DIR")
        from jaxgpt.convert import hf  # torch + transformers load only when asked for
        cfg, params = hf.import_gpt2(name)
        return LM(spec, cfg, params, tokenizer.load("gpt2", name))
    workdir, step = split_spec(spec)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"model {spec!r}: no such run directory (HF models are "
                                f"written hf:NAME or hf:DIR)")
    ckpts = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpts):
        raise FileNotFoundError(f"model {spec!r}: no checkpoints/ folder, so it has no saved "
                                f"model yet")
    cfg, params, step, meta = checkpoint.load_params(workdir, step)
    return LM(spec, cfg, params, tokenizer.from_meta(meta), step)


def target_logprobs_step(params, tokens_BT, *, graphdef, greedy=False, n_valid_vocab=None):
    """log p(tokens[:, t] | tokens[:, :t]) [B, T - 1] (and, with `greedy`, whether each
    target is the argmax); jit it, or pass it jitted as `target_logprobs(forward=...)`.

    `n_valid_vocab`: the tokenizer's size; the logits of ids at or above it (a vocabulary
    padded to a multiple of 64, say) are left out of the softmax and the argmax, so scores
    equal those of the unpadded model (None: every id of the model)."""
    logits, _ = nnx.merge(graphdef, params)(tokens_BT[:, :-1])
    logits = logits[..., :n_valid_vocab]                    # None: every id
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)   # float32 log-softmax
    lp = jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]   # [B, T - 1]
    if not greedy:
        return lp
    # Would greedy decoding pick the target? (the first maximum, as argmax breaks ties)
    return lp, jnp.argmax(logits, axis=-1) == tokens_BT[:, 1:]


_target_logprobs = jax.jit(target_logprobs_step,
                           static_argnames=("graphdef", "greedy", "n_valid_vocab"))


def target_logprobs(cfg: model.GPTConfig, params, rows: Sequence[Sequence[int]], *,
                    batch_size: int = 16, greedy: bool = False,
                    forward: Callable[[np.ndarray], Any] | None = None,
                    n_valid_vocab: int | None = None) -> list:
    """log p(row[t] | row[:t]) for t >= 1 of every row of 2..n_positions + 1 ids (the model
    reads all but the last id, as a training window of block_size + 1); with `greedy`,
    (log-probs, whether each target is the model's argmax) per row.

    `n_valid_vocab`: the tokenizer's size (`LM.n_valid_vocab`): probabilities and argmax
    range over ids below it only, and a row's ids must be below it (None: the model's
    vocab_size). A `forward` applies its own (the trainer's logprob_step does).

    Rows are right-padded to a power-of-two bucket; causal attention makes padding after a
    row invisible to its real positions, so the result equals an unpadded forward pass.
    `forward`: int32 tokens [batch_size, T] -> numpy outputs of `target_logprobs_step`
    (a sharded one, say); default: `params` on the default device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_vocab = cfg.vocab_size if n_valid_vocab is None else min(n_valid_vocab, cfg.vocab_size)
    n_valid = None if n_vocab == cfg.vocab_size else n_vocab    # one compiled program for all
    for i, row in enumerate(rows):
        if not 2 <= len(row) <= cfg.n_positions + 1:
            raise ValueError(f"row {i} has {len(row)} tokens; scoring needs 2..n_positions + 1"
                             f" = {cfg.n_positions + 1}")
        lo, hi = min(row), max(row)
        if lo < 0 or hi >= n_vocab:     # JAX would clamp them, not fail
            bad = lo if lo < 0 else hi
            raise ValueError(f"row {i} has token id {bad} outside the model's vocabulary "
                             f"[0, {n_vocab}): a tokenizer of another model?")
    graphdef = sample.graphdef_of(cfg)
    out: list[np.ndarray] = [np.empty(0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))   # similar lengths together
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        n_in = max(len(rows[i]) for i in idx) - 1
        T = min(max(16, 1 << (n_in - 1).bit_length()), cfg.n_positions) + 1
        tokens = np.zeros((batch_size, T), np.int32)
        for j, i in enumerate(idx):
            tokens[j, :len(rows[i])] = rows[i]
        got = (forward(tokens) if forward is not None else jax.device_get(
            _target_logprobs(params, jnp.asarray(tokens), graphdef=graphdef, greedy=greedy,
                             n_valid_vocab=n_valid)))
        for j, i in enumerate(idx):
            n = len(rows[i]) - 1
            out[i] = (got[0][j, :n], got[1][j, :n]) if greedy else got[j, :n]
    return out


# ---------------------------------------------------------------------------------------
# Perplexity of long text: the sliding-window protocol


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) windows over a stream of `n_tokens` ids.

    The model reads ids[begin:end] (at most `context` ids) and predicts ids[begin + 1:end + 1];
    the last `n_scored` predictions count. Windows start every `stride` ids, so each id after
    the first is scored exactly once, and in every window after the first it sees at least
    `context - stride + 1` ids of context. This is the HuggingFace perplexity guide's
    protocol: stride = context gives disjoint chunks; smaller strides give more context per
    token for more compute.
    """
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"a stream of {n_tokens} token(s) has nothing to predict")
    windows, scored_to, begin = [], 0, 0   # ids[1..scored_to] are scored
    while scored_to < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)
        windows.append((begin, end, end - scored_to))
        scored_to = end
        begin += stride
    return windows


def stream_nll(logprob_fn: LogprobFn, ids: Sequence[int], *, context: int,
               stride: int) -> np.ndarray:
    """Per-token NLL [N - 1] of ids[1:], each under the sliding-window protocol."""
    windows = sliding_windows(len(ids), context, stride)
    lps = logprob_fn([ids[b:e + 1] for b, e, _ in windows])
    return -np.concatenate([lp[len(lp) - n:] for lp, (_, _, n) in zip(lps, windows)])


def summarize(totals: Mapping[str, tuple[float, float]], prefix: str = "") -> dict:
    """{source: (nll_sum, tokens)} -> flat `loss`, `ppl`, `tokens` for all sources together
    (token-weighted) and `loss/SOURCE` etc. per source (only when there are named sources)."""
    nll = sum(v[0] for v in totals.values())
    tokens = sum(v[1] for v in totals.values())
    out = {f"{prefix}loss": nll / tokens, f"{prefix}ppl": perplexity(nll, tokens),
           f"{prefix}tokens": tokens}
    if len(totals) > 1 or (totals and next(iter(totals)) != ""):
        for name, (n, t) in totals.items():
            out.update({f"{prefix}loss/{name}": n / t, f"{prefix}ppl/{name}": perplexity(n, t),
                        f"{prefix}tokens/{name}": t})
    return out


def group_by_source(windows: np.ndarray, source_ids: np.ndarray,
                    names: Sequence[str]) -> dict[str, np.ndarray]:
    """Windows [W, T + 1] with per-window source ids [W] -> {source name: its windows}."""
    if len(source_ids) != len(windows):
        raise ValueError(f"{len(source_ids)} source ids for {len(windows)} windows")
    if len(source_ids) and not 0 <= int(source_ids.min()) <= int(source_ids.max()) < len(names):
        raise ValueError(f"source ids span [{source_ids.min()}, {source_ids.max()}] but there "
                         f"are {len(names)} source names")
    return {name: windows[source_ids == i] for i, name in enumerate(names)
            if np.any(source_ids == i)}


def evaluate_windows(step_fn: Callable[[np.ndarray], dict], windows, *, batch: int,
                     max_batches: int = 0) -> dict:
    """Token-weighted validation loss of packed windows, overall and per source.

    Args:
      step_fn: int32 windows [batch, T + 1] -> {"nll_sum": scalar, "tokens": scalar}
        (train.eval_step, jitted and sharded by the caller).
      windows: [W, T + 1] windows of one source, or {source name: windows}.
      max_batches: batches per source (0 = all; a last, partial batch is filled with rows
        of -1, which `step_fn` counts for nothing, so every window is scored).

    Returns `val_loss`, `val_ppl`, `val_tokens` and, for named sources, `val_loss/NAME`...
    """
    by_source = windows if isinstance(windows, Mapping) else {"": windows}
    totals = {}
    for name, w in by_source.items():
        nll, tokens = 0.0, 0.0
        for b in data.iter_val_batches(w, batch, max_batches):
            out = step_fn(b)
            nll += float(out["nll_sum"])
            tokens += float(out["tokens"])
        if tokens:
            totals[name] = (nll, tokens)
        else:
            log.warning("eval: source %r has no validation windows; skipped", name)
    if not totals:
        raise ValueError("no validation windows to evaluate")
    return summarize(totals, prefix="val_")


# ---------------------------------------------------------------------------------------
# Generation metrics (see the README section "Progress report" for the definitions)


def fit(prompt: list[int], cont: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Cut the prompt from the left (keeping >= 1 id), then the continuation from the right,
    until prompt + continuation fits `limit` ids."""
    over = len(prompt) + len(cont) - limit
    if over > 0:
        cut = min(over, len(prompt) - 1)
        prompt, over = prompt[cut:], over - cut
    return prompt, cont[:len(cont) - over] if over > 0 else cont


def fit_keeping_prompt(prompt: list[int], cont: list[int],
                       limit: int) -> tuple[list[int], list[int]]:
    """Fit prompt + continuation into `limit` ids for scoring the continuation against its
    prompt: the prompt keeps at least min(len(prompt), limit // 2) of its last ids, the
    continuation is cut from the right to fit, and a prompt shorter than that room keeps
    more of itself (all of it when it fits)."""
    n_cont = min(len(cont), limit - min(len(prompt), limit // 2))
    n_prompt = min(len(prompt), limit - n_cont)
    return prompt[len(prompt) - n_prompt:], cont[:n_cont]


def continuation_scores(logprob_fn: LogprobFn, tok, prompts: Sequence[str],
                        conts: Sequence[str], limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per continuation: (log p(c_t | prompt, c_<t), log p(c_t | c_<t)) over its first tokens,
    both under the scorer's tokenizer; the unconditional context starts from end-of-text.
    Where prompt + continuation exceed `limit` ids, the prompt keeps its last
    min(len(prompt), limit // 2) ids and the continuation's tail is not scored
    (`fit_keeping_prompt`): fewer entries than the continuation has tokens."""
    rows, spans = [], []
    for p, c in zip(prompts, conts):
        p_ids, c_ids = fit_keeping_prompt(tok.encode(p) or [tok.eot_id], tok.encode(c), limit)
        if c_ids:   # an empty continuation (end-of-text at once) has nothing to score
            rows += [p_ids + c_ids, [tok.eot_id] + c_ids]
        spans.append(len(c_ids))
    lps = iter(logprob_fn(rows) if rows else [])
    out = []
    for n in spans:
        cond, uncond = (next(lps), next(lps)) if n else (np.empty(0), np.empty(0))
        out.append((cond[len(cond) - n:], uncond[:n]))
    return out


def coherence_pmi(scores: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Token-weighted over all continuations: coherence = exp(mean -log p(c | prompt)),
    pmi = mean per-token log p(c | prompt) - log p(c), in nats."""
    n = sum(len(c) for c, _ in scores)
    if not n:
        return {"coherence_ppl": math.nan, "pmi": math.nan, "scored_tokens": 0}
    cond = sum(float(c.sum()) for c, _ in scores)
    uncond = sum(float(u.sum()) for _, u in scores)
    return {"coherence_ppl": perplexity(-cond, n), "pmi": (cond - uncond) / n,
            "scored_tokens": n}


def ngrams(seq: Sequence, n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence], n: int) -> float:
    """Distinct n-grams over all n-grams of all sequences (corpus-level distinct-n)."""
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repeated_ngram_rate(seqs: Sequence[Sequence], n: int = 4) -> float:
    """Fraction of n-grams that already occurred earlier in the same sequence (pooled)."""
    repeats = total = 0
    for s in seqs:
        seen = set()
        for g in ngrams(s, n):
            repeats += g in seen
            seen.add(g)
            total += 1
    return repeats / total if total else math.nan


def cloze_ranks(logprob_fn: LogprobFn, tok, facts: Sequence[Mapping],
                limit: int | None = None, name: str = "the model") -> list[int]:
    """Rank (1 = best) of each fact's answer among its candidates by log p(candidate | prompt)
    summed over the candidate's tokens; a tie counts in the answer's favour.

    `limit`: the most ids a row may have (n_positions + 1 of the model `name`). A prompt too
    long loses its first ids, the same ones for every candidate, so that the longest
    candidate fits whole; a fact whose longest candidate cannot fit after even one prompt id
    is skipped with a warning naming it (its rank is not in the result)."""
    rows, spans, scored = [], [], []
    for i, f in enumerate(facts):
        p_ids = tok.encode(f["prompt"]) or [tok.eot_id]
        c_ids = [tok.encode(cand) for cand in f["candidates"]]
        if limit is not None:
            longest = max(len(c) for c in c_ids)
            if longest + 1 > limit:
                log.warning("cloze fact %d (%r -> %r) skipped for %s: a candidate of %d "
                            "tokens leaves no room for the prompt in %d tokens", i,
                            f["prompt"], f["answer"], name, longest, limit)
                continue
            p_ids = p_ids[max(0, len(p_ids) + longest - limit):]
        scored.append(f)
        for c in c_ids:
            rows.append(p_ids + c)
            spans.append(len(c))
    lps = logprob_fn(rows) if rows else []
    scores = [float(lp[len(lp) - n:].sum()) for lp, n in zip(lps, spans)]
    ranks, k = [], 0
    for f in scored:
        s = scores[k:k + len(f["candidates"])]
        k += len(f["candidates"])
        true = s[f["candidates"].index(f["answer"])]
        ranks.append(1 + sum(x > true for x in s))
    return ranks


# ---------------------------------------------------------------------------------------
# The prompt suite: every model answers every prompt, then the scorer grades the answers

SUITE = "suite_v1.json"   # jaxgpt/prompts/: versioned, never edited once released
CLOZE = "cloze_v1.json"


def load_prompt_file(name: str) -> dict:
    """A prompt suite (`prompts`) or cloze set (`facts`) shipped in jaxgpt/prompts/."""
    import importlib.resources
    path = importlib.resources.files("jaxgpt") / "prompts" / name
    doc = json.loads(path.read_text(encoding="utf-8"))
    for i, f in enumerate(doc.get("facts", [])):
        if f["answer"] not in f["candidates"] or not all(f["candidates"]):
            raise ValueError(f"{name}: fact {i} ({f['prompt']!r}) needs its answer among "
                             f"non-empty candidates")
    return doc


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """Sampler settings shared by every model in a comparison (greedy runs as well)."""

    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 0


def generate_suite(lm: LM, prompts: Sequence[str], settings: GenSettings) -> dict:
    """{"sampled": continuations, "greedy": continuations}, text cut at end-of-text.

    Prompts longer than the model's context keep their last ids; a model whose context
    is short gets fewer new tokens, never an error."""
    new = settings.max_new_tokens
    ids = [(lm.tok.encode(p) or [lm.tok.eot_id])[-(lm.cfg.n_positions - 1):] for p in prompts]
    new = min(new, lm.cfg.n_positions - max(len(i) for i in ids))
    methods = {"sampled": sample.Sampling(settings.temperature, settings.top_k),
               "greedy": sample.Greedy()}
    out = {}
    for name, method in methods.items():
        rows = sample.generate(lm.cfg, lm.params, ids, max_new_tokens=new, method=method,
                               seed=settings.seed, eot_id=lm.tok.eot_id,
                               n_valid_vocab=lm.tok.vocab_size)
        out[name] = [lm.tok.decode(r) for r in rows]
    return out


def generation_metrics(scorer: LM, prompts: Sequence[str], conts: Sequence[str]) -> dict:
    """coherence_ppl, pmi, distinct_1..3 and repeat_4 of continuations, under the scorer."""
    scores = continuation_scores(scorer.logprobs, scorer.tok, prompts, conts,
                                 scorer.cfg.n_positions)
    toks = [scorer.tok.encode(c) for c in conts]
    out = coherence_pmi(scores)
    out.update({f"distinct_{n}": distinct_n(toks, n) for n in (1, 2, 3)})
    out["repeat_4"] = repeated_ngram_rate(toks, 4)
    out["mean_tokens"] = float(np.mean([len(t) for t in toks]))
    out["continuation_tokens"] = sum(len(t) for t in toks)   # scored_tokens of these
    return out


def compare_models(lms: Sequence[LM], scorer: LM, *, settings: GenSettings,
                   suite: str = SUITE, cloze: str = CLOZE) -> dict:
    """Every model answers the suite; the scorer grades every answer; cloze per model."""
    prompts = load_prompt_file(suite)["prompts"]
    facts = load_prompt_file(cloze)["facts"]
    texts = [p["text"] for p in prompts]
    models = []
    for lm in lms:
        log.info("report: generating with %s", lm.name)
        gens = generate_suite(lm, texts, settings)
        ranks = cloze_ranks(lm.logprobs, lm.tok, facts, lm.cfg.n_positions + 1, lm.name)
        models.append({
            "name": lm.name, "step": lm.step, "params": model.count_params(lm.params),
            "generations": gens,
            "metrics": {k: generation_metrics(scorer, texts, v) for k, v in gens.items()},
            "cloze": {"accuracy": float(np.mean([r == 1 for r in ranks])) if ranks else math.nan,
                      "mean_rank": float(np.mean(ranks)) if ranks else math.nan,
                      "facts": len(ranks), "skipped": len(facts) - len(ranks),
                      "candidates": len(facts[0]["candidates"])}})
    return {"suite": suite, "cloze": cloze, "scorer": scorer.name,
            "settings": dataclasses.asdict(settings), "prompts": prompts, "models": models}


# ---------------------------------------------------------------------------------------
# Text sources for the standalone perplexity command


def read_sources(path: str) -> dict[str, list[str]]:
    """{source name: documents} of the files at `path`. `.jsonl` / `.jsonl.zst` lines are
    SlimPajama records (by `meta.redpajama_set_name`); any other file is one document of
    source `text`. A bad record is an error naming its file and line."""
    bad = sources.BadRecords("error", hint="")
    out: dict[str, list[str]] = {}
    for f in sources.resolve_paths(path, "--data"):
        reader = sources.read_jsonl if f.endswith((".jsonl", ".jsonl.zst")) else sources.read_text
        for doc in reader(f, bad):
            out.setdefault(doc.source, []).append(doc.text)
    return out


def perplexity_of_sources(lm: LM, sources: Mapping[str, Sequence[str]], *, context: int,
                          stride: int, batch_size: int = 16, origin: str = "") -> dict:
    """Each source's documents joined by end-of-text into one stream, scored by sliding
    windows; returns `loss`, `ppl`, `tokens` overall and per source. `origin`: where the
    sources came from (`--data 'PATH'`), for messages."""
    if context > lm.cfg.n_positions:
        raise ValueError(f"context {context} exceeds {lm.name}'s n_positions "
                         f"{lm.cfg.n_positions}")
    if not sources:
        raise ValueError(f"{origin or 'the sources'}: no documents to score")
    totals = {}
    fn = functools.partial(lm.logprobs, batch_size=batch_size)
    for name, docs in sources.items():
        ids = []
        for d in lm.tok.encode_batch(list(docs)):
            ids += d + [lm.tok.eot_id]
        ids = ids[:-1]    # no end-of-text after the last document
        if len(ids) < 2:
            raise ValueError(f"{origin or 'the sources'}: source {name!r} has {len(ids)} "
                             f"token(s), nothing to predict (scoring needs at least 2)")
        nll = stream_nll(fn, ids, context=context, stride=stride)
        totals[name] = (float(nll.sum()), float(nll.size))
    return summarize(totals)


def check_out_path(out: str) -> None:
    """Refuse an `--out` file that could not be written, before any scoring is done."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a folder; name a file in it, e.g. "
                         f"{os.path.join(out, 'eval.json')!r}")
    parent = os.path.dirname(out) or "."
    if not os.path.exists(parent):
        raise ValueError(f"--out {out!r}: folder {parent!r} does not exist")
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out!r}: {parent!r} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out!r}: folder {parent!r} is not writable")


def run_cli(compute: Callable[[], dict], render: Callable[[dict], str],
            out: str | None) -> int:
    """The tail of an evaluation command: bad input is `error: ...` and exit 2; otherwise
    the rendered result is printed and, with `out`, written there as JSON (`out` is
    checked before `compute` runs, so a bad path costs no scoring)."""
    try:
        if out:
            check_out_path(out)
        result = compute()
    except (ValueError, OSError, NotImplementedError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(result))
    if out:
        try:
            from jaxgpt import report  # its JSON: NaN/Inf written as null, never bare
            text = report.to_json(result)
            with open(out, "w") as f:
                f.write(text)
        except OSError as e:
            print(f"error: --out {out!r}: {e}", file=sys.stderr)
            return 2
    return 0


def _window(context: int | None, stride: int | None, n_positions: int) -> tuple[int, int]:
    """(context, stride) from the --context and --stride flags (None = unset: the model's
    n_positions and half the context)."""
    context = n_positions if context is None else context
    if context > n_positions:
        raise ValueError(f"--context={context} exceeds the model's n_positions {n_positions}")
    stride = max(1, context // 2) if stride is None else stride
    if stride > context:
        raise ValueError(f"--stride={stride} exceeds the context {context} (--context, "
                         f"default the model's n_positions)")
    return context, stride


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.eval", description=(
        "Token-weighted perplexity of a model on text, per source, by sliding windows."))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a run directory (its latest checkpoint)")
    which.add_argument("--hf", help="an HF GPT-2: hub name (gpt2) or save_pretrained dir")
    parser.add_argument("--data", required=True, help="text/.jsonl(.zst) file, dir or glob")
    parser.add_argument("--context", type=int, default=None,
                        help="window in tokens, >= 1 (default: the model's n_positions)")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts, in [1, context] "
                             "(default: context / 2)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward, >= 1")
    parser.add_argument("--out", help="also write the numbers to this JSON file (its folder "
                                      "must exist)")
    args = parser.parse_args(argv)
    config_schema.command_logging()

    def compute():
        flags = {"--context": args.context, "--stride": args.stride,
                 "--batch_size": args.batch_size}
        for flag, value in flags.items():     # flags first, then --data, then the model
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        texts = read_sources(args.data)
        lm = load_lm(args.checkpoint or "hf:" + args.hf)
        context, stride = _window(args.context, args.stride, lm.cfg.n_positions)
        return {"model": lm.name, "context": context, "stride": stride,
                **perplexity_of_sources(lm, texts, context=context, stride=stride,
                                        batch_size=args.batch_size,
                                        origin=f"--data {args.data!r}")}
    from jaxgpt import report
    return run_cli(compute, report.perplexity_table, args.out)


if __name__ == "__main__":
    from jaxgpt import config
    config.use_compilation_cache()
    sys.exit(main())
