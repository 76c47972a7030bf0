"""Document readers: SlimPajama `.jsonl.zst`, WikiText articles, plain text, HF streams.

Every reader yields `Document`s. A bad record (malformed JSON, no `text`, non-UTF-8 bytes,
a truncated `.zst`, a file without documents) is a `ValueError` naming its file and line,
or, under `on_bad_record='skip'`, is skipped and counted in a `BadRecords` tally.
"""

import collections
import dataclasses
import glob
import itertools
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator

import numpy as np
import zstandard

from jaxgpt import choices

log = logging.getLogger(__name__)

SOURCES = ("text", "wikitext", "slimpajama")
BAD_RECORD_POLICIES = ("error", "skip")
_STDLIB_SKIP = ("test", "tests", "idle_test", "site-packages", "__pycache__")
_ZST_CHUNK = 1 << 20
# A WikiText article starts at a level-1 heading line " = Title = " (level 2 is " = = x = = ").
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    source: str    # SlimPajama's meta.redpajama_set_name; the source kind elsewhere
    where: str     # "file:line" of the record, for messages
    # The fraction of its file before it, in [0, 1): of the bytes (the compressed bytes of
    # a .zst file, to within a read chunk), or of a WikiText file's characters. A stream's
    # measure of progress.
    share: float = 0.0


class BadRecords:
    """Raises on a bad record (policy 'error') or counts it by kind (policy 'skip')."""

    def __init__(self, policy: str, hint: str = " (data.on_bad_record='skip' skips such "
                                                 "records)"):
        choices.check("data.on_bad_record", policy, BAD_RECORD_POLICIES)
        self.policy, self.hint = policy, hint
        self.counts: collections.Counter = collections.Counter()

    def __call__(self, kind: str, where: str, message: str) -> None:
        if self.policy == "error":
            raise ValueError(f"{where}: {message}{self.hint}")
        self.counts[kind] += 1
        log.warning("skipped bad record %s: %s", where, message)


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


def resolve_paths(path: str, name: str = "data.path") -> list[str]:
    """A file, a directory (all files below it) or a glob -> sorted list of files (`name`:
    the setting that gave `path`, for messages). A file reached twice (through a symlinked
    folder or file) is read once, at its own path where that is among them (a link's name
    may say another split), else at its first."""
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(p))
    elif any(c in path for c in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"{name} {path!r} does not exist")
    if not files:
        raise FileNotFoundError(f"{name} {path!r} matches no files")
    seen: dict[str, str] = {}
    for f in files:     # the file's own path over a link's, whose name may say another split
        real = os.path.realpath(f)
        if real not in seen or os.path.abspath(f) == real:
            seen[real] = f
    kept = set(seen.values())
    unique = [f for f in files if f in kept]
    if len(unique) < len(files):
        log.warning("%s %r: %d file(s) reached again through symlinks are read once",
                    name, path, len(files) - len(unique))
    return unique


# WikiText file names -> split, by the words (letter runs) of the name: "wiki.train.tokens",
# "train1.txt", "trainset.txt" are train; "latest" is no test, "invalid" no valid.
_SPLIT_WORDS = {"train": "train", "training": "train", "trainset": "train",
                "valid": "val", "validation": "val", "val": "val", "dev": "val",
                "test": "test", "testset": "test"}


def wikitext_split(path: str) -> str | None:
    """The split a WikiText file's name says ('train', 'val', 'test'), None where it says
    none, or 'mixed' where it names several (`make_train_test_split.py`)."""
    words = re.findall(r"[a-z]+", os.path.basename(path).lower())
    found = {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}
    return "mixed" if len(found) > 1 else (found.pop() if found else None)


def find_splits(source: str, path: str | None) -> dict[str, list[str]]:
    """Input files per split ('train', and 'val' where the source has one); `{}` means the
    source streams from the HF hub (path None).

    SlimPajama: `train/` and `validation/` below `path` (its own layout; `test/` unused), or
    any `.jsonl[.zst]` files. WikiText: files whose names hold the word `train` or `valid`
    (`wiki.train.tokens`; also `training`, `validation`, `val`, `dev`; `test` files are
    unused); a lone file or a folder without a train file is all training text. Text: every
    file.
    """
    choices.check("data.source", source, SOURCES)
    if path is None:
        return {"train": default_corpus_files()} if source == "text" else {}
    if source == "text":
        return {"train": resolve_paths(path)}
    if source == "slimpajama":
        def jsonl(p):
            files = [f for f in resolve_paths(p) if f.endswith((".jsonl.zst", ".jsonl"))]
            if not files:
                raise FileNotFoundError(f"data.path {p!r} holds no .jsonl.zst files")
            return files
        if os.path.isdir(os.path.join(path, "train")):
            splits = {"train": jsonl(os.path.join(path, "train"))}
            if os.path.isdir(os.path.join(path, "validation")):
                splits["val"] = jsonl(os.path.join(path, "validation"))
            return splits
        return {"train": jsonl(path)}
    named = {f: wikitext_split(f) for f in resolve_paths(path)}
    mixed = [f for f, split in named.items() if split == "mixed"]
    files = [f for f, split in named.items() if split in (None, "train", "val")]
    train = [f for f in files if named[f] == "train"]
    val = [f for f in files if named[f] == "val"]
    if not files:
        raise FileNotFoundError(f"data.path {path!r} holds only WikiText test files"
                                + (" or files named for several splits" if mixed else ""))
    # With both splits named, files named for neither are not read; otherwise every file
    # but the test files is training text.
    unread = mixed + ([f for f in files if named[f] is None] if train and val else [])
    if unread:
        log.warning("data.path %r: %d file(s) named for neither train nor valid, or for "
                    "several splits, are not read: %s", path, len(unread),
                    ", ".join(unread[:5]))
    return {"train": train, "val": val} if train and val else {"train": files}


def _zst_lines(path: str) -> Iterator[tuple[int, bytes, float]]:
    """(line number, bytes, share of the compressed file read before the chunk that ended
    the line) of a zstd file, frame by frame; a cut-off frame raises EOFError."""
    dctx = zstandard.ZstdDecompressor()
    dobj, pending, lineno = None, b"", 0
    size = max(os.path.getsize(path), 1)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_ZST_CHUNK), b""):
            share = (f.tell() - len(chunk)) / size
            while chunk:
                if dobj is None or dobj.eof:
                    dobj = dctx.decompressobj()
                try:
                    pending += dobj.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise EOFError(f"corrupt zstd data after line {lineno} ({e})") from None
                chunk = dobj.unused_data if dobj.eof else b""
            *lines, pending = pending.split(b"\n")
            for line in lines:
                lineno += 1
                yield lineno, line, share
    if dobj is not None and not dobj.eof:
        raise EOFError(f"truncated zstd stream after line {lineno}")
    if pending:
        yield lineno + 1, pending, share


def read_jsonl(path: str, bad: BadRecords) -> Iterator[Document]:
    """SlimPajama records `{"text", "meta": {"redpajama_set_name"}}` of a .jsonl[.zst] file."""
    n = 0
    if path.endswith(".zst"):
        lines = _zst_lines(path)
    else:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
        starts = np.cumsum([0] + [len(x) + 1 for x in raw_lines[:-1]])
        size = max(int(starts[-1]) + len(raw_lines[-1]), 1)
        lines = ((i, x, int(start) / size)
                 for i, (x, start) in enumerate(zip(raw_lines, starts), 1))
    try:
        for lineno, raw, share in lines:
            where = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")     # a byte-order mark
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad("non_utf8", where, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                bad("malformed_json", where, f"malformed JSON ({e.msg}: column {e.colno})")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                bad("no_text", where, "record has no string 'text' field")
                continue
            try:   # a JSON escape of half a surrogate pair decodes, but is no text
                rec["text"].encode("utf-8")
            except UnicodeEncodeError as e:
                bad("non_utf8", where, f"'text' holds an unpaired surrogate ({e.reason} at "
                                       f"character {e.start})")
                continue
            meta = rec.get("meta")
            name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
            n += 1
            yield Document(rec["text"], name or "unknown", where, share)
    except EOFError as e:
        bad("truncated_file", path, str(e))
        return
    if n == 0:
        bad("empty_file", path, "holds no documents")


def read_text(path: str, bad: BadRecords) -> Iterator[Document]:
    """A whole file as one document (a leading byte-order mark is not text)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        yield Document(raw.decode("utf-8").removeprefix("\ufeff"), "text", f"{path}:1")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        bad("non_utf8", f"{path}:{line}", f"not valid UTF-8 ({e.reason} at byte {e.start})")


def wikitext_articles(lines: Iterable[str], name: str, total: int = 0) -> Iterator[Document]:
    """Lines -> one document per article, each from its ` = Title = ` line to the next
    (lines may end in LF or CRLF); blank lines before the first title join the first
    article, other text there is a document of its own. Text is kept verbatim (tokenized
    WikiText keeps its ` @-@ ` and `<unk>`, as in published perplexities). `total`: the
    lines' characters, when known, for each document's share."""
    def numbered():
        chars = 0     # before the line
        for n, line in enumerate(lines, 1):
            yield line, (n, chars)
            chars += len(line)
    for text, (start, chars) in tagged_wikitext_articles(numbered()):
        yield Document(text, "wikitext", f"{name}:{start}", chars / total if total else 0.0)


def tagged_wikitext_articles(lines: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """(line, tag) pairs -> (article text, the tag of its first line), articles as
    `wikitext_articles` splits them (the tag: a line number, or a stream's position)."""
    article, start = [], None
    for line, tag in lines:
        if _WIKITEXT_TITLE.match(line.rstrip("\r\n")) and any(s.strip() for s in article):
            yield "".join(article), start
            article = []
        if not article:
            start = tag
        article.append(line)
    if any(s.strip() for s in article):
        yield "".join(article), start


def read_wikitext(path: str, bad: BadRecords) -> Iterator[Document]:
    for doc in read_text(path, bad):
        yield from wikitext_articles(doc.text.splitlines(keepends=True), path, len(doc.text))


READERS = {"text": read_text, "wikitext": read_wikitext, "slimpajama": read_jsonl}


def hf_splittable(source: str) -> bool:
    """Whether an HF stream can be split between processes by rows: SlimPajama's rows are
    documents; WikiText's are lines of articles."""
    return source == "slimpajama"


# jaxgpt's split names -> the HF datasets' split names.
HF_SPLITS = {"train": "train", "val": "validation"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("data.path is unset, so the data would stream from the HF hub, "
                          "which needs `pip install datasets`") from None
    return datasets


def hf_stream(source: str, split: str, part: tuple[int, int] = (0, 1)):
    """A split from the HF hub as a `datasets.IterableDataset` (needs the network): rows of
    SlimPajama-627B are documents `{"text", "meta": {"redpajama_set_name"}}`, rows of
    WikiText-103 (raw) are lines `{"text"}`. `part=(i, n)`: only the i-th of n parts
    (`datasets.distributed.split_dataset_by_node`: whole shard files per part where they
    divide evenly), for `hf_splittable` sources. Its `state_dict()` taken between rows
    resumes it there (`load_state_dict`), reading only the rest of one shard file."""
    if part[1] > 1 and not hf_splittable(source):
        raise ValueError(f"the HF stream of {source!r} cannot be split into parts")
    datasets = _datasets()
    hf_split = HF_SPLITS[split]
    if source == "wikitext":
        return datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split=hf_split,
                                     streaming=True)
    if source != "slimpajama":
        raise ValueError(f"data.source {source!r} has no HF stream; set data.path")
    stream = datasets.load_dataset("cerebras/SlimPajama-627B", split=hf_split, streaming=True)
    if part[1] > 1:
        from datasets.distributed import split_dataset_by_node
        shards = getattr(stream, "n_shards", None)
        if shards is not None and shards % part[1]:
            log.warning("the HF stream has %d shard files, not a multiple of %d "
                        "processes: each reads the whole stream and keeps every %d-th "
                        "document", shards, part[1], part[1])
        stream = split_dataset_by_node(stream, rank=part[0], world_size=part[1])
    return stream


def hf_documents(source: str, split: str, part: tuple[int, int] = (0, 1)) -> Iterator[Document]:
    """Stream a split from the HF hub (`pip install jaxgpt[datasets]`; needs the network).
    `part=(i, n)`: only the i-th of n parts, for `hf_splittable` sources (`hf_stream`)."""
    hf_split = HF_SPLITS[split]
    stream = hf_stream(source, split, part)
    if source == "slimpajama":
        for i, rec in enumerate(stream):
            yield Document(rec["text"], rec["meta"]["redpajama_set_name"],
                           f"hf:cerebras/SlimPajama-627B/{hf_split}:{i}")
    else:
        # Rows are the lines of the raw files, so articles split exactly as local files do.
        yield from wikitext_articles((r["text"] for r in stream),
                                     f"hf:wikitext-103-raw-v1/{hf_split}")


def iter_documents(source: str, files: list[str], bad: BadRecords) -> Iterator[Document]:
    """Every document of `files` in order (the reader is chosen by `source`)."""
    return itertools.chain.from_iterable(READERS[source](f, bad) for f in files)


def part_files(files: list[str], index: int, count: int) -> list[str]:
    """Part `index` of `count` contiguous runs of `files`, sizes differing by at most one:
    the parts in order are `files` (so their token streams join into the whole one)."""
    if not 0 <= index < count:
        raise ValueError(f"part {index} not in [0, {count})")
    return files[index * len(files) // count:(index + 1) * len(files) // count]
