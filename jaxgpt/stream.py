"""Streaming train batches: documents read and tokenized while training, no shards first.

With `data.streaming=True` a run reads its train documents (local files or the HF hub
stream) in order and tokenizes them in a background thread, so training on SlimPajama
starts at once instead of after preparing its shards; only the validation split is
prepared (`data.load_corpus`). Process p of N tokenizes document g of each pass when
g % N == p (of the HF SlimPajama stream it reads only its own part). Its documents, each
followed by end-of-text, form one token stream, packed as prepared shards are into
`block_size + 1` windows overlapping by one token, and shuffled in blocks of
`data.shuffle_windows` windows (rounded up to whole local batches): block b is permuted by
a generator seeded with (seed, p, b). When a pass ends, the next starts from the first
document and the token stream runs on across the seam.

The iterator state is exact and small: per process, where its current block starts (pass,
document, file, document in the file, token offset), the block number and the batches
already taken from it; of an HF stream, also the stream's own state before the first row
of the block's first document (`datasets`' state_dict, a few hundred bytes of JSON). A
resume re-reads from the block's first document, one block of tokenization, and needs the
same process count (it is part of the pipeline fingerprint). An HF stream resumes from its
saved state, reading at most the rest of one shard file again.
"""

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
from collections.abc import Iterator

import numpy as np

from jaxgpt import sources

log = logging.getLogger(__name__)
_CHUNK_DOCS = 256     # documents per encode_batch call (the tokenizers run it threaded)
_AHEAD = 2            # blocks tokenized ahead of the trainer
FORMAT = "stream-1"


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a block starts: token `offset` of document `doc` (the doc-th of pass `epoch`,
    counting every process's documents), which is document `in_file` of input `file`."""

    epoch: int = 0
    doc: int = 0
    file: int = 0
    in_file: int = 0
    offset: int = 0
    # An HF stream's state_dict() just before the first row of document `doc`, as JSON
    # (None for files): a resume loads it instead of reading `doc` documents again.
    resume: str | None = dataclasses.field(default=None, compare=False, repr=False)
    # sources.Document.share of document `doc`: how much of its file lies before it (not
    # saved: a resume reads that document again, and its reader says).
    share: float = dataclasses.field(default=0.0, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class _Block:
    start: Cursor
    number: int
    windows: np.ndarray      # [n_batches * local, block_size + 1] int32, shuffled
    end: Cursor              # where the next block starts


def check_inputs(dcfg) -> dict[str, list[str]]:
    """Input files per split ({} = the HF stream); streaming needs a validation split."""
    splits = sources.find_splits(dcfg.source, dcfg.path)
    if splits and "val" not in splits:
        where = (f"data.path {dcfg.path!r} has none (SlimPajama: a validation/ folder; "
                 f"WikiText: both *train* and *valid* files)" if dcfg.source != "text"
                 else "data.source 'text' has none")
        raise ValueError(f"data.streaming needs a validation split, but {where}; prepare "
                         f"token shards instead (data.streaming=False), which hold out the "
                         f"end of the text")
    return splits


def pack_windows(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """[N] tokens -> [W, block_size + 1] windows overlapping by one token (a strided view)."""
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of block_size "
                         f"{block_size} + 1")
    return np.lib.stride_tricks.as_strided(
        tokens, shape=(n_windows, block_size + 1),
        strides=(tokens.strides[0] * block_size, tokens.strides[0]), writeable=False)


def inputs_fingerprint(dcfg, files: list[str] | None = None,
                       sizes: list[int] | None = None) -> str:
    """What the saved cursors index: the train files' names (relative to their common
    folder) and sizes, and the pass length, so a moved copy of the data resumes. Not
    data.on_bad_record: a cursor counts good documents, and under 'error' none was bad, so
    a run stopped by a bad record resumes with 'skip' where it stopped. `files`, `sizes`: the
    train files and their sizes when already found."""
    if files is None:
        files = check_inputs(dcfg).get("train", [])
    if sizes is None:
        sizes = [os.path.getsize(f) for f in files]
    h = hashlib.sha256(f"{dcfg.source}|{dcfg.max_documents}|"
                       f"{'files' if files else 'hf'}".encode())
    base = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    for f, size in zip(files, sizes):
        h.update(f"{os.path.relpath(f, base)}:{size}\n".encode())
    return h.hexdigest()[:16]


def _stream_state(rows) -> str | None:
    """An HF IterableDataset's position as JSON (None where it has no state_dict)."""
    state_dict = getattr(rows, "state_dict", None)
    return None if state_dict is None else json.dumps(state_dict())


def _hf_documents(source: str, rows, rows_it, before: str | None):
    """(text, the stream's state before the document's first row) of each document that
    `rows_it` (an iterator over `rows`) still holds; `before`: the state before its next row."""
    def tagged():
        state = before
        for rec in rows_it:
            yield rec["text"], state
            state = _stream_state(rows)    # after this row: where the next one starts
    if source == "wikitext":
        return sources.tagged_wikitext_articles(tagged())
    return tagged()


class _Producer:
    """Reads, tokenizes and packs blocks from a cursor on, in its own thread (it holds no
    reference to the iterator, so a dropped iterator stops it)."""

    def __init__(self, dcfg, tok, files, *, local: int, n_batches: int, seed: int,
                 process_index: int, process_count: int):
        self.dcfg, self.tok, self.files = dcfg, tok, files
        self.local, self.n_batches, self.seed = local, n_batches, seed
        self.p, self.n = process_index, process_count
        # An HF stream that splits by rows is read in parts, one per process.
        split = not files and process_count > 1 and sources.hf_splittable(dcfg.source)
        self.hf_part = (process_index, process_count) if split else (0, 1)
        self.queue: queue.Queue = queue.Queue(maxsize=_AHEAD)
        self.stop = threading.Event()
        # Bad records skipped so far, by kind (counted again on every pass that reads them).
        self.bad = sources.BadRecords(dcfg.on_bad_record)

    def _pass(self, start: Cursor) -> Iterator[tuple[Cursor, str]]:
        """(cursor, text) of every document of one pass from `start` on (all processes')."""
        limit = self.dcfg.max_documents or None
        if limit is not None and self.hf_part[1] > 1:    # a pass over all parts together
            limit = -(-limit // self.hf_part[1])
        if not self.files:
            yield from self._hf_pass(start, limit)
            return
        doc = start.doc
        reader = sources.READERS[self.dcfg.source]
        for f in range(start.file, len(self.files)):
            skip = start.in_file if f == start.file else 0
            for i, d in itertools.islice(enumerate(reader(self.files[f], self.bad)), skip,
                                         None):
                if limit is not None and doc >= limit:
                    return
                yield Cursor(start.epoch, doc, f, i, share=d.share), d.text
                doc += 1

    def _hf_pass(self, start: Cursor, limit: int | None) -> Iterator[tuple[Cursor, str]]:
        """One pass over the HF stream (this process's part of it) from `start` on. Each
        cursor carries the stream's state just before its document's first row (a
        SlimPajama row is a document; a WikiText article spans rows), so a resume continues
        the stream there."""
        rows, rows_it, before, skip = self._hf_resume(start)
        docs = _hf_documents(self.dcfg.source, rows, rows_it, before)
        for doc, (text, state) in enumerate(itertools.islice(docs, skip, None), start.doc):
            if limit is not None and doc >= limit:
                return
            yield Cursor(start.epoch, doc, 0, doc, resume=state), text

    def _hf_resume(self, start: Cursor):
        """(stream, its row iterator, the stream's state before its next row, documents
        still to skip to reach `start.doc`).

        The saved stream state is loaded where there is one (nothing to skip); if it fails
        (another `datasets` version, say), the stream is read again up to `start.doc`."""
        rows = sources.hf_stream(self.dcfg.source, "train", self.hf_part)
        if start.doc and start.resume is not None:
            try:
                rows.load_state_dict(json.loads(start.resume))
                rows_it = iter(rows)
                first = next(rows_it, None)    # a state that does not fit fails here
                log.info("HF stream: resumed at document %s from its saved state",
                         f"{start.doc:,}")
                rows_it = itertools.chain([] if first is None else [first], rows_it)
                return rows, rows_it, start.resume, 0
            except Exception as e:    # noqa: BLE001 - reported, then read again instead
                log.warning("HF stream: its saved state did not load (%s: %s); re-reading "
                            "%s documents instead", type(e).__name__, e, f"{start.doc:,}")
                rows = sources.hf_stream(self.dcfg.source, "train", self.hf_part)
        elif start.doc:
            log.info("HF stream: re-reading %s documents to resume (no saved stream state)",
                     f"{start.doc:,}")
        return rows, iter(rows), _stream_state(rows), start.doc

    def _documents(self, start: Cursor) -> Iterator[tuple[Cursor, str]]:
        """This process's documents from `start` on, pass after pass, endlessly."""
        own = self.n if self.hf_part[1] == 1 else 1    # a split HF stream is all ours
        while True:
            found = False
            for cursor, text in self._pass(start):
                if cursor.doc % own == self.p % own:
                    found = True
                    yield cursor, text
            if not found and start.doc == 0:
                raise ValueError(f"process {self.p} of {self.n} got no train documents in a "
                                 f"whole pass over {self.dcfg.path or self.dcfg.source}")
            start = Cursor(epoch=start.epoch + 1)

    def _tokens(self, docs, needed: int) -> list[tuple[Cursor, np.ndarray]]:
        """The next documents tokenized, each followed by end-of-text: up to _CHUNK_DOCS of
        them, fewer once they hold `needed` characters (about as many tokens or more; if
        fewer, the caller asks again), so a pass of a few huge documents is not read at once."""
        chunk, chars = [], 0
        for cursor, text in docs:
            chunk.append((cursor, text))
            chars += len(text) + 1
            if len(chunk) == _CHUNK_DOCS or chars >= needed:
                break
        out = []
        for (cursor, _), ids in zip(chunk, self.tok.encode_batch([t for _, t in chunk])):
            tokens = np.empty(len(ids) + 1, np.int32)
            tokens[:-1], tokens[-1] = ids, self.tok.eot_id
            out.append((cursor, tokens))
        return out

    def blocks(self, start: Cursor, number: int) -> Iterator[_Block]:
        """Blocks `number`, `number + 1`, ... with block `number` starting at `start`."""
        T = self.dcfg.block_size
        W = self.n_batches * self.local
        docs = self._documents(dataclasses.replace(start, offset=0))
        pending = collections.deque()    # (cursor, tokens) not yet consumed; the first
        offset = start.offset            # of them from token `offset` on
        have = -offset
        need = W * T + 1
        while True:
            while have < need:
                for cursor, tokens in self._tokens(docs, need - have):
                    pending.append((cursor, tokens))
                    have += tokens.size
            parts, n = [], 0     # the block's `need` tokens, from `offset` in the head on
            for i, (_, tokens) in enumerate(pending):
                parts.append(tokens[offset if i == 0 else 0:][:need - n])
                n += parts[-1].size
                if n == need:
                    break
            windows = pack_windows(np.concatenate(parts), T)          # [W, T + 1]
            order = np.random.default_rng([self.seed, self.p, number]).permutation(W)
            start = dataclasses.replace(pending[0][0], offset=offset)
            advance, have = W * T, have - W * T     # the next block starts at window W
            while advance >= pending[0][1].size - offset:
                advance -= pending[0][1].size - offset
                pending.popleft()
                offset = 0
            offset += advance
            yield _Block(start, number, windows[order],
                         dataclasses.replace(pending[0][0], offset=offset))
            number += 1

    def run(self, start: Cursor, number: int) -> None:
        """Thread body: blocks into the queue; an error is queued for the trainer to raise."""
        try:
            for block in self.blocks(start, number):
                if not self._put(block):
                    return
        except BaseException as e:     # noqa: BLE001 - re-raised in the trainer's thread
            self._put(e)

    def _put(self, item) -> bool:
        """Queue `item` unless stopped first (a dropped iterator never takes it)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def _allgather_text(text: str) -> list[str]:
    """Every process's `text`, in process order (a collective: all processes call it)."""
    from jax.experimental import multihost_utils
    blob = np.frombuffer(text.encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.asarray([blob.size], np.int32))))
    padded = np.zeros(max(size, 1), np.uint8)
    padded[:blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, padded.size)
    return [bytes(row).rstrip(b"\0").decode() for row in rows]   # JSON escapes any NUL


class StreamIterator:
    """Endless local batches [local, block_size + 1] int32 of process `process_index`;
    `get_state`/`set_state` as grain's iterators (the state covers every process)."""

    def __init__(self, dcfg, tok, *, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} not divisible by {process_count} "
                             f"processes")
        local = global_batch // process_count
        files = check_inputs(dcfg).get("train", [])
        self.n_files = len(files)
        sizes = [os.path.getsize(f) for f in files]
        self._bytes_before = np.cumsum([0] + sizes)       # of the files before each file
        self._max_documents = dcfg.max_documents
        # In the pipeline fingerprint.
        self.inputs_fingerprint = inputs_fingerprint(dcfg, files, sizes)
        self.n_batches = -(-dcfg.shuffle_windows // local)     # batches per block
        self.p, self.n = process_index, process_count
        self._producer = _Producer(dcfg, tok, files, local=local, n_batches=self.n_batches,
                                   seed=seed, process_index=process_index,
                                   process_count=process_count)
        self._start, self._number, self._taken = Cursor(), 0, 0
        self._block: _Block | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._thread is None:
            self._thread = threading.Thread(target=self._producer.run, daemon=True,
                                            args=(self._start, self._number),
                                            name=f"jaxgpt-stream-{self.p}")
            self._thread.start()
            log.info("streaming train documents (process %d of %d) from pass %d, document %s,"
                     " token %d; block %d, %d of its %d batches taken", self.p, self.n,
                     self._start.epoch, f"{self._start.doc:,}", self._start.offset,
                     self._number, self._taken, self.n_batches)
        # The first block is the one set_state named, with its batches taken so far.
        while self._block is None or self._taken == self.n_batches:
            if self._error is not None:     # the producer has stopped: raise again
                raise self._error
            item = self._producer.queue.get()
            if isinstance(item, BaseException):
                self._error = item
                raise item
            if self._block is not None:
                self._taken = 0
            self._block, self._start, self._number = item, item.start, item.number
        local = self._producer.local
        rows = self._block.windows[self._taken * local:(self._taken + 1) * local]
        self._taken += 1
        return rows

    @property
    def bad_records(self) -> dict[str, int]:
        """Bad records the reader has skipped so far, by kind (data.on_bad_record='skip')."""
        return dict(self._producer.bad.counts)

    def _passes(self, cursor: Cursor) -> float:
        """Passes done at `cursor`: over files, by the bytes before its document, or by
        documents where data.max_documents ends the pass first (each is a lower bound)."""
        if not self.n_files:
            return cursor.epoch      # an HF stream's length is unknown
        size = self._bytes_before[cursor.file + 1] - self._bytes_before[cursor.file]
        done = self._bytes_before[cursor.file] + cursor.share * size
        share = float(done / max(self._bytes_before[-1], 1))
        if self._max_documents:
            share = max(share, cursor.doc / self._max_documents)
        return cursor.epoch + share

    @property
    def epoch(self) -> float:
        """Passes done so far, estimated from the input bytes before the current block's
        first document and the next block's, in proportion to the batches taken (before
        the first batch after set_state: at the block's first document)."""
        if self._block is None:
            return self._passes(self._start)
        if not self.n_files:     # an HF stream: whole passes (`documents` says how far)
            return float(self._block.start.epoch)
        return self._within_block(self._passes(self._block.start),
                                  self._passes(self._block.end))

    @property
    def documents(self) -> int | None:
        """Documents of the current pass read so far (every process's, like the epoch), where
        the pass's length is unknown (an HF stream); None for files."""
        if self.n_files:
            return None
        parts = self._producer.hf_part[1]    # a split stream's cursors count its own part
        if self._block is None:
            return self._start.doc * parts
        start, end = self._block.start, self._block.end
        after = end.doc if end.epoch == start.epoch else start.doc   # a new pass began
        return int(self._within_block(start.doc, after)) * parts

    def _within_block(self, at_start: float, at_end: float) -> float:
        """A measure interpolated between the current block's start and the next block's
        by the share of the block's batches taken."""
        return at_start + (at_end - at_start) * self._taken / self.n_batches

    def local_state(self) -> list[int]:
        s = self._start
        return [s.epoch, s.doc, s.file, s.in_file, s.offset, self._number, self._taken]

    def get_state(self) -> dict:
        """Every process's state (a collective when there are several processes)."""
        states, resumes = [self.local_state()], [self._start.resume]
        if self.n > 1:
            from jax.experimental import multihost_utils
            rows = np.asarray(multihost_utils.process_allgather(   # int32: < 2^31 docs
                np.asarray([self.p] + states[0], np.int32))).reshape(-1, 1 + len(states[0]))
            # Processes that feed the same rows (sharding.batch_share) hold the same state:
            # one of each, in order.
            first = {int(p): i for i, p in reversed(list(enumerate(rows[:, 0])))}
            states = [rows[first[p], 1:].tolist() for p in range(self.n)]
            if self.n_files == 0:     # every process streams from the hub, or none does
                texts = _allgather_text(resumes[0] or "")
                resumes = [texts[first[p]] or None for p in range(self.n)]
        out = {"format": FORMAT, "processes": states}
        if self.n_files == 0:
            out["hf_states"] = resumes
        return out

    def set_state(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("set_state after iteration began")
        got = state.get("processes") if isinstance(state, dict) else None
        if not isinstance(got, list) or state.get("format") != FORMAT:
            raise ValueError(f"not a streaming iterator state: {str(state)[:200]}")
        if len(got) != self.n:
            raise ValueError(f"the streaming iterator state holds {len(got)} processes, but "
                             f"this run has {self.n}")
        mine = got[self.p]
        if len(mine) != 7 or any(not isinstance(x, int) or x < 0 for x in mine):
            raise ValueError(f"bad streaming iterator state for process {self.p}: {mine}")
        if mine[6] > self.n_batches:
            raise ValueError(f"streaming iterator state took {mine[6]} batches of a block of "
                             f"{self.n_batches}: data.shuffle_windows or the batch changed")
        resume = None
        if "hf_states" in state:     # absent from files' states and from older checkpoints
            hf = state["hf_states"]
            if (not isinstance(hf, list) or len(hf) != self.n
                    or not all(x is None or isinstance(x, str) for x in hf)):
                raise ValueError(f"bad HF stream states in the streaming iterator state: "
                                 f"{str(hf)[:200]}")
            resume = hf[self.p]
        self._start = Cursor(*mine[:5], resume=resume)
        self._number, self._taken = mine[5], mine[6]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the reading thread and wait for it (at most `timeout` s): it stops after the
        block it is tokenizing."""
        self._producer.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __del__(self):
        producer = getattr(self, "_producer", None)   # None: __init__ raised
        if producer is not None:
            producer.stop.set()
