"""Input pipelines: documents -> token shards -> packed `block_size + 1` windows -> batches.

Stages (all grain): read and tokenize input files (threads, order kept), write token
shards (`uint16`/`uint32` `.bin` + `manifest.json`) once, then serve windows from
memory-mapped shards: seeded global shuffle (reshuffled every epoch), optional per-source
mixture, batch, per-process slice, prefetch. Documents are joined with the tokenizer's
end-of-text id and packed by concatenate-and-split: window i of a shard is
tokens[i*T : i*T + T + 1], inputs window[:-1], targets window[1:], so no target crosses
into another window's inputs. Windows never span two shards (a shard's tail of fewer than
T + 1 tokens is dropped). The train iterator's state is a position that `checkpoint.py`
saves for exact resume.

`python -m jaxgpt.data prepare --config=configs/slimpajama.py --out=DIR` writes shards;
training reads them with `--config.data.prepared=DIR`. Without it, training prepares the
shards itself into WORKDIR/data/<fingerprint>/ (once).
"""

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket

import grain
import numpy as np

from jaxgpt import sources, tokenizer

SOURCES = sources.SOURCES
default_corpus_files = sources.default_corpus_files
resolve_paths = sources.resolve_paths
MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 27            # tokens per .bin shard (256 MB as uint16)
_HF_CHUNK_DOCS = 4096             # documents per tokenization task for HF streams
_TOKENIZER_TRAIN_CHARS = 100_000_000


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` config group as typed values (see config.py for each field)."""

    source: str = "text"
    path: str | None = None
    prepared: str | None = None
    block_size: int = 128
    val_fraction: float = 0.05
    tokenizer: str = "sentencepiece"
    tokenizer_path: str | None = None
    on_bad_record: str = "error"
    mixture: dict = dataclasses.field(default_factory=dict)
    max_documents: int = 0
    read_threads: int = 2
    prefetch: int = 4
    worker_count: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {'|'.join(SOURCES)}, "
                             f"got {self.source!r}")
        if self.tokenizer not in tokenizer.KINDS:
            raise ValueError(f"data.tokenizer must be one of {'|'.join(tokenizer.KINDS)}, "
                             f"got {self.tokenizer!r}")
        sources.BadRecords(self.on_bad_record)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        for name, w in self.mixture.items():
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"data.mixture.{name} must be a weight >= 0, got {w!r}")
        if self.mixture and not any(self.mixture.values()):
            raise ValueError("data.mixture has no positive weight")
        for name in ("max_documents", "read_threads", "prefetch", "worker_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.prepared is not None and not os.path.isfile(
                os.path.join(self.prepared, MANIFEST)):
            raise FileNotFoundError(f"data.prepared {self.prepared!r} has no {MANIFEST} "
                                    f"(write it with `python -m jaxgpt.data prepare`)")

    @classmethod
    def from_config(cls, config_data) -> "DataConfig":
        return cls(**config_data.to_dict())


# ---- read + tokenize -------------------------------------------------------------------


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenize_documents(docs: list[str], tok) -> np.ndarray:
    """Encode documents and join them, each followed by the end-of-text id."""
    dtype = _token_dtype(tok.vocab_size)
    pieces = []
    for ids in tok.encode_batch(docs):
        pieces.append(np.asarray(ids, dtype))
        pieces.append(np.asarray([tok.eot_id], dtype))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    if tokens.size and int(tokens.max()) >= tok.vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {tok.vocab_size}")
    return tokens


def _tokenize_by_source(docs: list[sources.Document], tok) -> dict:
    """{source: (tokens, n_documents)} in first-seen source order."""
    groups: dict[str, list[str]] = {}
    for d in docs:
        groups.setdefault(d.source, []).append(d.text)
    return {s: (tokenize_documents(texts, tok), len(texts)) for s, texts in groups.items()}


def _read_and_tokenize(path: str, *, source: str, tok, on_bad_record: str):
    """One input file -> ({source: (tokens, n_docs)}, bad-record counts): a grain map stage."""
    bad = sources.BadRecords(on_bad_record)
    docs = list(sources.READERS[source](path, bad))
    return _tokenize_by_source(docs, tok), dict(bad.counts)


def _tokenized_files(files, dcfg: DataConfig, tok):
    """Files read and tokenized by `read_threads` grain threads; results in file order."""
    stage = lambda f: _read_and_tokenize(f, source=dcfg.source, tok=tok,
                                         on_bad_record=dcfg.on_bad_record)
    threads = max(dcfg.read_threads, 1)
    ds = grain.MapDataset.source(files).map(stage)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                     prefetch_buffer_size=threads)))


def _tokenized_stream(split: str, dcfg: DataConfig, tok):
    """An HF stream in chunks of documents (bad records there are the hub's to fix)."""
    docs = itertools.islice(sources.hf_documents(dcfg.source, split),
                            dcfg.max_documents or None)
    while chunk := list(itertools.islice(docs, _HF_CHUNK_DOCS)):
        yield _tokenize_by_source(chunk, tok), {}


# ---- token shards ----------------------------------------------------------------------


class _ShardWriter:
    """Appends tokens to SPLIT/SOURCE/NNNNN.bin files of at most SHARD_TOKENS tokens."""

    def __init__(self, root: str, split: str, dtype):
        self.root, self.split, self.dtype = root, split, dtype
        self.shards: list[dict] = []
        self.open: dict[str, dict] = {}
        self.documents: dict[str, int] = {}

    def add(self, name: str, tokens: np.ndarray, n_docs: int) -> None:
        self.documents[name] = self.documents.get(name, 0) + n_docs
        while tokens.size:
            shard = self.open.get(name)
            if shard is None or shard["tokens"] >= SHARD_TOKENS:
                safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
                index = sum(s["source"] == name for s in self.shards)
                rel = os.path.join(self.split, safe, f"{index:05d}.bin")
                os.makedirs(os.path.join(self.root, os.path.dirname(rel)), exist_ok=True)
                shard = {"path": rel, "source": name, "tokens": 0}
                self.shards.append(shard)
                self.open[name] = shard
            take = tokens[:SHARD_TOKENS - shard["tokens"]]
            with open(os.path.join(self.root, shard["path"]), "ab") as f:
                f.write(take.astype(self.dtype, copy=False).tobytes())
            shard["tokens"] += int(take.size)
            tokens = tokens[take.size:]


def prepare(dcfg: DataConfig, tok, out_dir: str) -> dict:
    """Read, tokenize and write every split's token shards and a manifest into `out_dir`.

    Written into a folder private to this process and renamed at the end, so `out_dir` is
    complete or absent, also when several hosts prepare the same shared folder at once.
    Returns the manifest.
    """
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out")
    splits = find_inputs(dcfg)
    tmp = f"{out_dir.rstrip('/')}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = np.dtype(_token_dtype(tok.vocab_size)).name
    manifest = {"format": 1, "source": dcfg.source, "dtype": dtype,
                "tokenizer": {"kind": dcfg.tokenizer, "fingerprint": tok.fingerprint,
                              "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
                "inputs": splits or {"hf": [dcfg.source]}, "splits": {}, "bad_records": {}}
    try:
        _write_splits(dcfg, tok, splits, tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # leave no half-written data behind
        raise
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    try:
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)   # an empty folder only: anything in it is not ours to delete
        os.replace(tmp, out_dir)
    except OSError:
        if not os.path.exists(os.path.join(out_dir, MANIFEST)):
            raise
        shutil.rmtree(tmp)      # another process finished the same preparation first
        with open(os.path.join(out_dir, MANIFEST)) as f:
            manifest = json.load(f)
    return manifest


def _write_splits(dcfg: DataConfig, tok, splits: dict, tmp: str, manifest: dict) -> None:
    dtype = np.dtype(manifest["dtype"])
    bad_total: dict[str, int] = {}
    for split in (splits or {"train": None, "val": None}):
        writer = _ShardWriter(tmp, split, dtype)
        results = (_tokenized_files(splits[split], dcfg, tok) if splits
                   else _tokenized_stream(split, dcfg, tok))
        n_docs = 0
        for by_source, bad in results:
            for name, (tokens, docs) in by_source.items():
                writer.add(name, tokens, docs)
                n_docs += docs
            for kind, n in bad.items():
                bad_total[kind] = bad_total.get(kind, 0) + n
            if dcfg.max_documents and n_docs >= dcfg.max_documents:
                break
        tokens = {}
        for s in writer.shards:
            tokens[s["source"]] = tokens.get(s["source"], 0) + s["tokens"]
        manifest["splits"][split] = {"shards": writer.shards, "tokens": tokens,
                                     "documents": writer.documents}
        logging.info("prepared %s: %d documents, tokens per source %s", split,
                     sum(writer.documents.values()), tokens)
    manifest["bad_records"] = bad_total
    if not any(s["tokens"] for s in manifest["splits"]["train"]["shards"]):
        files = splits.get("train", [])
        raise ValueError(f"the corpus is empty: {len(files)} {dcfg.source} file(s) hold no "
                         f"documents (first: {files[0] if files else dcfg.source})")


def find_inputs(dcfg: DataConfig) -> dict[str, list[str]]:
    """Input files per split (checked before anything is written); {} = an HF stream."""
    if dcfg.prepared is not None:
        return {}
    return sources.find_splits(dcfg.source, dcfg.path)


def inputs_fingerprint(dcfg: DataConfig, tokenizer_fingerprint: str) -> str:
    """Hash of the inputs (paths, sizes, mtimes) and everything that shapes their tokens."""
    h = hashlib.sha256(f"{tokenizer_fingerprint}|{dcfg.source}|{dcfg.on_bad_record}|"
                       f"{dcfg.max_documents}".encode())
    for split, files in sorted(find_inputs(dcfg).items()):
        for path in files:
            st = os.stat(path)
            h.update(f"{split}:{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


# ---- windows ---------------------------------------------------------------------------


class Windows:
    """Random-access `block_size + 1` windows over token segments (path, start, stop) of
    shards. Shards are memory-mapped on first use, so pickling to grain workers is cheap."""

    def __init__(self, segments: list[tuple[str, int, int]], dtype: str, block_size: int):
        self.segments, self.dtype, self.block_size = segments, dtype, block_size
        counts = [max((stop - start - 1) // block_size, 0) for _, start, stop in segments]
        self.ends = np.cumsum(counts)
        self.n_tokens = sum(stop - start for _, start, stop in segments)
        self._maps = None

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, i: int) -> np.ndarray:  # [block_size + 1] int32
        return self.gather(np.asarray([i]))[0]

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Windows `idx` [N] -> [N, block_size + 1] int32, one vectorized read per shard
        (per-window Python work would cap the loader at a few M tokens/s)."""
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p, _, _ in self.segments]
        idx = np.asarray(idx, np.int64)
        if idx.size and not 0 <= idx.min() <= idx.max() < len(self):
            raise IndexError(f"window index out of range [0, {len(self)})")
        seg = np.searchsorted(self.ends, idx, side="right")
        starts = np.concatenate([[0], self.ends[:-1]])
        out = np.empty((len(idx), self.block_size + 1), np.int32)
        offsets = np.arange(self.block_size + 1)
        for k in np.unique(seg):
            rows = seg == k
            lo = self.segments[k][1] + (idx[rows] - starts[k]) * self.block_size
            out[rows] = self._maps[k][lo[:, None] + offsets[None, :]]
        return out


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train windows (all, and by source for mixtures), validation windows, provenance."""

    train: Windows
    val: Windows
    train_by_source: dict[str, Windows]
    n_train_tokens: int
    n_val_tokens: int
    fingerprint: str                 # the prepared data's: changes when the tokens would
    stats: dict                      # tokens/documents per source and split, bad records
    val_by_source: dict[str, Windows] = dataclasses.field(default_factory=dict)


def _segments(root: str, manifest: dict, split: str) -> list[tuple[str, str, int, int]]:
    """(source, path, 0, tokens) per shard; a shard whose size disagrees is an error."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    out = []
    for s in manifest["splits"].get(split, {"shards": []})["shards"]:
        path = os.path.join(root, s["path"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"token shard {path} listed in {MANIFEST} is missing")
        size = os.path.getsize(path)
        if size != s["tokens"] * itemsize or size == 0:
            raise ValueError(f"token shard {path} has {size} bytes, but {MANIFEST} records "
                             f"{s['tokens']} {manifest['dtype']} tokens (empty or truncated)")
        out.append((s["source"], path, 0, s["tokens"]))
    return out


def _hold_out_tail(segments, n_val: int):
    """Split segment list into (train, val): val is the stream's last `n_val` tokens."""
    train, val = list(segments), []
    while n_val > 0:
        name, path, start, stop = train.pop()
        take = min(n_val, stop - start)
        val.insert(0, (name, path, stop - take, stop))
        if stop - take > start:
            train.append((name, path, start, stop - take))
        n_val -= take
    return train, val


def load_prepared(root: str, dcfg: DataConfig, tokenizer_fingerprint: str) -> Corpus:
    """Windows over a prepared directory; the tokenizer must be the one that wrote it."""
    with open(os.path.join(root, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
        raise ValueError(f"{root} was tokenized by {manifest['tokenizer']['fingerprint']}, "
                         f"not by this run's tokenizer {tokenizer_fingerprint}")
    train, val = _segments(root, manifest, "train"), _segments(root, manifest, "val")
    total = sum(stop - start for _, _, start, stop in train)
    if not val:
        n_val = max(int(total * dcfg.val_fraction), dcfg.block_size + 1)
        if total - n_val < dcfg.block_size + 1:
            raise ValueError(f"the corpus has {total} tokens: too few for block_size "
                             f"{dcfg.block_size} with a validation split of "
                             f"{dcfg.val_fraction}")
        train, val = _hold_out_tail(train, n_val)
    windows = lambda segs: Windows([s[1:] for s in segs], manifest["dtype"], dcfg.block_size)
    by_source = {}
    for name in dict.fromkeys(s[0] for s in train):
        by_source[name] = windows([s for s in train if s[0] == name])
    val_by_source = {name: windows([s for s in val if s[0] == name])
                     for name in dict.fromkeys(s[0] for s in val)}
    corpus = Corpus(train=windows(train), val=windows(val), train_by_source=by_source,
                    val_by_source=val_by_source,
                    n_train_tokens=sum(s[3] - s[2] for s in train),
                    n_val_tokens=sum(s[3] - s[2] for s in val),
                    fingerprint=hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()
                                               ).hexdigest()[:16],
                    stats={"tokens": {k: v["tokens"] for k, v in manifest["splits"].items()},
                           "documents": {k: v["documents"]
                                         for k, v in manifest["splits"].items()},
                           "bad_records": manifest["bad_records"]})
    for name in (corpus.train, corpus.val):
        if len(name) < 1:
            raise ValueError(f"{root}: a split has fewer tokens than one window of "
                             f"block_size {dcfg.block_size} + 1")
    logging.info("corpus %s: %d train tokens (%d windows), %d val tokens; per source %s; "
                 "bad records %s", root, corpus.n_train_tokens, len(corpus.train),
                 corpus.n_val_tokens, corpus.stats["tokens"], corpus.stats["bad_records"])
    return corpus


def load_corpus(dcfg: DataConfig, tok, cache_dir: str) -> Corpus:
    """`data.prepared`, or the inputs prepared once into cache_dir/<fingerprint>/."""
    if dcfg.prepared is not None:
        return load_prepared(dcfg.prepared, dcfg, tok.fingerprint)
    if not find_inputs(dcfg) and dcfg.source == "slimpajama" and not dcfg.max_documents:
        raise ValueError("data.path is unset, so SlimPajama would stream from the HF hub into "
                         "WORKDIR/data in full (~1.3 TB of tokens); set data.max_documents, or "
                         "prepare shards once and set data.prepared")
    root = os.path.join(cache_dir, inputs_fingerprint(dcfg, tok.fingerprint))
    if not os.path.exists(os.path.join(root, MANIFEST)):
        prepare(dcfg, tok, root)
    return load_prepared(root, dcfg, tok.fingerprint)


def tokenizer_training_texts(dcfg: DataConfig) -> list[str]:
    """Documents to train a SentencePiece model on: the first ~100M characters of train.

    Read up front, so a bad record raises here with its file and line, not from inside
    the SentencePiece trainer.
    """
    splits = find_inputs(dcfg)
    docs = (sources.iter_documents(dcfg.source, splits["train"],
                                   sources.BadRecords(dcfg.on_bad_record)) if splits
            else sources.hf_documents(dcfg.source, "train"))
    texts, chars = [], 0
    for d in docs:
        texts.append(d.text)
        chars += len(d.text)
        if chars >= _TOKENIZER_TRAIN_CHARS:
            break
    if not any(t.strip() for t in texts):
        files = splits.get("train", [])
        raise ValueError(f"the corpus is empty: {len(files)} {dcfg.source} file(s) hold no "
                         f"text (first: {files[0] if files else dcfg.source})")
    return texts


# ---- batches ---------------------------------------------------------------------------


def _gather(windows, idx) -> np.ndarray:
    if isinstance(windows, Windows):
        return windows.gather(idx)
    return np.stack([np.asarray(windows[int(i)], np.int32) for i in idx])


def _mixture(corpus: Corpus, weights: dict, seed: int) -> grain.MapDataset:
    """Endless (source number, window index) pairs drawn by weight; each source is
    reshuffled on its own epochs."""
    missing = sorted(set(corpus.train_by_source) - set(weights))
    if missing:
        raise ValueError(f"data.mixture has no weight for source(s) {missing} in the data "
                         f"(known: {sorted(weights)})")
    names = [n for n in corpus.train_by_source if weights[n] > 0]
    if not names:
        raise ValueError(f"data.mixture gives no positive weight to the sources present, "
                         f"{sorted(corpus.train_by_source)}")
    parts = [grain.MapDataset.range(len(corpus.train_by_source[n])).shuffle(seed=seed + k)
             .repeat(None).map(functools.partial(lambda k, i: (k, i), k))
             for k, n in enumerate(names)]
    logging.info("mixture: %s", {n: weights[n] for n in names})
    return grain.MapDataset.mix(parts, [float(weights[n]) for n in names]), names


def make_train_dataset(windows, *, global_batch: int, seed: int, process_index: int = 0,
                       process_count: int = 1, mixture: dict | None = None) -> grain.MapDataset:
    """Seeded, per-epoch reshuffled, endless batches; process p gets rows
    [p * local, (p + 1) * local) of every global batch, reading only those.

    `windows` is a `Corpus` (optionally mixed by source with `mixture` weights) or any
    random-access sequence of windows.
    """
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} not divisible by {process_count} "
                         f"processes")
    corpus = windows if isinstance(windows, Corpus) else None
    if corpus is not None:
        windows = corpus.train
    if len(windows) < global_batch:
        raise ValueError(f"{len(windows)} training windows are fewer than one batch of "
                         f"{global_batch}")
    local = global_batch // process_count
    # Shuffle, batch and slice window *indices*; windows are read once per local batch.
    # Local batch b holds elements [b * local, (b + 1) * local); global batch s is local
    # batches s * n .. s * n + n - 1, of which process p takes the p-th.
    if corpus is not None and mixture:
        ds, names = _mixture(corpus, mixture, seed)
        parts = [corpus.train_by_source[n] for n in names]

        def read(batch):
            source, idx = batch
            out = np.empty((len(idx), windows.block_size + 1), np.int32)
            for k in np.unique(source):
                out[source == k] = parts[k].gather(idx[source == k])
            return out
    else:
        ds = grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat(None)
        read = functools.partial(_gather, windows)
    ds = ds.batch(local, drop_remainder=True).slice(slice(process_index, None, process_count))
    return ds.map(read)


def make_iterator(ds: grain.MapDataset, dcfg: DataConfig):
    """A checkpointable iterator: `read_threads` threads, `prefetch` batches ahead, and
    `worker_count` grain worker processes when > 0."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(dcfg.read_threads, 1),
                                                 prefetch_buffer_size=dcfg.prefetch))
    if dcfg.worker_count:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=dcfg.worker_count))
    return iter(it_ds)


def iter_val_batches(windows, batch: int, max_batches: int | None = None):
    """Validation windows in order, in full batches (the remainder is dropped)."""
    n = len(windows) // batch
    if max_batches is not None and max_batches > 0:
        n = min(n, max_batches)
    for i in range(n):
        yield _gather(windows, np.arange(i * batch, (i + 1) * batch))


def pack_windows(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """[N] tokens -> [W, block_size + 1] windows overlapping by one token (a strided view)."""
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of block_size "
                         f"{block_size} + 1")
    return np.lib.stride_tricks.as_strided(
        tokens, shape=(n_windows, block_size + 1),
        strides=(tokens.strides[0] * block_size, tokens.strides[0]), writeable=False)


def split_tokens(tokens: np.ndarray, val_fraction: float, block_size: int):
    """Hold out the last `val_fraction` of a token array (at least one window)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(int(len(tokens) * val_fraction), block_size + 1)
    if len(tokens) - n_val < block_size + 1:
        raise ValueError(f"the corpus has {len(tokens)} tokens: too few for block_size "
                         f"{block_size} with a validation split of {val_fraction}")
    return tokens[:-n_val], tokens[-n_val:]


# ---- CLI: python -m jaxgpt.data prepare --config=... --out=DIR -------------------------


def _prepare_main(argv):
    from absl import flags
    config = flags.FLAGS.config
    if len(argv) != 2 or argv[1] != "prepare":
        raise SystemExit("usage: python -m jaxgpt.data prepare --config=CONFIG --out=DIR")
    dcfg = DataConfig.from_config(config.data)
    out = flags.FLAGS.out
    if dcfg.tokenizer == "gpt2" or dcfg.tokenizer_path:
        tok = tokenizer.load(dcfg.tokenizer, dcfg.tokenizer_path or "gpt2")
    else:
        tok = tokenizer.load_or_train_sentencepiece(
            out.rstrip("/") + ".tokenizer.model", tokenizer_training_texts(dcfg),
            config.model.vocab_size)
    manifest = prepare(dcfg, tok, out)
    print(json.dumps({k: manifest[k] for k in ("tokenizer", "bad_records")}
                     | {s: v["tokens"] for s, v in manifest["splits"].items()}, indent=1))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/*.py[:size]", lock_config=True)
    flags.DEFINE_string("out", None, "directory to write token shards and manifest.json into")
    flags.mark_flags_as_required(["config", "out"])
    app.run(_prepare_main)
