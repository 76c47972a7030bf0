"""Streaming train batches (jaxgpt/stream.py) against a token stream built here from the raw
JSON lines: every window is the stream's next one, blocks are permutations of consecutive
windows, processes split documents, and a saved state resumes exactly."""

import itertools
import json
import logging
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from jaxgpt import data, shards, sources, stream
from tests import helpers

T = 8          # block_size
LOCAL = 4      # windows per batch (one process)


class ByteTokenizer:
    """UTF-8 bytes as ids, end-of-text 256: an encoder independent of the code under test."""

    vocab_size, eot_id, fingerprint = 257, 256, "bytes"

    def encode_batch(self, texts):
        return [list(t.encode()) for t in texts]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 40)))
            for _ in range(n)]


def _corpus(tmp_path, n_files=3, docs_per_file=7):
    """SlimPajama's layout: train/*.jsonl.zst (and .jsonl), validation/; returns (root,
    texts of train in file order)."""
    texts = []
    for split, n in (("train", n_files), ("validation", 1)):
        (tmp_path / split).mkdir()
        for f in range(n):
            docs = _texts(docs_per_file, seed=f if split == "train" else 99)
            lines = "".join(json.dumps({"text": t, "meta": {"redpajama_set_name": "S"}}) + "\n"
                            for t in docs).encode()
            name = tmp_path / split / f"chunk_{f}.jsonl"
            if f % 2:
                name.write_bytes(lines)
            else:
                name.with_suffix(".jsonl.zst").write_bytes(
                    zstandard.ZstdCompressor().compress(lines))
            if split == "train":
                texts += docs
    return str(tmp_path), texts


def _stream_tokens(texts) -> np.ndarray:
    return np.concatenate([np.asarray(list(t.encode()) + [256], np.int32) for t in texts])


def _dcfg(path, **kw):
    kw = {"source": "slimpajama", "path": path, "block_size": T, "streaming": True,
          "shuffle_windows": 10, **kw}
    return data.DataConfig(**kw)


def _windows(tokens: np.ndarray, lo: int, hi: int) -> list[tuple]:
    """Windows lo..hi-1 of a token stream: tokens[j*T : j*T + T + 1]."""
    assert len(tokens) >= hi * T + 1
    return [tuple(tokens[j * T:j * T + T + 1]) for j in range(lo, hi)]


def _rows(batches) -> list[tuple]:
    return [tuple(w) for b in batches for w in b]


def test_blocks_are_shuffled_runs_of_the_stream_across_passes(tmp_path):
    root, texts = _corpus(tmp_path)
    ref = np.tile(_stream_tokens(texts), 4)
    it = stream.StreamIterator(_dcfg(root), ByteTokenizer(), global_batch=LOCAL, seed=0)
    assert it.n_batches == 3                                # 10 windows -> 3 batches of 4
    W = it.n_batches * LOCAL
    n_blocks = 2 * len(ref) // 4 // (W * T) + 1             # past the end of pass 1
    got = _rows(next(it) for _ in range(n_blocks * it.n_batches))
    for b in range(n_blocks):
        assert sorted(got[b * W:(b + 1) * W]) == sorted(_windows(ref, b * W, (b + 1) * W))
    assert got != _windows(ref, 0, n_blocks * W)            # shuffled within blocks
    assert it.epoch >= 1


def test_epochs_follow_the_bytes_read_within_a_single_file(tmp_path):
    # One WikiText file of 40 articles of very different sizes: passes are measured inside
    # the file, not only at its end.
    rng = random.Random(0)
    articles = [f" = Article {i} = \n" + "".join(f" {t}\n" for t in _texts(rng.randint(1, 60), i))
                for i in range(40)]
    (tmp_path / "wiki.train.tokens").write_text("".join(articles))
    (tmp_path / "wiki.valid.tokens").write_text(" = V = \n some text\n")
    per_pass = len(_stream_tokens(articles))
    it = stream.StreamIterator(_dcfg(str(tmp_path), source="wikitext", shuffle_windows=32),
                               ByteTokenizer(), global_batch=LOCAL, seed=0)
    epochs, taken = [], 0
    while taken < 1.5 * per_pass:
        next(it)
        taken += LOCAL * T
        epochs.append((taken / per_pass, it.epoch))
    it.close()
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(epochs))     # never goes back
    # Resolution: the largest document (block starts count whole documents) and a block.
    largest = max(len(a) for a in articles) / sum(len(a) for a in articles)
    block = 32 * T / per_pass
    assert max(abs(e - want) for want, e in epochs) < largest + 2 * block, epochs
    assert epochs[len(epochs) // 3][1] > 0.2 and epochs[-1][1] > 1


@pytest.mark.parametrize("zst, cap", [(False, 0), (True, 0), (True, 200)])
def test_epochs_follow_the_documents_read_across_files_and_under_a_cap(tmp_path, monkeypatch,
                                                                       zst, cap):
    # 4 files (.jsonl, or .zst of a frame per 10 lines, read in 256-byte chunks) of 100
    # documents each, all of one length: bytes, documents and tokens measure a pass alike.
    # Blocks of 2048 tokens span 50 documents, so the estimate must move within a block,
    # not only from one to the next.
    monkeypatch.setattr(sources, "_ZST_CHUNK", 256)
    rng = random.Random(1)
    texts = ["".join(rng.choice("abcdefghij") for _ in range(40)) for _ in range(400)]
    for split, n_files in (("train", 4), ("validation", 1)):
        (tmp_path / split).mkdir()
        for f in range(n_files):
            lines = [(json.dumps({"text": t, "meta": {"redpajama_set_name": "S"}}) + "\n")
                     .encode() for t in texts[f * 100:(f + 1) * 100]]
            name = tmp_path / split / f"chunk_{f}.jsonl"
            if zst:
                name.with_suffix(".jsonl.zst").write_bytes(b"".join(
                    zstandard.ZstdCompressor().compress(b"".join(lines[i:i + 10]))
                    for i in range(0, len(lines), 10)))
            else:
                name.write_bytes(b"".join(lines))
    per_pass = len(_stream_tokens(texts[:cap or None]))
    it = stream.StreamIterator(_dcfg(str(tmp_path), shuffle_windows=256, max_documents=cap),
                               ByteTokenizer(), global_batch=LOCAL, seed=0)
    errors, taken = [], 0
    while taken < 1.3 * per_pass:
        next(it)
        taken += LOCAL * T
        errors.append(it.epoch - taken / per_pass)
    it.close()
    assert max(map(abs, errors)) < 0.03, errors      # a block is 1/8 (cap: 1/4) of a pass


def test_processes_take_alternate_documents(tmp_path):
    root, texts = _corpus(tmp_path)
    for p in range(2):
        ref = np.tile(_stream_tokens(texts[p::2]), 4)
        it = stream.StreamIterator(_dcfg(root), ByteTokenizer(), global_batch=2 * LOCAL,
                                   seed=0, process_index=p, process_count=2)
        batches = [next(it) for _ in range(2 * it.n_batches)]
        assert batches[0].shape == (LOCAL, T + 1)
        got = _rows(batches)
        assert sorted(got) == sorted(_windows(ref, 0, len(got)))


def _local_hub(monkeypatch, asked: tuple, files: dict[str, list[str]]) -> list[str]:
    """An HF hub dataset, offline: the real `datasets` streams local JSON-lines `files` (per
    HF split) wherever jaxgpt calls load_dataset(*asked). Returns the list of the texts of
    the rows read, in order."""
    datasets = pytest.importorskip("datasets", reason="the HF stream needs `datasets`")
    real_load = datasets.load_dataset
    read = []

    def load_dataset(*args, split, streaming):
        assert args == asked and streaming
        return real_load("json", data_files={split: files[split]}, split=split,
                         streaming=True).map(lambda row: read.append(row["text"]) or row)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return read


def _hf_hub(monkeypatch, root):
    """The hub's SlimPajama: the local SlimPajama-layout files of `root` (`_local_hub`)."""
    files = {split: sorted(str(f) for f in (pathlib.Path(root) / split).glob("*.jsonl*"))
             for split in ("train", "validation")}
    return _local_hub(monkeypatch, ("cerebras/SlimPajama-627B",), files)


def test_an_hf_stream_counts_the_documents_of_its_pass(tmp_path, monkeypatch):
    # Its length is unknown, so progress is the pass and the documents read in it: 120
    # documents of ~21 tokens, blocks of 40 windows of 8 tokens (~15 documents), counted
    # within a block too.
    root, texts = _corpus(tmp_path, docs_per_file=40)
    _hf_hub(monkeypatch, root)
    it = stream.StreamIterator(_dcfg(None, shuffle_windows=40), ByteTokenizer(),
                               global_batch=LOCAL, seed=0)
    per_doc = len(_stream_tokens(texts)) / len(texts)
    seen, taken = [], 0
    while taken < 1.5 * len(_stream_tokens(texts)):
        next(it)
        taken += LOCAL * T
        seen.append((int(it.epoch), it.documents, taken / per_doc))
    it.close()
    first = [(docs, want) for passes, docs, want in seen if passes == 0]
    assert [d for d, _ in first] == sorted(d for d, _ in first) and first[-1][0] > 90
    # The block that crosses into the next pass stays at its first document.
    assert all(abs(docs - want) <= 4 for docs, want in first if want < 100), first
    assert all(-16 <= docs - want <= 4 for docs, want in first), first
    later = [(docs, want - len(texts)) for passes, docs, want in seen if passes == 1]
    assert later and all(abs(docs - want) <= 4 for docs, want in later), later
    files = tmp_path / "files"
    files.mkdir()
    assert stream.StreamIterator(_dcfg(_corpus(files)[0]), ByteTokenizer(), global_batch=LOCAL,
                                 seed=0).documents is None        # files: epochs say it


def _states_and_batches(it, n: int) -> tuple[list, list]:
    """The state before each of the next n batches, and the batches; then stops `it`."""
    states, batches = [], []
    for _ in range(n):
        states.append(it.get_state())
        batches.append(next(it))
    it.close()
    return states, batches


@pytest.mark.parametrize("kind", ["files", "hf"])
def test_a_saved_state_resumes_exactly(tmp_path, monkeypatch, kind):
    root, texts = _corpus(tmp_path)
    if kind == "hf":
        read = _hf_hub(monkeypatch, root)
        root = None
    make = lambda: stream.StreamIterator(_dcfg(root), ByteTokenizer(), global_batch=LOCAL,
                                         seed=3)
    it = make()
    states, batches = _states_and_batches(it, 5 * it.n_batches)
    # Block starts, mid-block, the last batch of a block, across the end of a pass.
    for k in (0, 1, it.n_batches - 1, it.n_batches, 2 * it.n_batches + 1, len(batches) - 3):
        again = make()
        again.set_state(json.loads(json.dumps(states[k])))   # as a checkpoint stores it
        before = len(read) if kind == "hf" else 0
        for want in batches[k:k + 3]:
            np.testing.assert_array_equal(next(again), want)
        again.close()
        if kind == "hf":
            # The stream resumed at the block's first document: nothing before it was read.
            doc = states[k]["processes"][0][1]
            assert doc == 0 or states[k]["hf_states"][0] is not None
            assert read[before] == texts[doc], k


def test_the_hf_wikitext_stream_resumes_at_an_articles_title_line(tmp_path, monkeypatch):
    """WikiText-103's HF rows are lines: a saved state points before the title line of the
    block's first article, so a resume reads nothing before it."""
    rng = random.Random(0)
    lines = [" = Intro text before any title = = \n", " stray\n"]   # joins the first article
    for k in range(12):
        lines += [f" = Article {k} = \n", "\n"] + [
            " " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"])
                           for _ in range(rng.randint(3, 12))) + " \n"
            for _ in range(rng.randint(1, 4))]
    rows = tmp_path / "wikitext.jsonl"
    rows.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    read = _local_hub(monkeypatch, ("wikitext", "wikitext-103-raw-v1"), {"train": [str(rows)]})
    articles = [d.text for d in sources.wikitext_articles(lines, "w")]
    make = lambda: stream.StreamIterator(_dcfg(None, source="wikitext"), ByteTokenizer(),
                                         global_batch=LOCAL, seed=1)
    it = make()
    states, batches = _states_and_batches(it, 6 * it.n_batches)
    ref = np.tile(_stream_tokens(articles), 8)       # the articles as local files split them
    W = it.n_batches * LOCAL
    assert sorted(_rows(batches[:it.n_batches])) == sorted(_windows(ref, 0, W))
    resumed_inside = 0
    for k in range(it.n_batches, len(batches) - 2, it.n_batches):    # block starts
        doc = states[k]["processes"][0][1]
        read.clear()
        again = make()
        again.set_state(json.loads(json.dumps(states[k])))
        for want in batches[k:k + 2]:
            np.testing.assert_array_equal(next(again), want)
        again.close()
        if doc:
            assert read[0] == articles[doc].splitlines(keepends=True)[0], k
            resumed_inside += 1
    assert resumed_inside >= 2


def test_an_hf_state_that_does_not_load_falls_back_to_reading_again(tmp_path, monkeypatch,
                                                                  caplog):
    root, _ = _corpus(tmp_path)
    _hf_hub(monkeypatch, root)
    make = lambda: stream.StreamIterator(_dcfg(None), ByteTokenizer(), global_batch=LOCAL,
                                         seed=3)
    it = make()
    for _ in range(it.n_batches + 1):
        next(it)
    state, want = it.get_state(), [next(it) for _ in range(3)]
    it.close()
    state["hf_states"] = ['{"examples_iterable": "from another version"}']
    again = make()
    again.set_state(state)
    with caplog.at_level(logging.INFO):
        for w in want:
            np.testing.assert_array_equal(next(again), w)
    again.close()
    assert "its saved state did not load" in caplog.text
    state["hf_states"] = ["{}", None]
    with pytest.raises(ValueError, match="bad HF stream states"):
        make().set_state(state)


def _hf_parts(n: int) -> list[list[str]]:
    """The texts each of n processes gets of the (stand-in) hub stream, from `datasets`'
    own split_dataset_by_node."""
    import datasets
    from datasets.distributed import split_dataset_by_node
    return [[r["text"] for r in split_dataset_by_node(
        datasets.load_dataset("cerebras/SlimPajama-627B", split="train", streaming=True),
        rank=p, world_size=n)] for p in range(n)]


@pytest.mark.parametrize("n_files", [4, 3])
def test_processes_read_their_own_part_of_an_hf_stream(tmp_path, monkeypatch, n_files):
    # 4 shard files: two for each process; 3: each process keeps every other row.
    root, texts = _corpus(tmp_path, n_files=n_files)
    _hf_hub(monkeypatch, root)
    parts = _hf_parts(2)
    assert sorted(parts[0] + parts[1]) == sorted(texts) and all(parts)
    for p, mine in enumerate(parts):
        it = stream.StreamIterator(_dcfg(None), ByteTokenizer(), global_batch=2 * LOCAL,
                                   seed=0, process_index=p, process_count=2)
        ref = np.tile(_stream_tokens(mine), 4)
        got = _rows(next(it) for _ in range(2 * it.n_batches))
        it.close()
        assert sorted(got) == sorted(_windows(ref, 0, len(got)))
        # Documents read count every process's: about twice this part's, to within a block.
        own = len(got) * T / (len(_stream_tokens(mine)) / len(mine)) % len(mine)
        assert abs(it.documents - 2 * own) <= 4, (it.documents, own)


def test_max_documents_caps_each_pass(tmp_path):
    root, texts = _corpus(tmp_path)
    ref = np.tile(_stream_tokens(texts[:4]), 20)
    it = stream.StreamIterator(_dcfg(root, max_documents=4), ByteTokenizer(),
                               global_batch=LOCAL, seed=0)
    got = _rows(next(it) for _ in range(2 * it.n_batches))
    assert sorted(got) == sorted(_windows(ref, 0, len(got)))


def test_bad_record_is_raised_with_its_line_or_skipped(tmp_path):
    root, texts = _corpus(tmp_path, n_files=1)
    with open(tmp_path / "train" / "chunk_1.jsonl", "w") as f:
        f.write(json.dumps({"text": "fine"}) + "\n{not json\n")
    it = stream.StreamIterator(_dcfg(root, shuffle_windows=1000), ByteTokenizer(),
                               global_batch=LOCAL, seed=0)
    with pytest.raises(ValueError, match=r"chunk_1\.jsonl:2"):
        next(it)
    it = stream.StreamIterator(_dcfg(root, on_bad_record="skip"), ByteTokenizer(),
                               global_batch=LOCAL, seed=0)
    ref = np.tile(_stream_tokens(texts + ["fine"]), 4)
    got = _rows(next(it) for _ in range(it.n_batches))
    assert sorted(got) == sorted(_windows(ref, 0, len(got)))
    # Counted for the metrics records (once per pass that read it): after three blocks,
    # more tokens than a pass, the reader has passed the bad line at least once.
    for _ in range(2 * it.n_batches):
        next(it)
    assert it.bad_records.get("malformed_json", 0) >= 1
    assert data.stream_stats(it) == {"bad_records": it.bad_records}


def test_refusals(tmp_path):
    root, _ = _corpus(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("some text")
    with pytest.raises(ValueError, match="needs a validation split"):
        stream.check_inputs(_dcfg(str(text), source="text"))
    with pytest.raises(ValueError, match="data.mixture"):
        _dcfg(root, mixture={"S": 1.0})
    it = stream.StreamIterator(_dcfg(root), ByteTokenizer(), global_batch=LOCAL, seed=0)
    state = it.get_state()
    two = stream.StreamIterator(_dcfg(root), ByteTokenizer(), global_batch=2 * LOCAL, seed=0,
                                process_count=2)
    with pytest.raises(ValueError, match="holds 1 processes, but this run has 2"):
        two.set_state(state)
    with pytest.raises(ValueError, match="not a streaming iterator state"):
        it.set_state({"position": 5})


def test_streaming_prepares_only_validation(tmp_path):
    (tmp_path / "in").mkdir()
    root, _ = _corpus(tmp_path / "in")
    corpus = data.load_corpus(_dcfg(root), ByteTokenizer(), cache_dir=str(tmp_path / "cache"))
    assert len(corpus.train) == 0 and len(corpus.val) > 0
    assert set(corpus.stats["tokens"]) == {"val"}


def test_val_max_documents_caps_validation_by_whole_files_and_not_train(tmp_path):
    (tmp_path / "in").mkdir()
    root, texts = _corpus(tmp_path / "in")
    for f in (1, 2):     # three validation files of 7 documents
        shutil.copy(tmp_path / "in" / "validation" / "chunk_0.jsonl.zst",
                    tmp_path / "in" / "validation" / f"chunk_{f}.jsonl.zst")
    whole = data.load_corpus(_dcfg(root), ByteTokenizer(), cache_dir=str(tmp_path / "a"))
    capped = data.load_corpus(_dcfg(root, val_max_documents=9), ByteTokenizer(),
                              cache_dir=str(tmp_path / "b"))
    assert whole.stats["documents"]["val"] == {"S": 21}
    assert capped.stats["documents"]["val"] == {"S": 14}      # files are read whole
    it = stream.StreamIterator(_dcfg(root, val_max_documents=9), ByteTokenizer(),
                               global_batch=LOCAL, seed=0)
    got = _rows(next(it) for _ in range(4 * it.n_batches))
    it.close()
    ref = np.tile(_stream_tokens(texts), 4)                   # every train document
    assert sorted(got) == sorted(_windows(ref, 0, len(got)))
    with pytest.raises(ValueError, match="data.source 'text' holds out"):
        _dcfg(root, source="text", val_max_documents=9)


def test_val_max_documents_is_shared_between_parts_and_part_of_their_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    root, texts = _corpus(tmp_path / "in")
    for f in (1, 2, 3):     # four validation files of 7 documents: two for each part
        shutil.copy(tmp_path / "in" / "validation" / "chunk_0.jsonl.zst",
                    tmp_path / "in" / "validation" / f"chunk_{f}.jsonl.zst")
    dcfg = data.DataConfig(source="slimpajama", path=root, block_size=T, val_max_documents=10)
    out = str(tmp_path / "parts")
    for i in (0, 1):        # each part reads whole files until it has 5 (half of 10)
        shards.prepare(dcfg, ByteTokenizer(), out, part=(i, 2))
    merged = shards.merge(out)
    assert merged["splits"]["val"]["documents"] == {"S": 14}
    assert merged["splits"]["train"]["documents"] == {"S": len(texts)}
    other = str(tmp_path / "other")
    shards.prepare(dcfg, ByteTokenizer(), other, part=(0, 2))
    shards.prepare(data.DataConfig(**{**dcfg.__dict__, "val_max_documents": 20}),
                   ByteTokenizer(), other, part=(1, 2))
    with pytest.raises(ValueError, match="part 1 was prepared from other input files"):
        shards.merge(other)


def test_huge_documents_are_tokenized_as_needed_not_a_chunk_at_a_time(tmp_path):
    root, _ = _corpus(tmp_path)
    it = stream.StreamIterator(_dcfg(root), ByteTokenizer(), global_batch=LOCAL, seed=0)
    docs = iter((stream.Cursor(doc=i), "x" * 1000) for i in range(50))
    got = it._producer._tokens(docs, needed=1500)
    assert [c.doc for c, _ in got] == [0, 1] and got[0][1].size == 1001
    assert next(docs)[0].doc == 2                           # nothing read beyond them


def test_an_error_is_raised_again_not_waited_for(tmp_path):
    root, _ = _corpus(tmp_path, n_files=1)
    with open(tmp_path / "train" / "chunk_1.jsonl", "w") as f:
        f.write("{not json\n")
    it = stream.StreamIterator(_dcfg(root, shuffle_windows=1000), ByteTokenizer(),
                               global_batch=LOCAL, seed=0)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"chunk_1\.jsonl:1"):
            next(it)


def test_a_moved_copy_of_the_data_keeps_the_fingerprint_a_changed_one_does_not(tmp_path):
    (tmp_path / "a").mkdir()
    root, _ = _corpus(tmp_path / "a")
    before = stream.inputs_fingerprint(_dcfg(root))
    shutil.copytree(root, tmp_path / "b")
    assert stream.inputs_fingerprint(_dcfg(str(tmp_path / "b"))) == before
    with open(tmp_path / "b" / "train" / "chunk_1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert stream.inputs_fingerprint(_dcfg(str(tmp_path / "b"))) != before
    assert stream.inputs_fingerprint(_dcfg(root, max_documents=3)) != before


def test_a_stream_stopped_by_a_bad_record_resumes_under_skip_where_it_stopped(tmp_path):
    root, _ = _corpus(tmp_path, n_files=3)
    with open(tmp_path / "train" / "chunk_1.jsonl", "a") as f:
        f.write("{not json\n")
    strict, lenient = _dcfg(root, shuffle_windows=4), _dcfg(root, shuffle_windows=4,
                                                            on_bad_record="skip")
    assert stream.inputs_fingerprint(strict) == stream.inputs_fingerprint(lenient)
    it = stream.StreamIterator(strict, ByteTokenizer(), global_batch=LOCAL, seed=0)
    states = []
    with pytest.raises(ValueError, match=r"chunk_1\.jsonl"):
        while True:
            states.append(it.get_state())
            next(it)
    assert len(states) > 2                   # it trained for a while before the bad line
    ref = stream.StreamIterator(lenient, ByteTokenizer(), global_batch=LOCAL, seed=0)
    want = [next(ref) for _ in range(len(states) + 5)]
    again = stream.StreamIterator(lenient, ByteTokenizer(), global_batch=LOCAL, seed=0)
    again.set_state(states[-2])
    for w in want[len(states) - 2:]:
        np.testing.assert_array_equal(next(again), w)


def test_max_documents_of_a_split_hf_stream_counts_all_parts_together(tmp_path, monkeypatch):
    root, _ = _corpus(tmp_path, n_files=4)
    _hf_hub(monkeypatch, root)
    for p, part in enumerate(_hf_parts(2)):
        mine = part[:2]                                              # 4 documents: 2 each
        it = stream.StreamIterator(_dcfg(None, max_documents=4), ByteTokenizer(),
                                   global_batch=2 * LOCAL, seed=0, process_index=p,
                                   process_count=2)
        ref = np.tile(_stream_tokens(mine), 40)
        got = _rows(next(it) for _ in range(2 * it.n_batches))
        it.close()
        assert sorted(got) == sorted(_windows(ref, 0, len(got)))


def test_the_pipeline_fingerprint_covers_the_validation_text(tmp_path):
    pipelines = []
    for name, extra in (("a", ""), ("b", ""), ("c", " and more")):
        (tmp_path / name).mkdir()
        root, _ = _corpus(tmp_path / name)
        with open(tmp_path / name / "validation" / "chunk_0.jsonl.zst", "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(
                (json.dumps({"text": "held out" + extra}) + "\n").encode()))
        dcfg = _dcfg(root, block_size=2)
        corpus = data.load_corpus(dcfg, ByteTokenizer(), cache_dir=str(tmp_path / name / "c"))
        pipelines.append(data.train_iterator(corpus, dcfg, ByteTokenizer(), global_batch=LOCAL,
                                             seed=0)[1])
    assert pipelines[0] == pipelines[1] != pipelines[2]     # a copy elsewhere; other text


_WORKER = """
import json, sys
import jax
import pytest
jax.config.update("jax_cpu_collectives_implementation", "gloo")
p, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=p,
                           heartbeat_timeout_seconds=10)
from jaxgpt import stream
from tests import test_stream as t
with pytest.MonkeyPatch.context() as mp:
    t._hf_hub(mp, root)
    it = stream.StreamIterator(t._dcfg(None), t.ByteTokenizer(), global_batch=2 * t.LOCAL,
                               seed=0, process_index=p, process_count=2)
    for _ in range(it.n_batches + 1):
        next(it)
    state = it.get_state()          # a collective: both processes' states
    print("RESULT", json.dumps({"state": state, "next": next(it).tolist()}))
    it.close()
"""


@pytest.mark.slow
def test_every_process_saves_its_hf_stream_state_and_each_resumes_from_it(tmp_path,
                                                                       monkeypatch):
    # 3 shard files for 2 processes: each reads every other row of the whole stream (whole
    # files per process resume as one process's stream does, tested above).
    root, _ = _corpus(tmp_path, n_files=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(p), str(port), root],
                              cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
             for p in range(2)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out.split("RESULT ", 1)[1]) for out, _ in outs]
    state = results[0]["state"]
    assert results[1]["state"] == state
    hf = state["hf_states"]
    assert len(hf) == 2 and None not in hf and hf[0] != hf[1]
    read = _hf_hub(monkeypatch, root)
    parts = _hf_parts(2)
    read.clear()
    for p in range(2):       # each process's part resumes from its own saved stream state
        again = stream.StreamIterator(_dcfg(None), ByteTokenizer(), global_batch=2 * LOCAL,
                                      seed=0, process_index=p, process_count=2)
        again.set_state(state)
        np.testing.assert_array_equal(next(again), results[p]["next"])
        again.close()
        # Read from the block's first document on: in this mode a process reads the other's
        # rows too, so at most one row comes before it.
        doc = state["processes"][p][1]
        assert doc > 2 and read.index(parts[p][doc]) < 2
        read.clear()
