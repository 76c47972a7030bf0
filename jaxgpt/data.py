"""Input pipelines: token shards -> packed `block_size + 1` windows -> batches.

Token shards (`uint16`/`uint32` `.bin` + `manifest.json`, written once by `shards.py`)
are served as windows from memory-mapped shards through grain: seeded global shuffle
(reshuffled every epoch), optional per-source mixture, batch, per-process slice, prefetch.
Documents are joined with the tokenizer's
end-of-text id and packed by concatenate-and-split: window i of a shard is
tokens[i*T : i*T + T + 1], inputs window[:-1], targets window[1:], so no target crosses
into another window's inputs. Windows never span two shards (a shard's tail of fewer than
T + 1 tokens is dropped). The train iterator's state is a position that `checkpoint.py`
saves for exact resume.

`python -m jaxgpt.shards prepare --config=configs/slimpajama.py --out=DIR` writes shards;
training reads them with `--config.data.prepared=DIR`. Without it, training prepares the
shards itself into WORKDIR/data/<fingerprint>/ (once), or with `data.streaming` only the
validation split, the train batches coming from `stream.py`.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil

import grain
import numpy as np

from jaxgpt import choices, shards, sources, stream, tokenizer

log = logging.getLogger(__name__)

SOURCES = sources.SOURCES
MANIFEST = shards.MANIFEST
pack_windows = stream.pack_windows   # the packing rule, shared with streamed blocks


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
    val_max_documents: int = 0
    read_threads: int = 2
    prefetch: int = 4
    worker_count: int = 0
    streaming: bool = False
    shuffle_windows: int = 8192

    def __post_init__(self):
        choices.check("data.source", self.source, SOURCES)
        choices.check("data.tokenizer", self.tokenizer, tokenizer.KINDS)
        sources.BadRecords(self.on_bad_record)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        for name, w in self.mixture.items():
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"data.mixture.{name} must be a weight >= 0, got {w!r}")
        if self.mixture and not any(self.mixture.values()):
            raise ValueError("data.mixture has no positive weight")
        for name in ("max_documents", "val_max_documents", "read_threads", "prefetch",
                     "worker_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.val_max_documents and self.source == "text":
            raise ValueError(f"data.val_max_documents={self.val_max_documents} caps a "
                             f"validation split of its own; data.source 'text' holds out "
                             f"data.val_fraction of the text instead")
        if self.shuffle_windows < 1:
            raise ValueError(f"data.shuffle_windows must be >= 1, got {self.shuffle_windows}")
        if self.streaming and self.prepared is not None:
            raise ValueError(f"data.prepared={self.prepared!r} and data.streaming=True: "
                             f"prepared shards are read as they are; streaming tokenizes "
                             f"data.path (or the HF stream) while training. Choose one")
        if self.streaming and self.mixture:
            raise ValueError("data.mixture weights sources of prepared token shards; "
                             "data.streaming=True trains on the documents in the stream's "
                             "own order and mix: pass --config.data.mixture='{}'")
        if self.streaming and self.worker_count:
            raise ValueError(f"data.worker_count={self.worker_count} is for prepared token "
                             f"shards; streaming tokenizes in one background thread per "
                             f"process (the tokenizer itself runs threaded): set it to 0")
        if self.prepared is not None and not os.path.isfile(
                os.path.join(self.prepared, MANIFEST)):
            parts = os.path.isdir(self.prepared) and any(
                shards.is_part(d) for d in os.listdir(self.prepared))
            raise FileNotFoundError(
                f"data.prepared {self.prepared!r} has no {MANIFEST} (" + (
                    "it holds parts: join them with `python -m jaxgpt.shards merge`)" if parts
                    else "write it with `python -m jaxgpt.shards prepare`)"))

    @classmethod
    def from_config(cls, config_data) -> "DataConfig":
        return cls(**config_data.to_dict())


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


def _hold_out_tail(segments, n_val: dict[str, int]):
    """Split a segment list into (train, val), both in the list's order: val is the last
    `n_val[source]` tokens of each source's stream."""
    train, val, left = [], [], dict(n_val)
    for name, path, start, stop in reversed(segments):
        take = min(left.get(name, 0), stop - start)
        if take:
            left[name] -= take
            val.append((name, path, stop - take, stop))
        if stop - take > start:
            train.append((name, path, start, stop - take))
    return train[::-1], val[::-1]


def _held_out_tokens(segments, fraction: float, block_size: int) -> tuple[dict[str, int], bool]:
    """(validation tokens to hold out of each source's tail, whether per source): `fraction`
    of each source's tokens, at least one window; a source too small to leave a window to
    both splits gives none. Where no source can, the whole stream's tail, as a lone source
    always has; a stream too small for that is an error."""
    totals = _tokens_by_source(segments)
    n_val = {}
    for name, total in totals.items():
        n = max(int(total * fraction), block_size + 1)
        if total - n >= block_size + 1:
            n_val[name] = n
    if n_val:
        for name in totals.keys() - n_val.keys():
            log.warning("source %r has %d tokens, too few for a validation window of its "
                        "own: all of it is training data", name, totals[name])
        return n_val, True
    total = sum(totals.values())
    n = max(int(total * fraction), block_size + 1)
    if total - n < block_size + 1:
        raise ValueError(f"the corpus has {total} tokens: too few for block_size "
                         f"{block_size} with a validation split of {fraction}")
    if len(totals) > 1:
        log.warning("no source has tokens enough for validation windows of its own: "
                    "validation is the last %d tokens of the whole stream", n)
    for name, _, start, stop in reversed(segments):
        take = min(n, stop - start)
        n_val[name] = n_val.get(name, 0) + take
        n -= take
        if not n:
            break
    return n_val, False


def _tokens_by_source(segments) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, _, start, stop in segments:
        out[name] = out.get(name, 0) + stop - start
    return out


def load_prepared(root: str, dcfg: DataConfig, tokenizer_fingerprint: str) -> Corpus:
    """Windows over a prepared directory; the tokenizer must be the one that wrote it.
    Streaming prepares only the validation split, and its train windows are empty."""
    with open(os.path.join(root, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
        raise ValueError(f"{root} was tokenized by {manifest['tokenizer']['fingerprint']}, "
                         f"not by this run's tokenizer {tokenizer_fingerprint}")
    train, val = _segments(root, manifest, "train"), _segments(root, manifest, "val")
    # The tokens' identity: not the input files' stamps (the same tokens re-prepared after
    # a `touch` are the same data).
    fingerprint = hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "stamps"},
                                            sort_keys=True).encode())
    tokens = {k: v["tokens"] for k, v in manifest["splits"].items()}
    if not val and not dcfg.streaming:
        n_val, per_source = _held_out_tokens(train, dcfg.val_fraction, dcfg.block_size)
        train, val = _hold_out_tail(train, n_val)
        tokens = {"train": _tokens_by_source(train), "val": _tokens_by_source(val)}
        if per_source and len({s[0] for s in train + val}) > 1:
            # Held out of every source's tail (one source: the stream's tail, as always).
            fingerprint.update(b"|val: every source's tail")
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
                    fingerprint=fingerprint.hexdigest()[:16],
                    stats={"tokens": tokens,
                           "documents": {k: v["documents"]
                                         for k, v in manifest["splits"].items()},
                           "bad_records": manifest["bad_records"]})
    for name in (corpus.val,) if dcfg.streaming else (corpus.train, corpus.val):
        if len(name) < 1:
            raise ValueError(f"{root}: a split has fewer tokens than one window of "
                             f"block_size {dcfg.block_size} + 1")
    log.info("corpus %s: %d train tokens (%d windows), %d val tokens; per source %s; "
             "bad records %s", root, corpus.n_train_tokens, len(corpus.train),
             corpus.n_val_tokens, corpus.stats["tokens"], corpus.stats["bad_records"])
    return corpus


def _drop_if_stale(root: str, check: bool) -> None:
    """Remove a prepared cache whose input files have changed since, or that a removal cut
    short left without its manifest, so it is prepared again (`check`: this process may;
    the others read what process 0 left). Moved aside first, atomically, so an interrupted
    removal leaves no half cache under the name."""
    if not check or not os.path.isdir(root):
        return
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            changed = shards.stale_inputs(json.load(f))
        if not changed:
            return
        log.warning("%d input file(s) changed since %s was prepared (first: %s); preparing "
                    "it again", len(changed), root, changed[0])
    elif not os.listdir(root):
        return
    aside = f"{root}.stale-{os.getpid()}"
    os.replace(root, aside)
    shutil.rmtree(aside, ignore_errors=True)


def load_corpus(dcfg: DataConfig, tok, cache_dir: str, check_stamps: bool = True) -> Corpus:
    """`data.prepared`, or the inputs prepared once into cache_dir/<fingerprint>/ (prepared
    again where `check_stamps` finds an input changed since)."""
    if dcfg.prepared is not None:
        return load_prepared(dcfg.prepared, dcfg, tok.fingerprint)
    if dcfg.streaming:   # train is tokenized as it streams: prepare validation only
        stream.check_inputs(dcfg)
        root = os.path.join(cache_dir, "val-" + shards.inputs_fingerprint(dcfg, tok.fingerprint))
        _drop_if_stale(root, check_stamps)
        if not os.path.exists(os.path.join(root, MANIFEST)):
            shards.prepare(dcfg, tok, root, only=("val",))
        return load_prepared(root, dcfg, tok.fingerprint)
    if not shards.find_inputs(dcfg) and dcfg.source == "slimpajama" and not dcfg.max_documents:
        raise ValueError("data.path is unset, so SlimPajama would stream from the HF hub into "
                         "WORKDIR/data in full (~1.3 TB of tokens); set data.max_documents, "
                         "stream it (data.streaming=True), or prepare shards once and set "
                         "data.prepared")
    root = os.path.join(cache_dir, shards.inputs_fingerprint(dcfg, tok.fingerprint))
    _drop_if_stale(root, check_stamps)
    if not os.path.exists(os.path.join(root, MANIFEST)):
        shards.prepare(dcfg, tok, root)
    return load_prepared(root, dcfg, tok.fingerprint)


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
    log.info("mixture: %s", {n: weights[n] for n in names})
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


def train_iterator(corpus: Corpus, dcfg: DataConfig, tok, *, global_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1):
    """The checkpointable train iterator and its pipeline fingerprint's parts: what makes a
    saved iterator state mean the same batches (checked on resume)."""
    if dcfg.streaming:
        it = stream.StreamIterator(dcfg, tok, global_batch=global_batch, seed=seed,
                                   process_index=process_index, process_count=process_count)
        # Each process streams its own documents: the state is per process. The validation
        # split by its contents (tokens and documents per source), not its files' paths, so
        # that evaluations before and after a resume score the same text.
        val = json.dumps([corpus.stats["tokens"], corpus.stats["documents"]], sort_keys=True)
        return it, [stream.FORMAT, it.inputs_fingerprint, tok.fingerprint, seed,
                    global_batch, dcfg.block_size, dcfg.shuffle_windows, process_count, val]
    ds = make_train_dataset(corpus, global_batch=global_batch, seed=seed,
                            process_index=process_index, process_count=process_count,
                            mixture=dcfg.mixture)
    # The position counts global batches (every process reads the same global batch and
    # keeps its rows), so it is valid for any process count; the worker count changes the
    # state's format.
    return make_iterator(ds, dcfg), [corpus.fingerprint, tok.fingerprint, seed, global_batch,
                                     dcfg.block_size, dcfg.worker_count]


def stream_stats(train_iter) -> dict:
    """For a metrics record: bad records a stream has skipped so far (prepared shards
    report theirs once, in the first record of a start), and the documents of the pass read
    so far where its length is unknown (an HF stream, whose `epoch` counts whole passes)."""
    if not isinstance(train_iter, stream.StreamIterator):
        return {}
    out = {"bad_records": train_iter.bad_records} if train_iter.bad_records else {}
    if train_iter.documents is not None:
        out["pass_documents"] = train_iter.documents
    return out


def epochs_done(train_iter, corpus: Corpus, windows_done: int) -> float:
    """Passes over the training data so far (a stream counts its own)."""
    if isinstance(train_iter, stream.StreamIterator):
        return train_iter.epoch
    return windows_done / len(corpus.train)


def iter_val_batches(windows, batch: int, max_batches: int | None = None):
    """Validation windows in order, `batch` rows at a time, up to `max_batches` batches
    (None or 0: all of them); a last, partial batch is filled with rows of -1, which
    train.eval_step counts for nothing."""
    n = -(-len(windows) // batch)
    if max_batches is not None and max_batches > 0:
        n = min(n, max_batches)
    for i in range(n):
        idx = np.arange(i * batch, min((i + 1) * batch, len(windows)))
        rows = _gather(windows, idx)
        if len(idx) < batch:
            rows = np.concatenate([rows, np.full((batch - len(idx), rows.shape[1]), -1,
                                                 rows.dtype)])
        yield rows


def split_tokens(tokens: np.ndarray, val_fraction: float, block_size: int):
    """Hold out the last `val_fraction` of a token array (at least one window)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(int(len(tokens) * val_fraction), block_size + 1)
    if len(tokens) - n_val < block_size + 1:
        raise ValueError(f"the corpus has {len(tokens)} tokens: too few for block_size "
                         f"{block_size} with a validation split of {val_fraction}")
    return tokens[:-n_val], tokens[-n_val:]
