"""configs/slimpajama.py and configs/wikitext.py train end to end on the shared samples
(tiny model) and a resumed run equals an uninterrupted one bitwise."""

import importlib.util
import json
import os

import jax
import pytest
import zstandard

from jaxgpt import tokenizer, train
from tests import helpers


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs here compile the same steps again and again; a persistent cache makes the
    repeats ~10x cheaper. Reset afterwards so later tests see JAX as it was."""
    from jax._src import compilation_cache as cc  # reset_cache is documented, not exported
    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jit")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    cc.reset_cache()


def _config(name: str, path: str, steps: int, gpt2_files: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(helpers.REPO, "configs",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.n_layer, config.model.n_head, config.model.n_embd = 2, 4, 48
    config.model.n_positions = 64
    if gpt2_files:     # the config's own GPT-2 BPE and 50304-row embedding
        config.data.tokenizer_path = gpt2_files
    else:              # a 512-piece SentencePiece keeps the model tiny
        config.data.tokenizer, config.model.vocab_size = "sentencepiece", 512
    config.data.path, config.data.block_size = path, 32
    config.train.steps, config.train.batch_size, config.train.grad_accum = steps, 8, 1
    config.train.log_every = 1
    config.optim.warmup_steps, config.optim.decay_steps = 1, 4   # one schedule for all runs
    config.eval.every, config.eval.batch_size, config.eval.batches = 4, 8, 1
    config.checkpoint.every = 2
    config.sample.max_new_tokens = 0
    return config


def _straight_and_resumed(tmp_path, name, path, gpt2_files=None, **changes):
    runs = {}
    for run, steps in (("a", [4]), ("b", [2, 4])):
        for n in steps:
            config = _config(name, path, n, gpt2_files)
            for key, value in changes.items():
                config.data[key] = value
            runs[run] = train.train_and_evaluate(config, str(tmp_path / run))
    helpers.assert_trees_close(jax.device_get(runs["a"]["state"]),
                               jax.device_get(runs["b"]["state"]), rtol=0, atol=0)
    assert runs["a"]["train"]["loss"] == runs["b"]["train"]["loss"]
    return runs


@pytest.mark.slow
def test_slimpajama_config_trains_skips_bad_records_and_resumes_exactly(shared_data,
                                                                       tmp_path):
    # The sample plus one malformed file, in SlimPajama's layout.
    root = tmp_path / "slimpajama"
    for split in ("train", "validation"):
        src = os.path.join(shared_data, "slimpajama-sample", split, "chunk1")
        (root / split / "chunk1").mkdir(parents=True)
        for f in os.listdir(src):
            os.symlink(os.path.join(src, f), root / split / "chunk1" / f)
    good = b'{"text": "ok", "meta": {"redpajama_set_name": "RedPajamaBook"}}\n'
    (root / "train" / "chunk1" / "example_train_9.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(good + b'{"text": 3}\n'))
    runs = _straight_and_resumed(tmp_path, "slimpajama", str(root), on_bad_record="skip")
    assert runs["a"]["eval"]["val_loss"] < 6.3               # below uniform over 512 pieces
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    stats = next(r["data"] for r in records if "data" in r)
    assert stats["bad_records"] == {"no_text": 1}
    assert set(stats["tokens"]["train"]) == {"RedPajamaBook", "RedPajamaWikipedia"}
    assert any("epoch" in r and r["epoch"] > 0 for r in records)
    assert tokenizer.SentencePiece.load(str(tmp_path / "a" / "tokenizer.model")).vocab_size == 512


@pytest.mark.slow
def test_wikitext_config_trains_with_gpt2_bpe_and_resumes_exactly(shared_data, tmp_path):
    runs = _straight_and_resumed(tmp_path, "wikitext", os.path.join(shared_data, "wikitext-2"),
                                 gpt2_files=os.path.join(shared_data, "gpt2-bpe"))
    assert runs["b"]["train"]["step"] == 4
    assert runs["a"]["eval"]["val_loss"] < 10.83             # below uniform over 50257 ids
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    stats = [r["data"] for r in records if "data" in r]
    assert len(stats) == 2 and stats[0]["documents"]["train"] == {"wikitext": 60}


@pytest.mark.slow
def test_slimpajama_streams_without_preparing_train_and_resumes_exactly(shared_data, tmp_path):
    path = os.path.join(shared_data, "slimpajama-sample")
    runs = _straight_and_resumed(tmp_path, "slimpajama", path, streaming=True,
                                 shuffle_windows=16, mixture={})
    assert runs["a"]["eval"]["val_loss"] < 6.3               # below uniform over 512 pieces
    assert runs["b"]["train"]["step"] == 4 and runs["b"]["train"]["epoch"] >= 0
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    stats = next(r["data"] for r in records if "data" in r)
    assert set(stats["tokens"]) == {"val"}                   # train was never prepared
    (cache,) = os.listdir(tmp_path / "a" / "data")
    assert cache.startswith("val-")
