"""Shared test utilities."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_trees_close(a, b, **tol):
    """Compare pytrees leaf by leaf; a failure names the leaf's path."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                   err_msg=jax.tree_util.keystr(path), **tol)


def small_corpus(tmp_path) -> str:
    """A ~100 KB real-text corpus (argparse's source) copied into tmp_path; returns its path."""
    src = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
    dst = tmp_path / "corpus.txt"
    dst.write_bytes(pathlib.Path(src).read_bytes())
    return str(dst)


def tiny_run_config(corpus: str, **changes):
    """The default config shrunk to a seconds-long run on `corpus`."""
    from configs import default  # imported from the repo root on sys.path
    config = default.get_config()
    config.model.n_layer, config.model.n_head, config.model.n_embd = 2, 2, 32
    config.model.vocab_size, config.model.n_positions = 384, 64
    config.data.path, config.data.block_size = corpus, 32
    config.train.steps, config.train.batch_size, config.train.log_every = 6, 8, 2
    config.eval.every, config.eval.batch_size, config.eval.batches = 3, 8, 2
    config.checkpoint.every = 3
    config.sample.max_new_tokens = 8
    for name, value in changes.items():
        group, field = name.split("__")
        config[group][field] = value
    return config


def run_main(*args, env=None, timeout=240):
    """Run `python -m jaxgpt.main ARGS` from the repo root; returns CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "jaxgpt.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          check=False)


def tree_hash(path) -> str:
    """A hash of every file's relative path and bytes under `path` (to prove nothing changed)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            h.update(pathlib.Path(full).read_bytes())
    return h.hexdigest()


def byte_level_bpe(directory) -> str:
    """A GPT-2 BPE tokenizer with no merges (vocab.json + merges.txt in `directory`): the 256
    byte symbols GPT-2's vocabulary starts with, in its order, then <|endoftext|> = 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):   # GPT-2's bytes_to_unicode: unprintable bytes map past 255
        chars[b] = chr(b) if b in printable else chr(256 + extra)
        extra += b not in printable
    vocab = {chars[b]: i for i, b in enumerate(printable + [b for b in range(256)
                                                            if b not in printable])}
    vocab["<|endoftext|>"] = 256
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return str(directory)
