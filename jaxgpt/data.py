"""Input pipelines: text sources -> tokens -> packed `block_size + 1` windows -> batches.

A source yields documents (strings). Documents are tokenized, joined with the tokenizer's
end-of-text id, split into train/validation token streams, and packed by
concatenate-and-split: window i is tokens[i*T : i*T + T + 1], so inputs are window[:-1] and
targets window[1:] and no target crosses into another window's inputs. Training batches
come from a grain `MapDataset` (seeded shuffle, reshuffled every epoch) whose iterator state
is a position that `checkpoint.py` saves for exact resume.
"""

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sysconfig

import grain
import numpy as np

SOURCES = ("text", "wikitext", "slimpajama")
_STDLIB_SKIP = ("test", "tests", "idle_test", "site-packages", "__pycache__")


def default_corpus_files() -> list[str]:
    """The running interpreter's standard-library sources (tests excluded): ~12 MB of real
    text that every Python installation has, so the default run needs no download."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        parts = os.path.relpath(path, root).split(os.sep)
        if not any(p in _STDLIB_SKIP or p.startswith("test_") for p in parts):
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    return files


def resolve_paths(path: str) -> list[str]:
    """A file, a directory (all files below it) or a glob -> sorted list of files."""
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(p))
    elif any(c in path for c in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"data.path {path!r} does not exist")
    if not files:
        raise FileNotFoundError(f"data.path {path!r} matches no files")
    return files


def read_text_files(files: list[str]) -> list[str]:
    """One document per file; non-UTF-8 bytes are an error naming the file and line."""
    docs = []
    for path in files:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            docs.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})"
                             ) from None
    if not any(d.strip() for d in docs):
        raise ValueError(f"the corpus is empty: {len(files)} file(s) hold no text "
                         f"(first: {files[0]})")
    return docs


def tokenize_documents(docs: list[str], tokenizer) -> np.ndarray:
    """Encode documents and join them, each followed by the end-of-text id."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    pieces = []
    for ids in tokenizer.encode_batch(docs):
        pieces.append(np.asarray(ids, dtype))
        pieces.append(np.asarray([tokenizer.eot_id], dtype))
    tokens = np.concatenate(pieces)
    if tokens.size and int(tokens.max()) >= tokenizer.vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {tokenizer.vocab_size}")
    return tokens


def pack_windows(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """[N] tokens -> [W, block_size + 1] windows overlapping by one token (a strided view)."""
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of block_size "
                         f"{block_size} + 1")
    return np.lib.stride_tricks.as_strided(
        tokens, shape=(n_windows, block_size + 1),
        strides=(tokens.strides[0] * block_size, tokens.strides[0]), writeable=False)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Packed train/validation windows and where they came from."""

    train: np.ndarray          # [W_train, block_size + 1]
    val: np.ndarray            # [W_val, block_size + 1]
    n_train_tokens: int
    n_val_tokens: int
    fingerprint: str           # sources + tokenizer: changes when the token stream would


def split_tokens(tokens: np.ndarray, val_fraction: float, block_size: int):
    """Hold out the last `val_fraction` of the token stream (at least one window)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(int(len(tokens) * val_fraction), block_size + 1)
    if len(tokens) - n_val < block_size + 1:
        raise ValueError(f"the corpus has {len(tokens)} tokens: too few for block_size "
                         f"{block_size} with a validation split of {val_fraction}")
    return tokens[:-n_val], tokens[-n_val:]


def sources_fingerprint(files: list[str], tokenizer_fingerprint: str) -> str:
    h = hashlib.sha256(tokenizer_fingerprint.encode())
    for path in files:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def load_text_corpus(files: list[str], docs: list[str], tokenizer, *, block_size: int,
                     val_fraction: float, cache_dir: str | None = None) -> Corpus:
    """Tokenize (or load the cached tokens of) `docs` and pack train/val windows."""
    fingerprint = sources_fingerprint(files, tokenizer.fingerprint)
    cache = cache_dir and os.path.join(cache_dir, f"tokens-{fingerprint}.npy")
    if cache and os.path.exists(cache):
        tokens = np.load(cache)
    else:
        tokens = tokenize_documents(docs, tokenizer)
        if cache:
            os.makedirs(cache_dir, exist_ok=True)
            with open(cache + ".tmp", "wb") as f:
                np.save(f, tokens)
            os.replace(cache + ".tmp", cache)
            with open(os.path.join(cache_dir, f"tokens-{fingerprint}.json"), "w") as f:
                json.dump({"tokenizer": tokenizer.fingerprint, "n_tokens": int(tokens.size),
                           "files": files}, f, indent=1)
    train, val = split_tokens(tokens, val_fraction, block_size)
    logging.info("corpus: %d files, %d train tokens, %d val tokens", len(files), train.size,
                 val.size)
    return Corpus(train=pack_windows(train, block_size), val=pack_windows(val, block_size),
                  n_train_tokens=int(train.size), n_val_tokens=int(val.size),
                  fingerprint=fingerprint)


def make_train_dataset(windows: np.ndarray, *, global_batch: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Seeded, per-epoch reshuffled, endless batches of windows; each process gets its
    contiguous `global_batch // process_count` rows of every global batch."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} not divisible by {process_count} "
                         f"processes")
    if len(windows) < global_batch:
        raise ValueError(f"{len(windows)} training windows are fewer than one batch of "
                         f"{global_batch}")
    local = global_batch // process_count
    lo = process_index * local
    ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
    ds = ds.batch(global_batch, drop_remainder=True)
    return ds.map(lambda b: np.asarray(b[lo:lo + local], np.int32))


def iter_val_batches(windows: np.ndarray, batch: int, max_batches: int | None = None):
    """Validation windows in order, in full batches (the remainder is dropped)."""
    n = len(windows) // batch
    if max_batches is not None and max_batches > 0:
        n = min(n, max_batches)
    for i in range(n):
        yield np.asarray(windows[i * batch:(i + 1) * batch], np.int32)
