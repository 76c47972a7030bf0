"""Human-facing output: the training progress line, sample blocks, and the run report
(`python -m jaxgpt.report --workdir=RUN [--compare=RUN2,hf:gpt2] --out=DIR`).

The only module that formats for people; everything else logs numbers.
"""

import argparse
import base64
import dataclasses
import html
import io
import itertools
import json
import math
import os
import sys
import time


def json_safe(obj):
    """`obj` with every non-finite float (NaN, ±Inf) replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def to_json(obj, indent: int = 1) -> str:
    """Valid JSON text of `obj`: NaN and ±Inf become null (a bare NaN is not JSON, and
    strict parsers reject the whole file); anything else non-finite is an error."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def format_duration(seconds: float | None) -> str:
    if seconds is None:   # not known yet (the first, compiling step)
        return "--"
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_bar(fraction: float, width: int = 24) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "[" + "#" * full + "." * (width - full) + "]"


DATA_WAIT_SHOWN = 0.1   # the progress line names input stalls above this share of the time


def _epochs(m: dict) -> str:
    """Passes over the data: a fraction, or where the pass length is unknown (an HF stream)
    the pass and the documents read in it."""
    if m.get("pass_documents") is not None:
        return f"pass {int(m['epoch']) + 1}, {m['pass_documents']:,} docs"
    return f"~{m['epoch']:.2f} epochs"


def progress_line(m: dict) -> str:
    """One console line from a metrics record (see train.train_and_evaluate)."""
    line = (f"{progress_bar(m['step'] / m['total_steps'])} step {m['step']}/{m['total_steps']}"
            f" | loss {m['loss']:.4f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.2f}"
            f" | {m['tokens_per_s']:,.0f} tok/s | {m['samples_per_s']:.1f} samples/s"
            f" | {_epochs(m)} | ETA {format_duration(m['eta_s'])}")
    if m.get("mfu") is not None:   # None where the devices' peak FLOP/s is unknown
        line += f" | MFU {100 * m['mfu']:.1f}%"
    if (m.get("data_wait") or 0) >= DATA_WAIT_SHOWN:
        line += f" | waiting for data {100 * m['data_wait']:.0f}%"
    return line


def benchmark_scores(m: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the `TASK/METRIC` benchmark scores in an eval record
    (`eval.tasks`; a per-source `val_loss/NAME` is not one, nor `TASK/examples`, the
    number of examples scored: see `benchmark_examples`)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in m.items():
        task, sep, metric = key.partition("/")
        if sep and not task.startswith("val_") and metric != "examples":
            out.setdefault(task, {})[metric] = value
    return out


def benchmark_examples(m: dict, task: str) -> int | None:
    """How many examples of `task` an eval record's scores are over (None in records
    written before the count was logged)."""
    n = m.get(f"{task}/examples")
    return None if n is None else int(n)


def _scores_text(scores: dict[str, float]) -> str:
    def one(k, v):
        if k != "ppl":
            return f"{k} {v:.4f}"
        return f"{k} {v:.2f}" if v < 1e6 else f"{k} {v:.3g}"    # an untrained model's is huge
    return " ".join(one(k, v) for k, v in scores.items())


def eval_line(m: dict) -> str:
    line = (f"eval @ step {m['step']}: val loss {m['val_loss']:.4f} | "
            f"val ppl {m['val_ppl']:.2f} ({m['val_tokens']:,.0f} tokens)")
    for task, scores in benchmark_scores(m).items():
        line += f" | {task} {_scores_text(scores)}"
        if (n := benchmark_examples(m, task)) is not None:
            line += f" ({n:,} examples)"
    return line


def samples_block(step: int, prompts: list[str], completions: list[str]) -> str:
    lines = [f"--- samples @ step {step} ---"]
    for prompt, completion in zip(prompts, completions):
        lines.append(f">>> {prompt!r}\n{prompt}{completion}\n")
    return "\n".join(lines)


def perplexity_table(result: dict) -> str:
    """The `python -m jaxgpt.eval` result: overall and per-source loss and perplexity."""
    lines = [f"{result['model']}: context {result['context']}, stride {result['stride']}",
             f"{'source':<24} {'tokens':>12} {'loss':>8} {'ppl':>10}",
             (f"{'all':<24} {result['tokens']:>12,.0f} {result['loss']:>8.4f} "
              f"{result['ppl']:>10.2f}")]
    for key in sorted(result):
        if key.startswith("loss/"):
            name = key[5:]
            lines.append(f"{name:<24} {result['tokens/' + name]:>12,.0f} {result[key]:>8.4f} "
                         f"{result['ppl/' + name]:>10.2f}")
    return "\n".join(lines)


def tasks_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """A `tasks.evaluate` result: one row per model, accuracies with standard errors."""
    hellaswag = result["task"] == "hellaswag"
    header = ["model", "step", "examples", "acc", "acc_norm" if hellaswag else "ppl"]
    rows = []
    for r in result["results"]:
        last = (f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}" if hellaswag
                else f"{r['ppl']:.2f}")
        rows.append([r["model"], "-" if r["step"] is None else str(r["step"]),
                     f"{r['examples']:,}", f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}", last])
    return header, rows


def tasks_table(result: dict) -> str:
    """The `python -m jaxgpt.tasks` result as aligned text."""
    header, rows = tasks_rows(result)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([f"{result['task']} ({result['data']})", line(header)]
                     + [line(r) for r in rows])


# ---------------------------------------------------------------------------------------
# The run report: status, curves, model comparison, prompts side by side


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl and mirrors the numbers
    (and sample text) to TensorBoard event files in WORKDIR and, if asked, to Weights &
    Biases; `read_metrics` reads the file back."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = False,
                 wandb_project: str | None = None, config: dict | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled     # the training loop: process 0 only
        self.tb = self.wandb = None
        if self.enabled and tensorboard:
            import tensorboardX
            self.tb = tensorboardX.SummaryWriter(logdir=workdir, flush_secs=30)
        if self.enabled and wandb_project:
            import wandb  # checks.validate_config checked that it is installed
            self.wandb = wandb.init(project=wandb_project, dir=workdir, config=config,
                                    name=os.path.basename(os.path.abspath(workdir)))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        group = "eval" if "val_loss" in record else "train"
        scalars = {f"{group}/{k}": v for k, v in record.items()
                   if k not in ("step", "time", "total_steps") and isinstance(v, (int, float))}
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, record["step"])
            self.tb.flush()   # a run still training shows up in TensorBoard at once
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def write_text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text.replace("\n", "  \n"), step)   # markdown line breaks
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(workdir: str, *, with_starts: bool = False):
    """(train records, eval records) of RUN/metrics.jsonl; `with_starts` adds a third item,
    the index into the train records at which each start of the training process begins
    (train.train_and_evaluate writes a `{"step", "data"}` record at every start).

    A run still training may be caught mid-write: an unterminated last line that does not
    parse is ignored. Any other bad line is an error naming file and line."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"run directory {workdir!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a jaxgpt run "
                                f"directory, or its first log step has not been written yet")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    train, evals, starts = [], [], []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and not line.endswith("\n"):
                break   # being written right now
            raise ValueError(f"{path}:{i}: not a JSON metrics record: {line[:60]!r}") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}:{i}: a metrics record needs a 'step', got {line[:60]!r}")
        if "val_loss" in rec:
            evals.append(rec)
        elif "loss" in rec:
            train.append(rec)
        elif "data" in rec:
            starts.append(len(train))
    if not train:
        raise ValueError(f"{path} has no training records yet")
    return (train, evals, starts) if with_starts else (train, evals)


def logged_wall_time(train: list[dict], starts: list[int] | None = None) -> tuple[float, int]:
    """(seconds, starts): the time between the first and last train record of each start
    of the training process, summed, so time while the run was stopped is not counted.
    `starts`: indices into `train` where each start begins (`read_metrics`); None or empty
    is one start. Records before the first start marker count as a start of their own."""
    cuts = sorted({0, *(s for s in (starts or []) if 0 <= s <= len(train))}) + [len(train)]
    total = 0.0
    for lo, hi in itertools.pairwise(cuts):
        times = [r["time"] for r in train[lo:hi] if r.get("time") is not None]
        if times:
            total += times[-1] - times[0]
    n_starts = max(len(starts or []), 1) + (1 if starts and min(starts) > 0 else 0)
    return total, n_starts


def status_rows(train: list[dict], evals: list[dict], now: float | None = None,
                starts: list[int] | None = None) -> list[tuple[str, str]]:
    """(label, value) rows of the status block, from the newest records; `starts`: where
    each start of the training process begins in `train` (`read_metrics`)."""
    t = train[-1]
    finished = t["step"] >= t["total_steps"]
    rows = [("state", "finished" if finished else "in progress (or stopped)"),
            ("step", f"{t['step']} / {t['total_steps']}"),
            ("train loss", f"{t['loss']:.4f}")]
    if evals:
        e = evals[-1]
        rows.append(("eval", (f"val loss {e['val_loss']:.4f}, perplexity {e['val_ppl']:.2f} "
                              f"@ step {e['step']}")))
        for task, scores in benchmark_scores(e).items():
            n = benchmark_examples(e, task)
            over = "" if n is None else f" on {n:,} examples"
            rows.append((task, f"{_scores_text(scores)}{over} @ step {e['step']}"))
    passes = int(t["epoch"])
    if t.get("pass_documents") is not None:
        done = (f"{passes} (the stream's length is unknown: {t['pass_documents']:,} documents "
                f"into pass {passes + 1})")
    else:
        done = f"{passes} ({t['epoch']:.2f} epochs of data)"
    rows.append(("epochs completed", done))
    if not finished:
        rows.append(("ETA", format_duration(t["eta_s"])))
    rows += [("samples/s", f"{t['samples_per_s']:.1f}"),
             ("tokens/s", f"{t['tokens_per_s']:,.0f}"),
             ("learning rate", f"{t['lr']:.2e}")]
    if t.get("mfu") is not None:
        rows.append(("MFU", f"{100 * t['mfu']:.1f}%"))
    if t.get("data_wait") is not None:     # runs logged before it was measured have none
        wait = f"{100 * t['data_wait']:.0f}% of the last interval, the accelerator idle"
        rows.append(("waiting for data", wait))
    if "time" in t and "time" in train[0]:
        wall, n_starts = logged_wall_time(train, starts)
        rows.append(("wall time logged", format_duration(wall) + (
            f" over {n_starts} starts (the time stopped between them not counted)"
            if n_starts > 1 else "")))
        age = (time.time() if now is None else now) - t["time"]
        rows.append(("last record", f"{format_duration(age)} ago"))   # a stalled run shows
    return rows


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def make_plots(train: list[dict], evals: list[dict]) -> dict[str, bytes]:
    """PNG bytes of the loss, perplexity, learning-rate and throughput curves (and the
    benchmark accuracies, where the run scored any)."""
    from matplotlib.figure import Figure  # Figure alone renders with Agg: no display needed

    steps = [r["step"] for r in train]
    e_steps = [r["step"] for r in evals]
    specs = {
        "loss": ("loss (nats/token)", [("train", steps, [r["loss"] for r in train]),
                                       ("validation", e_steps, [r["val_loss"] for r in evals])]),
        "perplexity": ("perplexity (log scale)", [
            ("exp(train loss)", steps, [math.exp(min(r["loss"], 50)) for r in train]),
            ("validation", e_steps, [r["val_ppl"] for r in evals])]),
        "learning_rate": ("learning rate", [("lr", steps, [r["lr"] for r in train])]),
        "throughput": ("tokens/s", [("tokens/s", steps, [r["tokens_per_s"] for r in train])]),
    }
    accuracy = {}    # (task, metric) -> (steps, values) of the benchmarks scored in training
    for r in evals:
        for task, scores in benchmark_scores(r).items():
            for metric, v in scores.items():
                if metric != "ppl":     # benchmark_scores leaves out TASK/examples
                    x, y = accuracy.setdefault(f"{task} {metric}", ([], []))
                    x.append(r["step"])
                    y.append(v)
    if accuracy:
        specs["benchmarks"] = ("zero-shot accuracy (eval.tasks)",
                               [(label, x, y) for label, (x, y) in accuracy.items()])
    out = {}
    for name, (ylabel, series) in specs.items():
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.subplots()
        for label, x, y in series:
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
        if name == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        out[name] = _png(fig)
    return out


METRIC_COLUMNS = (   # (key, header, format) of the per-model table
    ("coherence_ppl", "coherence ppl ↓", "{:.2f}"), ("pmi", "PMI (nats/token) ↑", "{:+.3f}"),
    ("distinct_1", "distinct-1", "{:.3f}"), ("distinct_2", "distinct-2", "{:.3f}"),
    ("distinct_3", "distinct-3", "{:.3f}"), ("repeat_4", "repeat-4 ↓", "{:.3f}"),
    ("mean_tokens", "tokens", "{:.1f}"))

CUT = "(cut)"   # marks a row whose continuations were not all scored


def scored_cell(vals: dict) -> str:
    """`scored/all` continuation tokens under the scorer, `(cut)` when fewer than all were
    (prompt + continuation longer than the scorer's context); `–` for an older report."""
    n, total = vals.get("scored_tokens"), vals.get("continuation_tokens")
    if n is None or total is None:
        return "–"
    return f"{n:,}/{total:,}" + (f" {CUT}" if n < total else "")

DEFINITIONS = (
    "**coherence ppl**: perplexity of the continuation under the scorer, given the prompt "
    "(token-weighted over all prompts); **PMI**: mean per-token log p(continuation | prompt) "
    "− log p(continuation) under the scorer (the unconditional context is end-of-text); "
    "low or negative = the text drifted off the prompt's topic; **scored**: continuation "
    "tokens scored for coherence and PMI / all of them (scorer tokens); where prompt + "
    "continuation exceed the scorer's context, the prompt keeps at least half of it and "
    "the continuation's tail is not scored, marked (cut); **distinct-n**: distinct "
    "n-grams / all n-grams over all continuations (scorer tokens); **repeat-4**: fraction of "
    "4-grams already seen earlier in the same continuation; **cloze**: accuracy and mean "
    "rank of the true answer among the candidates, by the model's own log-likelihood.")


BENCHMARKS_NOTE = (
    "Zero-shot, scored as lm-evaluation-harness scores `hellaswag` (acc: the ending with "
    "the highest log-likelihood; acc_norm: per character) and `lambada_openai` (acc: the "
    "last word is the greedy choice; ppl of that word); ± one standard error.")


def _fmt(fmt: str, v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def metrics_rows(comparison: dict) -> tuple[list[str], list[list[str]]]:
    header = (["model", "step", "params", "decoding"] + [h for _, h, _ in METRIC_COLUMNS]
              + ["scored", "cloze acc", "cloze mean rank"])
    rows = []
    for m in comparison["models"]:
        cloze = m["cloze"]
        rank = _fmt("{:.2f}", cloze["mean_rank"])
        if cloze.get("skipped"):
            rank += f" ({cloze['facts']} of {cloze['facts'] + cloze['skipped']} facts)"
        for decoding, vals in m["metrics"].items():
            rows.append([m["name"], _fmt("{}", m["step"]), f"{m['params']:,}", decoding]
                        + [_fmt(f, vals[k]) for k, _, f in METRIC_COLUMNS]
                        + [scored_cell(vals), _fmt("{:.2f}", cloze["accuracy"]), rank])
    return header, rows


@dataclasses.dataclass
class Report:
    """Everything a report shows, computed before any file is written."""

    run: str
    generated: str
    n_records: int
    status: list[tuple[str, str]]
    plots: dict[str, bytes]
    comparison: dict | None
    notes: list[str]
    benchmarks: list[dict] = dataclasses.field(default_factory=list)   # tasks.evaluate's


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>") or " "


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


def render_markdown(r: Report) -> str:
    out = [f"# jaxgpt report: {r.run}", "",
           f"Generated {r.generated} from `metrics.jsonl` ({r.n_records} records).", "",
           "## Status", ""] + _md_table(["", "value"], [list(x) for x in r.status])
    out += ["", "## Training curves", ""]
    out += [f"![{name}](plots/{name}.png)" for name in r.plots]
    out += ["", "## Models", ""]
    c = r.comparison
    if c is None:
        out += r.notes or ["No models were compared."]
        return "\n".join(out) + "\n"
    s = c["settings"]
    out += [(f"Prompt suite `{c['suite']}` ({len(c['prompts'])} prompts), cloze set "
             f"`{c['cloze']}`, scorer `{c['scorer']}`; sampled with temperature "
             f"{s['temperature']}, top-k {s['top_k']}, seed {s['seed']}, up to "
             f"{s['max_new_tokens']} new tokens; greedy likewise."), ""]
    out += _md_table(*metrics_rows(c)) + ["", DEFINITIONS, ""] + r.notes
    if r.benchmarks:
        out += ["", "## Benchmarks", "", BENCHMARKS_NOTE]
        for b in r.benchmarks:
            out += ["", f"`{b['task']}` ({b['data']})", ""] + _md_table(*tasks_rows(b))
    out += ["", "## Prompts", ""]
    for i, p in enumerate(c["prompts"]):
        out += [f"### {i + 1}. [{p['kind']}] {p['text'].splitlines()[0]}", ""]
        rows = [[m["name"], m["generations"]["sampled"][i], m["generations"]["greedy"][i]]
                for m in c["models"]]
        out += _md_table(["model", "sampled", "greedy"], rows) + [""]
    return "\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 8px;vertical-align:top;text-align:left}"
        ".gens{display:grid;gap:8px}.gen{border:1px solid #ddd;padding:6px;"
        "white-space:pre-wrap;font-family:monospace;font-size:13px}"
        ".prompt{color:#555}img{max-width:49%}")


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def render_html(r: Report) -> str:
    """Self-contained HTML: PNGs inline as base64, no external resources."""
    e = html.escape
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>jaxgpt report: "
              f"{e(r.run)}</title><style>{_CSS}</style></head><body>"),
             (f"<h1>jaxgpt report: {e(r.run)}</h1><p>Generated {e(r.generated)} from "
              f"<code>metrics.jsonl</code> ({r.n_records} records).</p><h2>Status</h2>"),
             _html_table(["", "value"], [list(x) for x in r.status]), "<h2>Training curves</h2>"]
    parts += [f"<img alt='{name}' src='data:image/png;base64,"
              f"{base64.b64encode(png).decode()}'>" for name, png in r.plots.items()]
    parts.append("<h2>Models</h2>")
    c = r.comparison
    if c is not None:
        parts += [_html_table(*metrics_rows(c)),
                  "<p>" + e(DEFINITIONS).replace("**", "") + "</p>"]
    parts += [f"<p>{e(n)}</p>" for n in r.notes]
    if r.benchmarks:
        parts += ["<h2>Benchmarks</h2>", f"<p>{e(BENCHMARKS_NOTE)}</p>"]
        for b in r.benchmarks:
            parts += [f"<p><code>{e(b['task'])}</code> ({e(b['data'])})</p>",
                      _html_table(*tasks_rows(b))]
    if c is not None:
        parts.append("<h2>Prompts</h2>")
        cols = f"grid-template-columns:repeat({len(c['models'])},1fr)"
        for i, p in enumerate(c["prompts"]):
            parts.append(f"<h3>{i + 1}. [{e(p['kind'])}]</h3>"
                         f"<div class='gen prompt'>{e(p['text'])}</div>")
            for decoding in ("sampled", "greedy"):
                cells = "".join(f"<div class='gen'><b>{e(m['name'])}</b> ({decoding})\n"
                                f"{e(m['generations'][decoding][i])}</div>"
                                for m in c["models"])
                parts.append(f"<div class='gens' style='{cols}'>{cells}</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(workdir: str, *, compare: list[str], scorer: str | None, settings,
                 benchmarks: dict[str, str | None] | None = None,
                 benchmark_limit: int = 0) -> Report:
    """Read the run's metrics, plot them, and (if it has a checkpoint) compare models,
    also on `benchmarks` ({task: file, or None to download it}; see tasks.py)."""
    from jaxgpt import eval as evaluation  # eval pulls in JAX; the progress line does not
    from jaxgpt import tasks

    train, evals, starts = read_metrics(workdir, with_starts=True)
    # Benchmark files fetched and read first: a bad one fails before any generation.
    task_files = {t: path or tasks.fetch(t) for t, path in (benchmarks or {}).items()}
    task_examples = {t: tasks.load(t, path, benchmark_limit) for t, path in task_files.items()}
    notes, comparison, results = [], None, []
    has_ckpt = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
    if not has_ckpt:
        notes.append(f"{workdir} has no checkpoint yet, so it is not among the models.")
    lms = []
    if has_ckpt:
        # Step folders none of which can be read: the same path as no checkpoint (status,
        # curves, a note naming the problem); the checkpoints are only read, never moved.
        try:
            lms.append(evaluation.load_lm(workdir))
        except (ValueError, OSError) as e:
            notes.append(f"{workdir} has checkpoints but none could be loaded ({e}), so it "
                         f"is not among the models.")
    lms += [evaluation.load_lm(s) for s in compare]
    if lms:
        by_name = {lm.name: lm for lm in lms}
        judge = lms[0] if scorer is None else by_name.get(scorer) or evaluation.load_lm(scorer)
        comparison = evaluation.compare_models(lms, judge, settings=settings)
        results = [tasks.evaluate(task, lms, path, task_examples[task])
                   for task, path in task_files.items()]
    return Report(run=workdir, generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  n_records=len(train) + len(evals),
                  status=status_rows(train, evals, starts=starts),
                  plots=make_plots(train, evals), comparison=comparison, notes=notes,
                  benchmarks=results)


def _write(path: str, content: str | bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a report."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(tmp, path)


def write_report(r: Report, out: str) -> list[str]:
    """report.md (+ plots/*.png), report.html (self-contained) and report.json in `out`."""
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    paths = []
    for name, png in r.plots.items():
        paths.append(os.path.join(out, "plots", f"{name}.png"))
        _write(paths[-1], png)
    doc = {"run": r.run, "generated": r.generated, "status": dict(r.status),
           "comparison": r.comparison, "benchmarks": r.benchmarks, "notes": r.notes}
    for name, content in (("report.md", render_markdown(r)), ("report.html", render_html(r)),
                          ("report.json", to_json(doc))):
        paths.append(os.path.join(out, name))
        _write(paths[-1], content)
    return paths


def _out_dir_problem(out: str) -> str | None:
    """Why `out` cannot be (created as) the report's directory, or None; nothing is created."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return (f"{path} is a file, not a directory" if path == os.path.abspath(out) else
                f"{path} is a file, so no directory can be made under it")
    if not os.access(path, os.W_OK | os.X_OK):
        return f"no permission to write in {path}"
    return None


def flag_problem(args) -> str | None:
    """Why the report's generation or model flags cannot work, naming the flag, or None;
    checked before any model is loaded (a large one takes minutes)."""
    if args.max_new_tokens < 1:
        return f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"
    if not math.isfinite(args.temperature) or args.temperature < 0:
        return f"--temperature must be a number >= 0, got {args.temperature}"
    if args.top_k < 0:
        return f"--top_k must be >= 0 (0 = off), got {args.top_k}"
    if args.temperature == 0 and args.top_k:
        return (f"--temperature=0 is greedy: set --top_k=0 too (--top_k={args.top_k} would be "
                f"ignored), or give a temperature > 0")
    for flag, specs in (("--compare", args.compare.split(",")), ("--scorer", [args.scorer])):
        for spec in specs:
            if spec is not None and spec.strip() == "hf:":
                return (f"{flag}={spec!r} names no HF model: write hf:NAME (a hub name such "
                        f"as hf:gpt2) or hf:DIR")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.report", description=(
        "Write report.md / report.html for a run: status, curves, model comparison."))
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument("--compare", default="", help="comma-separated runs or hf:NAME|DIR")
    parser.add_argument("--scorer", help="model that grades continuations (default: the run)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max_new_tokens", type=int, default=48, help=">= 1")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help=">= 0; 0 is greedy and needs --top_k=0")
    parser.add_argument("--top_k", type=int, default=40, help=">= 0 (0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default="", help=(
        "benchmarks for every model: hellaswag[=FILE],lambada[=FILE] (no FILE: downloaded "
        "once into ~/.cache/jaxgpt/tasks)"))
    parser.add_argument("--tasks_limit", type=int, default=0,
                        help="first N examples of each benchmark (0 = all)")
    args = parser.parse_args(argv)
    if args.tasks_limit < 0:
        parser.error(f"--tasks_limit must be >= 0, got {args.tasks_limit}")
    if problem := flag_problem(args):    # before any model is loaded
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if problem := _out_dir_problem(args.out):   # before the minutes of generation
        parser.error(f"--out {args.out}: {problem}")
    from jaxgpt import config as config_schema
    config_schema.command_logging()
    from jaxgpt import eval as evaluation
    try:
        settings = evaluation.GenSettings(args.max_new_tokens, args.temperature, args.top_k,
                                          args.seed)
        from jaxgpt import tasks
        r = build_report(args.workdir, compare=[s for s in args.compare.split(",") if s],
                         scorer=args.scorer, settings=settings,
                         benchmarks=tasks.parse(args.tasks), benchmark_limit=args.tasks_limit)
        paths = write_report(r, args.out)
    except (ValueError, OSError, NotImplementedError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    from jaxgpt import config
    config.use_compilation_cache()
    sys.exit(main())
