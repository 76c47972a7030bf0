"""Token shards: documents read and tokenized once into `.bin` shards and a `manifest.json`.

`prepare` reads a corpus's files (grain threads, file order kept), tokenizes them and
writes SPLIT/SOURCE/NNNNN.bin shards (`uint16`/`uint32`) plus a manifest of tokens,
documents and bad records; `data.load_prepared` serves windows from them. A large corpus
is prepared in parts on many machines, each part a contiguous run of every split's files
(`--part=I/N`), then joined by `merge` into one manifest over the parts' shards, holding
each source's tokens in the order a single `prepare` writes them (in more shards).

    python -m jaxgpt.shards prepare --config=configs/slimpajama.py --out=DIR [--part=I/N]
    python -m jaxgpt.shards merge --out=DIR
"""

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import time

import grain
import numpy as np

from jaxgpt import report, sources, tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 27            # tokens per .bin shard (256 MB as uint16)
_HF_CHUNK_DOCS = 4096             # documents per tokenization task for HF streams
_TOKENIZER_TRAIN_CHARS = 100_000_000
_PART = re.compile(r"part-(\d{5})-of-(\d{5})")
PART_VERSION = 2                  # parts record their input files' stamps
PROGRESS_EVERY_S = 30.0           # seconds between progress lines while preparing

# `dcfg` below is a `data.DataConfig`.


# ---- inputs ---------------------------------------------------------------------------


def find_inputs(dcfg) -> dict[str, list[str]]:
    """Input files per split (checked before anything is written); {} = an HF stream."""
    if dcfg.prepared is not None:
        return {}
    return sources.find_splits(dcfg.source, dcfg.path)


def _file_stamp(path: str) -> str:
    """What says a file has changed without reading it: its size and modification time in
    nanoseconds (a copy that keeps the modification time, `cp -p`, goes unnoticed; the
    change time would notice it, but also every chmod and every machine's own copy, each
    costing a corpus's tokenization)."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def input_stamps(splits: dict) -> dict[str, str]:
    """{absolute path: `_file_stamp`} of every input file, recorded in a manifest."""
    return {os.path.abspath(f): _file_stamp(f) for files in splits.values() for f in files}


def stale_inputs(manifest: dict) -> list[str]:
    """Input files changed since `manifest` was prepared (by its recorded stamps; a manifest
    without them, from an older jaxgpt, is taken as it is)."""
    out = []
    for path, stamp in manifest.get("stamps", {}).items():
        try:
            now = _file_stamp(path)
        except OSError:
            now = None
        if now != stamp:
            out.append(path)
    return out


def inputs_fingerprint(dcfg, tokenizer_fingerprint: str) -> str:
    """Hash of the inputs (paths, sizes, mtimes in seconds) and everything that shapes their
    tokens: the name of their prepared cache. Changes within a second are caught by the
    stamps the manifest records (`stale_inputs`)."""
    h = hashlib.sha256(f"{tokenizer_fingerprint}|{dcfg.source}|{dcfg.on_bad_record}|"
                       f"{dcfg.max_documents}".encode())
    if dcfg.val_max_documents:     # (absent when 0, so older caches keep their names)
        h.update(f"|val:{dcfg.val_max_documents}".encode())
    for split, files in sorted(find_inputs(dcfg).items()):
        for path in files:
            st = os.stat(path)
            h.update(f"{split}:{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def tokenizer_training_texts(dcfg) -> list[str]:
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


def _tokenized_files(files, dcfg, tok):
    """Files read and tokenized by `read_threads` grain threads; results in file order."""
    stage = lambda f: _read_and_tokenize(f, source=dcfg.source, tok=tok,
                                         on_bad_record=dcfg.on_bad_record)
    threads = max(dcfg.read_threads, 1)
    ds = grain.MapDataset.source(files).map(stage)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                     prefetch_buffer_size=threads)))


def _tokenized_stream(split: str, dcfg, tok):
    """An HF stream in chunks of documents (bad records there are the hub's to fix)."""
    docs = itertools.islice(sources.hf_documents(dcfg.source, split),
                            documents_cap(dcfg, split) or None)
    while chunk := list(itertools.islice(docs, _HF_CHUNK_DOCS)):
        yield _tokenize_by_source(chunk, tok), {}


# ---- token shards ----------------------------------------------------------------------


def _add_counts(total: dict, counts: dict) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v


class _ShardWriter:
    """Appends tokens to SPLIT/SOURCE/NNNNN.bin files of at most SHARD_TOKENS tokens."""

    def __init__(self, root: str, split: str, dtype):
        self.root, self.split, self.dtype = root, split, dtype
        self.shards: list[dict] = []
        self.open: dict[str, dict] = {}
        self.documents: dict[str, int] = {}

    def add(self, name: str, tokens: np.ndarray, n_docs: int) -> None:
        _add_counts(self.documents, {name: n_docs})
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


class _Progress:
    """A log line every PROGRESS_EVERY_S seconds while a split is prepared: files (or HF
    chunks) done, documents, tokens, tokens/s and, for files, an ETA."""

    def __init__(self, split: str, n_files: int):
        self.split, self.n_files, self.done = split, n_files, 0
        self.start = self.last = time.monotonic()

    def step(self, n_docs: int, n_tokens: int) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and self.done != self.n_files:
            return
        self.last, rate = now, self.done / max(now - self.start, 1e-9)
        where = (f"{self.done:,}/{self.n_files:,} files" if self.n_files
                 else f"{self.done:,} chunks of {_HF_CHUNK_DOCS} documents")
        eta = (f", ETA {report.format_duration((self.n_files - self.done) / rate)}"
               if self.n_files else "")
        log.info("prepare %s: %s, %s documents, %s tokens, %.2fM tokens/s%s", self.split,
                 where, f"{n_docs:,}", f"{n_tokens:,}",
                 n_tokens / max(now - self.start, 1e-9) / 1e6, eta)


def documents_cap(dcfg, split: str) -> int:
    """How many documents of `split` to prepare (0 = all): data.max_documents, and for the
    validation split also data.val_max_documents, whichever is smaller."""
    caps = [dcfg.max_documents, dcfg.val_max_documents if split == "val" else 0]
    return min((c for c in caps if c), default=0)


def _write_splits(dcfg, tok, splits: dict, tmp: str, manifest: dict, only=None) -> None:
    dtype = np.dtype(manifest["dtype"])
    bad_total: dict[str, int] = {}
    for split in (splits or {"train": None, "val": None}):
        if only is not None and split not in only:
            continue
        writer = _ShardWriter(tmp, split, dtype)
        results = (_tokenized_files(splits[split], dcfg, tok) if splits
                   else _tokenized_stream(split, dcfg, tok))
        n_docs, n_tokens, progress = 0, 0, _Progress(split, len(splits.get(split) or ()))
        cap = documents_cap(dcfg, split)
        for by_source, bad in results:
            for name, (tokens, docs) in by_source.items():
                writer.add(name, tokens, docs)
                n_docs += docs
                n_tokens += tokens.size
            _add_counts(bad_total, bad)
            progress.step(n_docs, n_tokens)
            if cap and n_docs >= cap:
                break
        tokens = {}
        for s in writer.shards:
            _add_counts(tokens, {s["source"]: s["tokens"]})
        manifest["splits"][split] = {"shards": writer.shards, "tokens": tokens,
                                     "documents": writer.documents}
        log.info("prepared %s: %d documents, tokens per source %s", split,
                 sum(writer.documents.values()), tokens)
    manifest["bad_records"] = bad_total
    train = manifest["splits"].get("train")
    # Nothing but the end-of-text id after each document: every document was empty.
    if train is not None and sum(train["tokens"].values()) <= sum(train["documents"].values()):
        files = splits.get("train", [])
        raise ValueError(f"the corpus is empty: {len(files)} {dcfg.source} file(s) hold no "
                         f"text (first: {files[0] if files else dcfg.source})")


# ---- prepare, in one piece or in parts ---------------------------------------------------


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def is_part(name: str) -> bool:
    return _PART.fullmatch(name) is not None


def _part_inputs(dcfg, splits: dict, index: int, count: int) -> tuple[dict, dict]:
    """Part `index` of `count`: a contiguous run of each split's files, and the record that
    `merge` checks (the same inputs and options in every part)."""
    if not 0 <= index < count:
        raise ValueError(f"part {index}/{count}: the index must be in [0, {count})")
    if not splits:
        raise ValueError(f"data.source {dcfg.source!r} with no data.path streams from the HF "
                         f"hub, which is prepared in one piece, not in parts")
    if dcfg.max_documents:
        raise ValueError(f"data.max_documents={dcfg.max_documents} caps a whole preparation "
                         f"and cannot be split into parts")
    if len(splits["train"]) < count:
        raise ValueError(f"{len(splits['train'])} train files cannot be split into {count} "
                         f"parts")
    options = [splits, dcfg.source, dcfg.on_bad_record, input_stamps(splits)] + (
        [dcfg.val_max_documents] if dcfg.val_max_documents else [])
    record = json.dumps(options, sort_keys=True)
    info = {"index": index, "count": count, "version": PART_VERSION,
            "inputs": hashlib.sha256(record.encode()).hexdigest()[:16]}
    return {k: sources.part_files(files, index, count) for k, files in splits.items()}, info


def _read_manifest(root: str) -> dict | None:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def prepare(dcfg, tok, out_dir: str, part: tuple[int, int] | None = None,
            only: tuple[str, ...] | None = None) -> dict:
    """Read, tokenize and write every split's token shards and a manifest into `out_dir`.

    Written into a folder private to this process and renamed at the end, so `out_dir` is
    complete or absent, also when several hosts prepare the same shared folder at once.
    With `part=(i, n)` only part i of every split's files is prepared (of its validation
    files, 1/n of data.val_max_documents), into out_dir/part-0000i-of-0000n/; a part
    already there from the same inputs and tokenizer is kept (so a rerun array job redoes
    only what failed). `only` names the splits to write (streaming prepares only "val").
    Returns the manifest.
    """
    splits, info = find_inputs(dcfg), None
    if part is not None:
        splits, info = _part_inputs(dcfg, splits, *part)
        if dcfg.val_max_documents:    # each part's share of the cap (by whole files)
            dcfg = dataclasses.replace(
                dcfg, val_max_documents=-(-dcfg.val_max_documents // part[1]))
        out_dir = os.path.join(out_dir, part_name(*part))
        done = _read_manifest(out_dir)
        if done is not None and done.get("part") == info and (
                done["tokenizer"]["fingerprint"] == tok.fingerprint):
            log.info("%s is prepared already; kept", out_dir)
            return done
        if done is not None:
            why = ("by an older jaxgpt, which recorded no input stamps" if done.get(
                "part", {}).get("version") != PART_VERSION else "from other inputs or options "
                "(an input file changed since, or the tokenizer or data options differ)")
            raise FileExistsError(f"{out_dir} was prepared {why}; remove it to prepare this "
                                  f"part again")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out")
    tmp = f"{out_dir.rstrip('/')}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = np.dtype(_token_dtype(tok.vocab_size)).name
    manifest = {"format": 1, "source": dcfg.source, "dtype": dtype,
                "tokenizer": {"kind": dcfg.tokenizer, "fingerprint": tok.fingerprint,
                              "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
                "inputs": splits or {"hf": [dcfg.source]}, "splits": {}, "bad_records": {}}
    if splits and part is None:   # of the splits written (streaming writes only "val")
        manifest["stamps"] = input_stamps({k: v for k, v in splits.items()
                                           if only is None or k in only})
    if info is not None:
        manifest["part"] = info
    try:
        _write_splits(dcfg, tok, splits, tmp, manifest, only)
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
        manifest = _read_manifest(out_dir)
    return manifest


def merge(out_dir: str) -> dict:
    """One manifest.json in `out_dir` over the shards of all its parts, in part order.

    Every part 0..n-1 must be there, prepared from the same inputs, options and tokenizer;
    the shards stay where the parts wrote them. Returns the merged manifest.
    """
    final = os.path.join(out_dir, MANIFEST)
    if os.path.exists(final):
        raise FileExistsError(f"{final} exists: {out_dir} is complete already")
    names = sorted(d for d in os.listdir(out_dir) if is_part(d)) if os.path.isdir(
        out_dir) else []
    if not names:
        raise FileNotFoundError(f"{out_dir} holds no part-IIIII-of-NNNNN folders; write them "
                                f"with `python -m jaxgpt.shards prepare --part=I/N`")
    counts = sorted({int(_PART.fullmatch(d)[2]) for d in names})
    if len(counts) > 1:
        raise ValueError(f"{out_dir} holds parts of {counts} parts at once: {names}")
    count = counts[0]
    manifests = [_read_manifest(os.path.join(out_dir, part_name(i, count)))
                 for i in range(count)]
    missing = [i for i, m in enumerate(manifests) if m is None]
    if missing:
        busy = sorted(d for d in os.listdir(out_dir) if ".partial-" in d)
        raise FileNotFoundError(
            f"{out_dir}: part(s) {missing} of {count} are not prepared (run prepare with "
            f"--part={missing[0]}/{count}, ...)"
            + (f"; unfinished or crashed: {', '.join(busy)}" if busy else ""))
    first = manifests[0]
    for i, m in enumerate(manifests):
        for key in ("format", "source", "dtype", "tokenizer"):
            if m[key] != first[key]:
                raise ValueError(f"{out_dir}: part {i} has {key} {m[key]!r}, part 0 has "
                                 f"{first[key]!r}")
        if m.get("part", {}).get("version") != first["part"].get("version"):
            raise ValueError(f"{out_dir}: parts 0 and {i} were prepared by different "
                             f"jaxgpt versions; prepare the older ones again")
        if m.get("part", {}).get("inputs") != first["part"]["inputs"]:
            raise ValueError(f"{out_dir}: part {i} was prepared from other input files or "
                             f"data options than part 0")
    merged = {k: first[k] for k in ("format", "source", "dtype", "tokenizer")}
    merged.update(parts=count, inputs={}, splits={}, bad_records={})
    for i, m in enumerate(manifests):
        for split, files in m["inputs"].items():
            merged["inputs"].setdefault(split, []).extend(files)
        _add_counts(merged["bad_records"], m["bad_records"])
        for split, entry in m["splits"].items():
            into = merged["splits"].setdefault(split, {"shards": [], "tokens": {},
                                                       "documents": {}})
            into["shards"] += [{**s, "path": os.path.join(part_name(i, count), s["path"])}
                               for s in entry["shards"]]
            _add_counts(into["tokens"], entry["tokens"])
            _add_counts(into["documents"], entry["documents"])
    for entry in merged["splits"].values():   # each source's shards together, in part order
        order = {name: k for k, name in enumerate(dict.fromkeys(
            s["source"] for s in entry["shards"]))}
        entry["shards"].sort(key=lambda s: order[s["source"]])
    tmp = f"{final}.partial-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(tmp, final)
    return merged


# ---- CLI -------------------------------------------------------------------------------


def _parse_part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m[2]) < 1:
        raise ValueError(f"--part={text!r}: expected I/N with 0 <= I < N, e.g. 3/8")
    return int(m[1]), int(m[2])


def _load_tokenizer(config, dcfg, out: str, part):
    if dcfg.tokenizer == "gpt2" or dcfg.tokenizer_path:
        return tokenizer.load(dcfg.tokenizer, dcfg.tokenizer_path or "gpt2")
    if part is not None:
        raise ValueError("--part needs one tokenizer for all parts: set data.tokenizer=gpt2 "
                         "or data.tokenizer_path (`python -m jaxgpt.tokenizer train`)")
    return tokenizer.load_or_train_sentencepiece(
        out.rstrip("/") + ".tokenizer.model", tokenizer_training_texts(dcfg),
        config.model.vocab_size)


def _main(argv):
    from absl import flags

    from jaxgpt import data
    usage = ("usage: python -m jaxgpt.shards prepare --config=CONFIG --out=DIR [--part=I/N]\n"
             "       python -m jaxgpt.shards merge --out=DIR")
    command = argv[1] if len(argv) == 2 else None
    out = flags.FLAGS.out
    try:
        if command == "merge":
            manifest = merge(out)
        elif command == "prepare" and flags.FLAGS.config is not None:
            part = _parse_part(flags.FLAGS.part) if flags.FLAGS.part else None
            config = flags.FLAGS.config
            dcfg = data.DataConfig.from_config(config.data)
            manifest = prepare(dcfg, _load_tokenizer(config, dcfg, out, part), out, part)
        else:
            raise SystemExit(usage)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: manifest[k] for k in ("tokenizer", "bad_records")}
                     | {s: v["tokens"] for s, v in manifest["splits"].items()}, indent=1))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/*.py[:size]", lock_config=True)
    flags.DEFINE_string("out", None, "directory to write token shards and manifest.json into")
    flags.DEFINE_string("part", None, "I/N: prepare only part I of N (0-based) into "
                        "OUT/part-IIIII-of-NNNNN/; then `merge --out=OUT`")
    flags.mark_flags_as_required(["out"])
    from jaxgpt import config as config_schema
    app.run(_main, flags_parser=config_schema.parse_flags)
