"""The run report and the standalone eval command, on tiny trained runs: sections, PNGs,
numbers equal to metrics.jsonl, TensorBoard events, HTML in headless Chromium, bad runs."""

import base64
import json
import math
import os
import pathlib
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from jaxgpt import eval as evaluation
from jaxgpt import report, train
from tests import helpers
from tests.conftest import SHARED_DATA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hf_random_dir(path) -> str | None:
    """A random-init HF GPT-2 saved with save_pretrained plus GPT-2 BPE files, or None when
    the HF interop, transformers or the shared BPE files are missing."""
    try:
        import transformers

        from jaxgpt.convert import hf  # noqa: F401
    except ImportError:
        return None
    bpe = os.path.join(SHARED_DATA, "gpt2-bpe")
    if not os.path.isdir(bpe):
        return None
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(path))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(os.path.join(bpe, name), path / name)
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    corpus = helpers.small_corpus(tmp)
    a, b = str(tmp / "run_a"), str(tmp / "run_b")
    train.train_and_evaluate(helpers.tiny_run_config(corpus), a)
    train.train_and_evaluate(helpers.tiny_run_config(corpus, train__seed=1, train__steps=3), b)
    return {"a": a, "b": b, "corpus": corpus, "hf": _hf_random_dir(tmp / "hf_random")}


@pytest.fixture(scope="module")
def made(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    compare = [runs["b"]] + (["hf:" + runs["hf"]] if runs["hf"] else [])
    # Benchmarks in their published formats, three items each, for every model.
    tasks_dir = tmp_path_factory.mktemp("tasks")
    hellaswag = [{"activity_label": "Cooking", "ctx_a": f"A cook cuts {x}.", "ctx_b": "she",
                  "label": i % 4, "endings": ["boils water.", "eats it raw.", "sings.",
                                              "washes the knife."]}
                 for i, x in enumerate(("onions", "carrots", "bread"))]
    (tasks_dir / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hellaswag))
    (tasks_dir / "lambada.jsonl").write_text("".join(
        json.dumps({"text": t}) + "\n" for t in ("def parse_args(self, args",
                                                 "import os and sys", "return the value")))
    rc = report.main(["--workdir", runs["a"], "--compare", ",".join(compare), "--out", out,
                      "--max_new_tokens", "8", "--tasks",
                      f"hellaswag={tasks_dir / 'hs.jsonl'},lambada={tasks_dir / 'lambada.jsonl'}"])
    assert rc == 0
    out_dir = pathlib.Path(out)
    return {"out": out, "md": (out_dir / "report.md").read_text(),
            "html": (out_dir / "report.html").read_text(),
            "json": json.loads((out_dir / "report.json").read_text()),
            "models": [runs["a"]] + compare}


def _records(workdir):
    text = pathlib.Path(workdir, "metrics.jsonl").read_text()
    recs = [json.loads(line) for line in text.splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


@pytest.mark.slow
def test_report_has_every_section_and_the_metrics_files_numbers(runs, made):
    md = made["md"]
    for heading in ("## Status", "## Training curves", "## Models", "## Prompts"):
        assert heading in md
    train_recs, eval_recs = _records(runs["a"])
    last, last_eval = train_recs[-1], eval_recs[-1]
    assert f"| step | {last['step']} / {last['total_steps']} |" in md
    assert f"| train loss | {last['loss']:.4f} |" in md
    assert (f"val loss {last_eval['val_loss']:.4f}, perplexity {last_eval['val_ppl']:.2f} "
            f"@ step {last_eval['step']}") in md
    assert f"| tokens/s | {last['tokens_per_s']:,.0f} |" in md
    assert f"| samples/s | {last['samples_per_s']:.1f} |" in md
    assert (f"| waiting for data | {100 * last['data_wait']:.0f}% of the last interval, the "
            f"accelerator idle |") in md
    prompts = evaluation.load_prompt_file(evaluation.SUITE)["prompts"]
    for i, p in enumerate(prompts):
        assert f"### {i + 1}. [{p['kind']}] {p['text'].splitlines()[0]}" in md
    # One metrics row per model and decoding, with the numbers report.json holds.
    models = made["json"]["comparison"]["models"]
    assert [m["name"] for m in models] == made["models"]
    for m in models:
        for decoding, vals in m["metrics"].items():
            row = (f"| {m['name']} | {m['step'] if m['step'] is not None else '–'} | "
                   f"{m['params']:,} | {decoding} | {vals['coherence_ppl']:.2f} | "
                   f"{vals['pmi']:+.3f} |")
            assert row in md, row
            assert len(m["generations"][decoding]) == len(prompts)
            assert 0 <= vals["distinct_1"] <= 1 and vals["coherence_ppl"] > 1
        assert 0 <= m["cloze"]["accuracy"] <= 1 and 1 <= m["cloze"]["mean_rank"] <= 4
    # A benchmarks table per task: one row per model, the numbers report.json holds.
    assert "## Benchmarks" in md
    benchmarks = made["json"]["benchmarks"]
    assert [b["task"] for b in benchmarks] == ["hellaswag", "lambada"]
    for b in benchmarks:
        assert [r["model"] for r in b["results"]] == made["models"]
        for r in b["results"]:
            assert r["examples"] == 3 and 0 <= r["acc"] <= 1
            assert f"| {r['model']} | " in md and f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}" in md


@pytest.mark.slow
def test_plots_are_valid_pngs_and_the_html_embeds_them(made):
    import matplotlib.image
    names = ("loss", "perplexity", "learning_rate", "throughput")
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", made["html"])
    assert len(embedded) == len(names)
    for name, b64 in zip(names, embedded):
        path = os.path.join(made["out"], "plots", f"{name}.png")
        png = pathlib.Path(path).read_bytes()
        assert png.startswith(PNG_MAGIC) and base64.b64decode(b64) == png
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 100 and img.shape[1] > 100 and np.ptp(img) > 0
        assert f"![{name}](plots/{name}.png)" in made["md"]
    assert "src='http" not in made["html"] and "<script" not in made["html"]


def _events(workdir):
    """(tag, step, value or text) of every summary in the run's TensorBoard event files."""
    from tensorboardX.proto import event_pb2
    out = []
    for name in sorted(os.listdir(workdir)):
        if not name.startswith("events.out.tfevents"):
            continue
        raw = pathlib.Path(workdir, name).read_bytes()
        pos = 0
        while pos < len(raw):   # TFRecord: u64 length, u32 crc, data, u32 crc
            (n,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
            pos += 16 + n
            for v in event.summary.value:
                text = v.tensor.string_val[0].decode() if v.tensor.string_val else None
                out.append((v.tag, event.step, text if text is not None else v.simple_value))
    return out


@pytest.mark.slow
def test_tensorboard_events_mirror_the_metrics(runs):
    events = _events(runs["a"])
    train_recs, eval_recs = _records(runs["a"])
    loss = {step: v for tag, step, v in events if tag == "train/loss"}
    assert sorted(loss) == [r["step"] for r in train_recs]
    for r in train_recs:
        np.testing.assert_allclose(loss[r["step"]], r["loss"], rtol=1e-6)
    val = {step: v for tag, step, v in events if tag == "eval/val_ppl"}
    assert sorted(val) == [r["step"] for r in eval_recs]
    samples = [v for tag, _, v in events if tag.startswith("samples")]
    assert samples and "--- samples @ step 6 ---" in samples[-1]


@pytest.mark.slow
def test_report_on_a_run_still_training_reads_what_exists(runs, tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    lines = pathlib.Path(runs["a"], "metrics.jsonl").read_text().splitlines()
    # Two complete records, then one caught half-written; no checkpoint yet.
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:25])
    out = tmp_path / "out"
    assert report.main(["--workdir", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    first = json.loads(lines[1])
    assert "in progress" in md and f"| step | {first['step']} / 6 |" in md
    assert "has no checkpoint yet" in md and "| ETA |" in md
    assert (out / "plots" / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_bad_run_directories_give_a_clear_message_and_keep_an_old_report(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("old report")
    cases = {str(tmp_path / "missing"): "does not exist"}
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[str(empty)] = "metrics.jsonl does not exist"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "lo\n'
                                          '{"step": 3, "loss": 1}\n')
    cases[str(broken)] = "metrics.jsonl:2: not a JSON metrics record"
    evals_only = tmp_path / "evals_only"
    evals_only.mkdir()
    (evals_only / "metrics.jsonl").write_text('{"step": 1, "val_loss": 2, "val_ppl": 7}\n')
    cases[str(evals_only)] = "has no training records yet"
    for workdir, message in cases.items():
        assert report.main(["--workdir", workdir, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert (out / "report.md").read_text() == "old report"
    assert sorted(os.listdir(out)) == ["report.md"]
    # A bad benchmark file or name stops the report before any model is loaded.
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n')
    (tmp_path / "hs.jsonl").write_text('{"ctx_a": "no endings"}\n')
    for spec, message in ((f"hellaswag={tmp_path / 'hs.jsonl'}", "hs.jsonl:1: not a HellaSwag"),
                          (f"lambada={tmp_path / 'none.jsonl'}", "none.jsonl"),
                          ("mmlu", "unknown task 'mmlu'")):
        assert report.main(["--workdir", str(broken), "--out", str(out), "--tasks", spec]) == 2
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["report.md"]


@pytest.mark.slow
def test_eval_command_per_source_perplexity(runs, tmp_path, capsys):
    text = pathlib.Path(runs["corpus"]).read_text()
    records = [{"text": text[i * 3000:(i + 1) * 3000],
                "meta": {"redpajama_set_name": name}}
               for i, name in enumerate(["RedPajamaBook", "RedPajamaGithub", "RedPajamaBook"])]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "ppl.json"
    assert evaluation.main(["--checkpoint", runs["a"], "--data", str(path), "--context", "32",
                            "--stride", "16", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    names = ("RedPajamaBook", "RedPajamaGithub")
    tokens = sum(got[f"tokens/{n}"] for n in names)
    assert got["tokens"] == tokens
    nll = sum(got[f"loss/{n}"] * got[f"tokens/{n}"] for n in names)
    np.testing.assert_allclose(got["loss"], nll / tokens, rtol=1e-9)
    np.testing.assert_allclose(got["ppl"], math.exp(got["loss"]), rtol=1e-9)
    printed = capsys.readouterr().out
    assert "RedPajamaGithub" in printed and f"{got['ppl']:.2f}" in printed
    assert evaluation.main(["--checkpoint", str(tmp_path / "nope"), "--data", str(path)]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_html_renders_in_headless_chromium(made, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    shot = tmp_path / "shot.png"
    url = "file://" + os.path.join(made["out"], "report.html")
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--window-size=1200,1600",
                           "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", url],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CONSOLE" not in proc.stderr and "Uncaught" not in proc.stderr
    import matplotlib.image
    img = matplotlib.image.imread(str(shot))
    assert img.shape[:2] == (1600, 1200)
    assert img[..., :3].std() > 0.05   # text, tables and plots, not a blank page


@pytest.mark.slow
def test_a_model_spec_can_name_an_earlier_checkpoint(runs):
    assert evaluation.load_lm(runs["a"] + "@3").step == 3
    assert evaluation.load_lm(runs["a"]).step == 6
    with pytest.raises(FileNotFoundError,
                       match=r"no checkpoint at step 9 in .* \(steps: \[3, 6\]\)"):
        evaluation.load_lm(runs["a"] + "@9")


@pytest.mark.slow
def test_training_on_a_mixture_logs_validation_per_source(shared_data, tmp_path):
    from configs import slimpajama
    config = slimpajama.get_config()
    config.model.n_layer, config.model.n_head, config.model.n_embd = 2, 4, 48
    config.model.n_positions, config.model.vocab_size = 64, 512
    config.data.tokenizer = "sentencepiece"
    config.data.path, config.data.block_size = f"{shared_data}/slimpajama-sample", 32
    config.train.steps, config.train.batch_size, config.train.log_every = 2, 8, 1
    config.train.grad_accum = 1
    config.eval.every, config.eval.batch_size, config.eval.batches = 2, 8, 2
    config.checkpoint.every, config.sample.max_new_tokens = 2, 0
    train.train_and_evaluate(config, str(tmp_path / "run"))
    (ev,) = _records(str(tmp_path / "run"))[1]
    names = [k.split("/", 1)[1] for k in ev if k.startswith("val_tokens/")]
    assert set(names) == {"RedPajamaBook", "RedPajamaWikipedia"}
    tokens = sum(ev[f"val_tokens/{n}"] for n in names)
    assert ev["val_tokens"] == tokens == 2 * 2 * 8 * 32   # eval.batches per source
    nll = sum(ev[f"val_loss/{n}"] * ev[f"val_tokens/{n}"] for n in names)
    np.testing.assert_allclose(ev["val_loss"], nll / tokens, rtol=1e-9)


def test_a_stream_of_unknown_length_reports_its_pass_and_documents():
    record = {"step": 5, "total_steps": 10, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0,
              "tokens_per_s": 1000.0, "samples_per_s": 10.0, "eta_s": 5.0, "time": 0.0}
    line = report.progress_line(record | {"epoch": 1.0, "pass_documents": 155908})
    assert "| pass 2, 155,908 docs |" in line and "epochs" not in line
    assert "| ~0.37 epochs |" in report.progress_line(record | {"epoch": 0.37})
    rows = dict(report.status_rows([record | {"epoch": 1.0, "pass_documents": 155908}], [],
                                   now=0.0))
    assert rows["epochs completed"] == ("1 (the stream's length is unknown: 155,908 "
                                        "documents into pass 2)")


# --- Fast checks on synthetic metrics: no training -----------------------------------------


def _train_record(step, time, total=40):
    return {"step": step, "total_steps": total, "loss": 5.0 - step / 100, "grad_norm": 1.0,
            "lr": 1e-3, "tokens_per_s": 1000.0, "samples_per_s": 10.0, "epoch": step / 100,
            "eta_s": 1.0, "time": time}


def _write_run(path, records) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


START = {"step": 0, "data": {"tokens": {"train": {"text": 100}}}}   # train.py, at each start


def test_wall_time_sums_the_spans_of_each_start(tmp_path):
    # First start: records at t = 100..112; stopped; resumed at t = 1000: records 1000..1020.
    records = ([START] + [_train_record(s, 100 + 4 * i) for i, s in enumerate((5, 10, 15, 20))]
               + [{"step": 20, "val_loss": 4.0, "val_ppl": 54.6, "val_tokens": 10.0}]
               + [{**START, "step": 20}]
               + [_train_record(s, 1000 + 10 * i) for i, s in enumerate((21, 30, 40))])
    train_recs, evals, starts = report.read_metrics(_write_run(tmp_path / "run", records),
                                                    with_starts=True)
    assert starts == [0, 4] and len(train_recs) == 7 and len(evals) == 1
    rows = dict(report.status_rows(train_recs, evals, now=1020.0, starts=starts))
    assert rows["wall time logged"] == (
        "0m32s over 2 starts (the time stopped between them not counted)")   # 12 + 20 s
    one = dict(report.status_rows(train_recs[:4], evals, now=112.0, starts=[0]))
    assert one["wall time logged"] == "0m12s"
    assert report.read_metrics(str(tmp_path / "run")) == (train_recs, evals)


def test_an_in_training_benchmark_row_names_its_example_count():
    e = {"step": 20, "val_loss": 4.0, "val_ppl": 54.6, "val_tokens": 10.0,
         "hellaswag/acc": 0.3256, "hellaswag/acc_norm": 0.3488, "hellaswag/examples": 43}
    rows = dict(report.status_rows([_train_record(20, 0.0)], [e], now=0.0))
    assert rows["hellaswag"] == "acc 0.3256 acc_norm 0.3488 on 43 examples @ step 20"
    assert report.eval_line(e).endswith("| hellaswag acc 0.3256 acc_norm 0.3488 (43 examples)")


def test_all_checkpoints_unreadable_gives_the_no_checkpoint_report(tmp_path):
    run = _write_run(tmp_path / "run", [START] + [_train_record(s, float(s)) for s in (5, 10)])
    for step in ("5", "10"):   # step folders none of which holds a checkpoint
        (tmp_path / "run" / "checkpoints" / step).mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / step / "junk").write_text("x")
    before = helpers.tree_hash(tmp_path / "run" / "checkpoints")
    out = tmp_path / "out"
    assert report.main(["--workdir", run, "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| step | 10 / 40 |" in md and "## Training curves" in md
    assert "has checkpoints but none could be loaded (no readable checkpoint in" in md
    assert (out / "plots" / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert helpers.tree_hash(tmp_path / "run" / "checkpoints") == before


def test_report_json_is_strict_json(tmp_path):
    # One example: no standard error (NaN); a log-likelihood of -inf: ppl inf.
    lambada = {"task": "lambada", "data": "lb.jsonl", "results": [
        {"model": "m", "step": None, "examples": 1, "acc": 0.0, "acc_stderr": math.nan,
         "ppl": math.inf}]}
    r = report.Report(run="r", generated="now", n_records=1, status=[("state", "x")],
                      plots={}, comparison=None, notes=[], benchmarks=[lambada])
    report.write_report(r, str(tmp_path))

    def strict(name):
        raise ValueError(f"bare {name} in report.json")
    doc = json.loads((tmp_path / "report.json").read_text(), parse_constant=strict)
    assert doc["benchmarks"][0]["results"] == [
        {"model": "m", "step": None, "examples": 1, "acc": 0.0, "acc_stderr": None,
         "ppl": None}]
    assert "0.0000 ± nan" in (tmp_path / "report.html").read_text()   # tables keep "nan"


@pytest.mark.parametrize("flags,message", [
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1, got 0"),
    (["--temperature=0"], "--temperature=0 is greedy: set --top_k=0 too"),
    (["--temperature=-1"], "--temperature must be a number >= 0, got -1.0"),
    (["--top_k=-2"], "--top_k must be >= 0 (0 = off), got -2"),
    (["--compare=hf:"], "--compare='hf:' names no HF model"),
    (["--compare=runs/x,hf:"], "--compare='hf:' names no HF model"),
    (["--scorer=hf:"], "--scorer='hf:' names no HF model")])
def test_generation_and_model_flags_are_checked_before_any_model_loads(
        tmp_path, monkeypatch, capsys, flags, message):
    def no_loading(spec):
        raise AssertionError(f"loaded {spec} before checking the flags")
    monkeypatch.setattr(evaluation, "load_lm", no_loading)
    run = _write_run(tmp_path / "run", [_train_record(5, 0.0)])
    (tmp_path / "run" / "checkpoints" / "5").mkdir(parents=True)
    assert report.main(["--workdir", run, "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()
