"""Bad input to the commands is one `error:` line and a non-zero exit, never a traceback:
config files and overrides, workdirs, tokenizer files, vocabulary sizes, --models, --out."""

import errno
import json
import os

import pytest

from jaxgpt import config as config_schema
from jaxgpt import main, report, tasks, tokenizer, train
from tests import helpers


def _exit_line(capsys, call) -> str:
    """Run `call`, which must exit with status 2; returns its one stderr line."""
    with pytest.raises(SystemExit) as exited:
        call()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# --config: the file, its size and the overrides, checked before absl parses the flags.

@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=5"], '--config.train.stepz: no such field (did you mean "steps"?)'),
    (["--config.trian.steps=5"], '--config.trian.steps: no such field (did you mean "train"?)'),
    (["--config.train.steps.x=5"], "--config.train.steps.x: train.steps is a value"),
])
def test_misspelled_override_names_the_field(args, message, capsys, monkeypatch):
    monkeypatch.chdir(helpers.REPO)
    line = _exit_line(capsys, lambda: config_schema.parse_flags(
        ["main", "--config=configs/default.py", "--workdir=/tmp/x", *args]))
    assert line.startswith(f"error: {message}"), line


@pytest.mark.parametrize("spec, message", [
    ("configs/nope.py", "config file configs/nope.py does not exist (configs holds default.py, "),
    ("configs/slimpajama.py:huge",
     "configs/slimpajama.py:huge: unknown model size 'huge'; choose one of tiny, mini, small, "),
    ("configs/default.py:small", "configs/default.py:small: config file configs/default.py"),
])
def test_bad_config_file_or_size_is_one_line(spec, message, capsys, monkeypatch):
    monkeypatch.chdir(helpers.REPO)
    for flag in ([f"--config={spec}"], ["--config", spec]):
        line = _exit_line(capsys, lambda flag=flag: config_schema.parse_flags(
            ["main", *flag, "--workdir=/tmp/x", "--config.train.steps=3"]))
        assert line.startswith(f"error: {message}"), line


def test_good_config_and_overrides_pass_the_checks(monkeypatch):
    monkeypatch.chdir(helpers.REPO)
    config_schema.check_config_args(["--config=configs/slimpajama.py:medium", "--workdir=w",
                             "--config.data.mixture.RedPajamaGithub=10",
                             "--noconfig.data.streaming", "--config.sample.prompts[0]=x"])
    config = config_schema.load_file("configs/wikitext.py:xl")
    assert config.model.n_layer == 48


# The workdir: created by train_and_evaluate; a path that cannot be one is the user's input.

def _train_exit_line(capsys, config, workdir) -> str:
    line = _exit_line(capsys, lambda: main._train(config, str(workdir)))
    assert line.startswith("error: ")
    return line


def test_workdir_under_a_file(tmp_path, capsys):
    config = helpers.tiny_run_config(helpers.small_corpus(tmp_path))
    (tmp_path / "one.txt").write_text("a file\n")
    line = _train_exit_line(capsys, config, tmp_path / "one.txt" / "sub")
    assert line == (f"error: workdir {tmp_path}/one.txt/sub cannot be created: "
                    f"{tmp_path}/one.txt is a file, not a directory")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs")
def test_workdir_where_nothing_can_be_created(tmp_path, capsys):
    config = helpers.tiny_run_config(helpers.small_corpus(tmp_path))
    line = _train_exit_line(capsys, config, "/sys/jaxgpt-run")
    assert line.startswith("error: workdir /sys/jaxgpt-run cannot be created: ")


def test_only_os_errors_about_the_workdir_are_the_users():
    assert main._workdir_error(PermissionError(errno.EACCES, "Permission denied", "/r/w/LOCK"),
                               "/r/w") == ("workdir /r/w cannot be locked: Permission denied "
                                           "(/r/w/LOCK)")
    assert "(/r)" in main._workdir_error(PermissionError(errno.EPERM, "Not permitted", "/r"),
                                         "/r/w")
    for other in ("/r/w/checkpoints/3", "/elsewhere", None):
        assert main._workdir_error(OSError(errno.EIO, "I/O error", other), "/r/w") is None


# Tokenizer files and sizes.

def test_a_file_that_is_no_sentencepiece_model_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match=f"{bad} is not a SentencePiece model"):
        tokenizer.load("sentencepiece", str(bad))
    with pytest.raises(ValueError, match=f"{tmp_path} is a directory"):
        tokenizer.load("sentencepiece", str(tmp_path))
    corpus = helpers.small_corpus(tmp_path)
    line = _train_exit_line(capsys, helpers.tiny_run_config(
        corpus, data__tokenizer_path=str(bad)), tmp_path / "run")
    assert line == f"error: {bad} is not a SentencePiece model"
    (tmp_path / "run2").mkdir()   # a run's own cached model, corrupt
    (tmp_path / "run2" / "tokenizer.model").write_bytes(b"\x00" * 64)
    line = _train_exit_line(capsys, helpers.tiny_run_config(corpus), tmp_path / "run2")
    assert line == f"error: {tmp_path}/run2/tokenizer.model is not a SentencePiece model"


def test_vocab_size_below_what_the_corpus_needs(tmp_path, capsys):
    text = "Only a few distinct characters: abc def, xyz!\n" * 50
    with pytest.raises(ValueError, match=r"model.vocab_size=100 is too small .* >= \d+") as e:
        tokenizer.train_sentencepiece([text], 100)
    least = int(str(e.value).rsplit(">= ", 1)[1])
    assert 256 < least < 300   # bytes, specials and the text's characters
    tokenizer.train_sentencepiece([text], least)    # the bound is exact
    with pytest.raises(ValueError, match=f">= {least}"):
        tokenizer.train_sentencepiece([text], least - 1)
    with pytest.raises(ValueError, match=r"model.vocab_size=5000 is too large .* at most \d+"):
        tokenizer.train_sentencepiece([text], 5000)
    line = _train_exit_line(capsys, helpers.tiny_run_config(
        helpers.small_corpus(tmp_path), model__vocab_size=100), tmp_path / "run")
    assert "model.vocab_size=100 is too small" in line
    out = tmp_path / "sp.model"
    line = _exit_line(capsys, lambda: tokenizer._train_main(
        ["train", f"--input={helpers.small_corpus(tmp_path)}", "--vocab_size=100",
         f"--out={out}"]))
    assert "--vocab_size=100 is too small" in line and not out.exists()


# python -m jaxgpt.tasks / jaxgpt.report

def test_tasks_without_models_is_an_error(tmp_path, capsys):
    data = tmp_path / "hs.jsonl"
    data.write_text(json.dumps({"activity_label": "Roof", "ctx_a": "A man is on a roof.",
                                "ctx_b": "he", "label": 0, "endings": ["a", "b", "c", "d"]}))
    for models in ("", ",,"):
        line = _exit_line(capsys, lambda models=models: tasks.main(
            ["--task=hellaswag", f"--models={models}", f"--data={data}"]))
        assert f"--models={models!r} names no model" in line
    line = _exit_line(capsys, lambda: tasks.main(
        ["--task=hellaswag", "--models=a", f"--data={data}", f"--out={tmp_path}"]))
    assert f"--out {tmp_path} is a directory" in line


def test_report_checks_out_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the report was built before --out was checked")
    monkeypatch.setattr(report, "build_report", no_work)
    (tmp_path / "one.txt").write_text("a file\n")
    for out, message in ((tmp_path / "one.txt", f"{tmp_path}/one.txt is a file, not a dir"),
                         (tmp_path / "one.txt" / "sub", f"{tmp_path}/one.txt is a file, so")):
        line = _exit_line(capsys, lambda out=out: report.main(
            ["--workdir", str(tmp_path), "--out", str(out)]))
        assert f"--out {out}: {message}" in line


def test_the_shards_command_checks_its_config_flags_too(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "jaxgpt.shards", "prepare",
                          "--config=configs/default.py", "--config.data.pathz=x",
                          f"--out={tmp_path / 'shards'}"], cwd=helpers.REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == 'error: --config.data.pathz: no such field (did you mean "path"?)'
    assert not (tmp_path / "shards").exists()


def test_init_from_needs_gpt2_bpe_ids(tmp_path):
    """GPT-2's embedding rows belong to GPT-2 BPE ids: under another tokenizer they would be
    used for unrelated tokens (a padded vocabulary even hides the size difference)."""
    config = helpers.tiny_run_config(helpers.small_corpus(tmp_path))
    config.init_from = "hf:gpt2"
    with pytest.raises(ValueError, match="init_from='hf:gpt2' loads GPT-2's embeddings, rows "
                                         "of GPT-2 BPE ids, but data.tokenizer is "
                                         "'sentencepiece': set data.tokenizer=gpt2"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
