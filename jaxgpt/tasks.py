"""Zero-shot benchmarks GPT-2 is known by, for several models side by side: HellaSwag
(pick the ending of 4) and LAMBADA (OpenAI's version: predict a passage's last word),
scored as EleutherAI's lm-evaluation-harness scores `hellaswag` and `lambada_openai`.

    python -m jaxgpt.tasks --task=hellaswag --models=runs/default,hf:gpt2 [--data=FILE]

A training run scores them at every evaluation too (`eval.tasks`, `DuringTraining`).
"""

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from jaxgpt import config as config_schema
from jaxgpt import eval as evaluation
from jaxgpt import report

log = logging.getLogger(__name__)

# The files the harness's datasets come from: HellaSwag's validation split (10,042 items)
# and OpenAI's LAMBADA test set (5,153 passages, the one GPT-2 was evaluated on).
URLS = {
    "hellaswag": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                 "hellaswag_val.jsonl",
    "lambada": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
}
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxgpt", "tasks")
PROGRESS_ROWS = 2048     # rows (example x choice) scored between progress lines


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]   # continuations, each scored after the context
    label: int                 # index of the right one
    where: str                 # file:line, for messages


def _records(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                why = None if isinstance(record, dict) else "not a JSON object"
            except json.JSONDecodeError as e:
                why = f"not JSON ({e.msg}: column {e.colno})"
            if why:
                raise ValueError(f"{path}:{n}: {why}")
            yield f"{path}:{n}", record


def hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag text clean-up: WikiHow's ` [title]` becomes a sentence end,
    other bracketed tags go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def read_hellaswag(path: str) -> list[Example]:
    """Query `activity_label: ctx_a Ctx_b`, choices ` ending` (all cleaned)."""
    out = []
    for where, r in _records(path):
        try:
            query = hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} "
                                    f"{r['ctx_b'].capitalize()}")
            endings = [hellaswag_clean(e) for e in r["endings"]]
            label = int(r["label"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}: not a HellaSwag record "
                             f"(activity_label, ctx_a, ctx_b, endings, label): {e!r}") from None
        if not 0 <= label < len(endings):
            raise ValueError(f"{where}: label {label} is not one of its {len(endings)} endings")
        out.append(Example(query, tuple(" " + e for e in endings), label, where))
    return out


def read_lambada(path: str) -> list[Example]:
    """Context: the passage up to its last space; the one choice: ` last word`."""
    out = []
    for where, r in _records(path):
        text = r.get("text")
        context, _, word = text.rpartition(" ") if isinstance(text, str) else ("", "", "")
        if not context or not word:
            raise ValueError(f"{where}: a LAMBADA record needs a `text` of at least two words")
        out.append(Example(context, (" " + word,), 0, where))
    return out


READERS = {"hellaswag": read_hellaswag, "lambada": read_lambada}


def fetch(task: str, cache: str = CACHE) -> str:
    """The task's file, downloaded once into `cache` (the only network access here)."""
    path = os.path.join(cache, os.path.basename(URLS[task]))
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        log.info("downloading %s to %s", URLS[task], path)
        partial = f"{path}.{os.getpid()}.partial"    # processes sharing the cache race
        try:
            urllib.request.urlretrieve(URLS[task], partial)
            READERS[task](partial)     # an error page or a cut file stays out
        except (OSError, ValueError) as e:
            if os.path.exists(partial):
                os.remove(partial)
            raise OSError(f"could not download {URLS[task]} ({e}); give the file instead "
                          f"(--data=FILE, or {task}=FILE in a task list)") from None
        os.replace(partial, path)
    return path


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing spaces of the context move to the continuation, the
    joined text is encoded, and the continuation is what follows the context's own ids
    (an empty context is end-of-text)."""
    if not context:
        return [tok.eot_id], tok.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tok.encode(context)
    return ctx, tok.encode(context + continuation)[len(ctx):]


def encode(tok, examples: Sequence[Example], n_positions: int,
           name: str) -> list[tuple[list[int], int]]:
    """(context + choice ids, choice length) per example and choice, in order, for a model
    named `name` reading `n_positions` tokens: a context too long loses its first tokens; a
    choice is never cut."""
    out, limit = [], n_positions + 1
    for ex in examples:
        for choice in ex.choices:
            ctx, c_ids = encode_pair(tok, ex.context, choice)
            ctx = ctx or [tok.eot_id]      # a context of spaces only
            if not 1 <= len(c_ids) < limit:
                raise ValueError(f"{ex.where}: choice {choice!r} is {len(c_ids)} tokens; "
                                 f"{name} scores 1..{limit - 1}")
            p_ids, _ = evaluation.fit(ctx, c_ids, limit)
            out.append((p_ids + c_ids, len(c_ids)))
    return out


def score_encoded(logprobs: Callable[[list], list], encoded, examples: Sequence[Example],
                  name: str):
    """Per example and choice: (sum of log p(choice tokens | context), all tokens greedy).

    `logprobs(rows)`: (log-probs, greedy hits) per row (`eval.target_logprobs`, greedy)."""
    rows = [ids for ids, _ in encoded]
    lps, start = [], time.monotonic()
    for lo in range(0, len(rows), PROGRESS_ROWS):    # a progress line per chunk of rows
        lps += logprobs(rows[lo:lo + PROGRESS_ROWS])
        if len(rows) > PROGRESS_ROWS:
            rate = len(lps) / max(time.monotonic() - start, 1e-9)
            log.info("%s: %s/%s rows scored, %.1f rows/s, ETA %s", name, f"{len(lps):,}",
                     f"{len(rows):,}", rate,
                     report.format_duration((len(rows) - len(lps)) / rate))
    got = iter(zip(lps, (n for _, n in encoded)))
    out = []
    for ex in examples:
        scores = []
        for _ in ex.choices:
            (lp, hit), n = next(got)
            scores.append((float(lp[-n:].sum()), bool(hit[-n:].all())))
        out.append(scores)
    return out


def score(lm: evaluation.LM, examples: Sequence[Example], *, batch_size: int = 16):
    """`score_encoded` of one model on its own encoding of `examples`."""
    logprobs = functools.partial(lm.logprobs, batch_size=batch_size, greedy=True)
    return score_encoded(logprobs, encode(lm.tok, examples, lm.cfg.n_positions, lm.name),
                         examples, lm.name)


def _accuracy(correct: Sequence[bool]) -> tuple[float, float]:
    """Mean and its standard error (from the sample variance, as the harness reports it)."""
    acc, n = float(np.mean(correct)), len(correct)
    return acc, math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else math.nan


def metrics(task: str, examples: Sequence[Example], scores) -> dict:
    """HellaSwag: acc (highest log-likelihood) and acc_norm (highest log-likelihood per
    character of the ending, as the harness normalizes). LAMBADA: acc (every token of the
    word is the greedy choice) and ppl = exp(-mean log p(word | passage))."""
    out = {"examples": len(examples)}
    if task == "hellaswag":
        lls = [np.asarray([ll for ll, _ in s]) for s in scores]
        chars = [np.asarray([max(len(c) - 1, 1) for c in ex.choices], float)
                 for ex in examples]
        out["acc"], out["acc_stderr"] = _accuracy(
            [int(np.argmax(ll)) == ex.label for ll, ex in zip(lls, examples)])
        out["acc_norm"], out["acc_norm_stderr"] = _accuracy(
            [int(np.argmax(ll / n)) == ex.label for ll, n, ex in zip(lls, chars, examples)])
    else:
        out["acc"], out["acc_stderr"] = _accuracy([s[0][1] for s in scores])
        out["ppl"] = math.exp(-float(np.mean([s[0][0] for s in scores])))
    return out


def parse(spec: str) -> dict[str, str | None]:
    """`hellaswag=FILE,lambada` -> {task: file or None (download)}."""
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, path = item.partition("=")
        if name not in READERS:
            raise ValueError(f"unknown task {name!r} in {spec!r} (known: {sorted(READERS)})")
        out[name] = path or None
    return out


def load(task: str, path: str, limit: int = 0) -> list[Example]:
    """The first `limit` (0 = all) examples of a task file; none at all is an error."""
    examples = READERS[task](path)
    if not examples:
        raise ValueError(f"{path} holds no {task} examples")
    return examples[:limit or None]


def evaluate(task: str, lms: Iterable[evaluation.LM], path: str,
             examples: Sequence[Example], *, batch_size: int = 16) -> dict:
    """Every model on the same `examples` (read from `path`); `lms` may be a generator, so
    one model at a time is in memory."""
    results = []
    for lm in lms:
        log.info("%s: %d %s examples", lm.name, len(examples), task)
        results.append({"model": lm.name, "step": lm.step,
                        **metrics(task, examples, score(lm, examples, batch_size=batch_size))})
    return {"task": task, "data": path, "results": results}


# What a training run logs of each task at every evaluation, as `TASK/KEY` (`examples`: how
# many were scored, so a report can tell these scores from others on the same task).
TRAINING_KEYS = {"hellaswag": ("acc", "acc_norm", "examples"),
                 "lambada": ("acc", "ppl", "examples")}


def load_spec(spec: str, limit: int = 0) -> list[tuple[str, str, list[Example]]]:
    """(task, file, its first `limit` examples) of each task of a `parse` spec; a task
    without a file is downloaded once (`fetch`)."""
    out = []
    for task, path in parse(spec).items():
        path = path or fetch(task)
        out.append((task, path, load(task, path, limit)))
    return out


class DuringTraining:
    """The benchmarks a training run scores at every evaluation (`eval.tasks`): each task
    is encoded once with the run's tokenizer, then scored by the trainer's sharded step."""

    def __init__(self, loaded, tok, n_positions: int, batch: int):
        self.batch = batch
        self.tasks = [(task, examples, encode(tok, examples, n_positions, "this run"))
                      for task, _, examples in loaded]
        log.info("eval.tasks, scored at every evaluation: %s", ", ".join(
            f"{task} ({len(examples):,} examples of {path})" for task, path, examples in loaded))

    def __call__(self, cfg, params, step: Callable[[np.ndarray], tuple]) -> dict:
        """{TASK/KEY: value} of every task for `params`. `step`: int32 tokens [batch, T] ->
        (log-probs, greedy hits) as global arrays replicated on every device (the trainer's
        logprob_step, fed by every process alike: a collective)."""
        forward = lambda tokens: [np.asarray(x.addressable_data(0)) for x in step(tokens)]
        logprobs = functools.partial(evaluation.target_logprobs, cfg, params,
                                     batch_size=self.batch, greedy=True, forward=forward)
        out = {}
        for task, examples, encoded in self.tasks:
            m = metrics(task, examples, score_encoded(logprobs, encoded, examples, task))
            out |= {f"{task}/{key}": m[key] for key in TRAINING_KEYS[task]}
        return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.tasks", description=(
        "HellaSwag / LAMBADA accuracy of models side by side (lm-evaluation-harness rules)."))
    parser.add_argument("--task", required=True, choices=sorted(READERS))
    parser.add_argument("--models", required=True,
                        help="comma-separated run directories (RUN or RUN@STEP) and hf:NAME|DIR")
    parser.add_argument("--data", help="the task's .jsonl; default: download it once into "
                                       f"{CACHE}")
    parser.add_argument("--limit", type=int, default=0, help="first N examples (0 = all)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    config_schema.command_logging()
    if args.limit < 0 or args.batch_size < 1:
        parser.error("--limit must be >= 0 and --batch_size >= 1")
    specs = [m for m in args.models.split(",") if m]
    if not specs:
        parser.error(f"--models={args.models!r} names no model; give run directories "
                     f"(RUN or RUN@STEP) or hf:NAME|DIR, comma-separated")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a directory; name the JSON file to write")

    def compute():
        path = args.data or fetch(args.task)
        examples = load(args.task, path, args.limit)
        return evaluate(args.task, (evaluation.load_lm(m) for m in specs), path, examples,
                        batch_size=args.batch_size)
    return evaluation.run_cli(compute, report.tasks_table, args.out)


if __name__ == "__main__":
    from jaxgpt import config
    config.use_compilation_cache()
    sys.exit(main())
