"""The main job end to end in a subprocess, every config file, and bad input."""

import glob
import json
import os

import pytest
from flax import nnx
from ml_collections import config_flags  # noqa: F401  (the loader main.py uses)

from jaxgpt import model
from tests import helpers

TINY = ["--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=32",
        "--config.model.vocab_size=384", "--config.model.n_positions=64",
        "--config.data.block_size=32", "--config.train.steps=6", "--config.train.batch_size=8",
        "--config.train.log_every=2", "--config.eval.every=3", "--config.eval.batch_size=8",
        "--config.eval.batches=2", "--config.checkpoint.every=3",
        "--config.sample.max_new_tokens=8"]


def _config_files():
    return sorted(glob.glob(os.path.join(helpers.REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", [p for p in _config_files() if "__init__" not in p],
                         ids=os.path.basename)
def test_every_config_loads_and_builds_a_model(path):
    from ml_collections.config_flags import config_flags as cf
    sizes = ["small", "medium"] if "default" not in path else [None]
    for size in sizes:
        config = cf._LoadConfigModule("config", path).get_config(
            *([size] if size else []))
        cfg = model.GPTConfig(**config.model)
        abstract = nnx.eval_shape(lambda cfg=cfg: model.GPT(cfg, rngs=nnx.Rngs(0)))
        assert model.count_params(nnx.state(abstract, nnx.Param)) > 0
        assert config.data.block_size <= cfg.n_positions


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path):
    corpus = helpers.small_corpus(tmp_path)
    workdir = tmp_path / "run"
    cache = tmp_path / "xla"
    env = {"JAX_COMPILATION_CACHE_DIR": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = helpers.run_main("--config=configs/default.py", f"--workdir={workdir}",
                            f"--config.data.path={corpus}", *TINY,
                            f"--config.train.compilation_cache={cache}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"compilation cache {cache}" in proc.stderr
    assert any(n.startswith("jit_train_step-") for n in os.listdir(cache))   # kept for reruns
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert train_records[-1]["step"] == 6 and evals[-1]["step"] == 6
    assert evals[-1]["val_ppl"] > 1
    for key in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "epoch", "eta_s"):
        assert key in train_records[-1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    samples = (workdir / "samples.txt").read_text()
    assert "samples @ step 6" in samples and "class Parser" in samples
    assert "val ppl" in proc.stderr and "step 6/6" in proc.stderr


def test_typo_in_override_is_rejected():
    proc = helpers.run_main("--config=configs/default.py", "--workdir=/nonexistent/x",
                            "--config.train.stpes=3")
    assert proc.returncode == 2
    assert proc.stderr == 'error: --config.train.stpes: no such field (did you mean "steps"?)\n'


def test_workdir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "one.txt").write_text("a file\n")
    proc = helpers.run_main("--config=configs/default.py", f"--workdir={tmp_path}/one.txt/sub",
                            f"--config.data.path={helpers.small_corpus(tmp_path)}", *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (f"error: workdir {tmp_path}/one.txt/sub cannot be "
                                            f"created: {tmp_path}/one.txt is a file, not a "
                                            f"directory")


def _bad(tmp_path, *args, env=None):
    """Run main on an existing run's workdir with bad args; the workdir must not change."""
    workdir = tmp_path / "run"
    workdir.mkdir(exist_ok=True)
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    before = helpers.tree_hash(workdir)
    proc = helpers.run_main("--config=configs/default.py", f"--workdir={workdir}", *TINY,
                            *args, env=env)
    assert proc.returncode != 0
    assert helpers.tree_hash(workdir) == before, "bad input changed the workdir"
    return proc.stderr


def test_missing_data_path(tmp_path):
    err = _bad(tmp_path, f"--config.data.path={tmp_path}/nope.txt")
    assert "nope.txt" in err and "does not exist" in err


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    err = _bad(tmp_path, f"--config.data.path={tmp_path}/empty.txt")
    assert "corpus is empty" in err and "empty.txt" in err


def test_non_utf8_corpus_names_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\n\xff\xfe oops\n")
    err = _bad(tmp_path, f"--config.data.path={tmp_path}/bad.txt")
    assert "bad.txt:3" in err and "UTF-8" in err


def test_block_size_above_context(tmp_path):
    err = _bad(tmp_path, f"--config.data.path={helpers.small_corpus(tmp_path)}",
               "--config.data.block_size=65")
    assert "block_size 65" in err and "n_positions=64" in err


def test_batch_not_divisible_by_devices(tmp_path):
    err = _bad(tmp_path, f"--config.data.path={helpers.small_corpus(tmp_path)}",
               "--config.train.batch_size=12", "--config.eval.batch_size=16",
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert "micro-batch 12" in err and "8 devices" in err


def test_unknown_data_source(tmp_path):
    err = _bad(tmp_path, "--config.data.source=slimpjama")
    assert "slimpjama" in err and "data.source must be one of" in err


def test_an_unreachable_hub_dataset_is_one_line(tmp_path):
    err = _bad(tmp_path, "--config.data.source=slimpajama",
               env={"HF_HUB_OFFLINE": "1"})
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "error: Couldn't reach 'cerebras/SlimPajama-627B' on the Hub")
    assert "point data.path, data.tokenizer_path or init_from at local files" in err
