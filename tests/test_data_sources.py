"""Document readers: SlimPajama layout and sharding, WikiText articles, every bad input."""

import json
import logging
import os
import pathlib
import re
import sys
import types

import numpy as np
import pytest
import zstandard

from jaxgpt import data, shards, sources


def _raw_records(path):
    """Independent reference: decompress the whole file and parse every line."""
    with open(path, "rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_slimpajama_layout_splits_and_records(shared_data):
    root = os.path.join(shared_data, "slimpajama-sample")
    splits = sources.find_splits("slimpajama", root)
    assert [os.path.basename(f) for f in splits["train"]] == [
        f"example_train_{i}.jsonl.zst" for i in range(4)]
    assert [os.path.basename(f) for f in splits["val"]] == ["example_holdout_0.jsonl.zst"]
    bad = sources.BadRecords("error")
    for path in splits["train"] + splits["val"]:
        docs = list(sources.read_jsonl(path, bad))
        expect = _raw_records(path)
        assert [d.text for d in docs] == [r["text"] for r in expect]
        assert [d.source for d in docs] == [r["meta"]["redpajama_set_name"] for r in expect]
    total = sum(len(_raw_records(p)) for p in splits["train"] + splits["val"])
    assert total == 321   # the sample's README


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_parts_are_contiguous_runs_that_join_into_the_file_list(count):
    files = [f"f{i:02d}.jsonl.zst" for i in range(11)]
    parts = [sources.part_files(files, i, count) for i in range(count)]
    assert [f for part in parts for f in part] == files           # in order, nothing lost
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sources.part_files(files[:2], 2, 3) == files[1:2] and not sources.part_files(
        files[:2], 0, 3)                                          # fewer files than parts
    with pytest.raises(ValueError, match="part 3 not in"):
        sources.part_files(files, 3, 3)


def test_wikitext_articles_split_at_level_one_titles(shared_data):
    path = os.path.join(shared_data, "wikitext-2", "valid.txt")
    docs = list(sources.read_wikitext(path, sources.BadRecords("error")))
    text = pathlib.Path(path).read_text(encoding="utf-8")
    titles = [line for line in text.splitlines(keepends=True)
              if line.startswith(" = ") and not line.startswith(" = = ")]
    assert len(docs) == len(titles) == 60       # the README's 60 articles
    assert "".join(d.text for d in docs) == text
    assert docs[0].text.lstrip().startswith("= Homarus gammarus =")
    assert sources.find_splits("wikitext", os.path.dirname(path)) == {"train": [path]}


def test_wikitext_crlf_file_splits_into_the_same_articles(shared_data, tmp_path):
    text = pathlib.Path(shared_data, "wikitext-2", "valid.txt").read_text(encoding="utf-8")
    crlf = tmp_path / "valid.txt"
    crlf.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    docs = list(sources.read_wikitext(str(crlf), sources.BadRecords("error")))
    titles = re.findall(r"^ = [^=].* = $", text, re.MULTILINE)    # independent count
    assert len(docs) == len(titles) == 60
    assert "".join(d.text for d in docs) == text.replace("\n", "\r\n")
    assert all(re.match(r"\s*= [^=].* = \r\n", d.text) for d in docs)


def test_wikitext_dir_with_train_and_valid_files(tmp_path, caplog):
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens",
                 "latest_train_dump.txt", "invalid_data.txt", "README",
                 "make_train_test_split.py"):
        (tmp_path / name).write_text(" = A = \n text\n")
    with caplog.at_level(logging.WARNING, logger="jaxgpt.sources"):
        splits = sources.find_splits("wikitext", str(tmp_path))
    # By the words of the names: "latest" is no test file, "invalid" no valid file.
    assert splits == {"train": [str(tmp_path / "latest_train_dump.txt"),
                                str(tmp_path / "wiki.train.tokens")],
                      "val": [str(tmp_path / "wiki.valid.tokens")]}
    assert "3 file(s) named for neither train nor valid, or for several splits" in caplog.text
    for name in ("invalid_data.txt", "README", "make_train_test_split.py"):
        assert name in caplog.text


@pytest.mark.parametrize(("names", "expect"), [
    (("train1.txt", "valid1.txt", "test1.txt"), {"train": ["train1.txt"], "val": ["valid1.txt"]}),
    (("trainset.txt", "val2.txt"), {"train": ["trainset.txt"], "val": ["val2.txt"]}),
    (("a.txt", "b.txt", "test1.txt"), {"train": ["a.txt", "b.txt"]}),    # no split named
    (("valid.txt",), {"train": ["valid.txt"]}),     # a lone file is training text
])
def test_wikitext_split_names(tmp_path, names, expect):
    for name in names:
        (tmp_path / name).write_text(" = A = \n text\n")
    got = sources.find_splits("wikitext", str(tmp_path))
    assert {k: [os.path.basename(f) for f in v] for k, v in got.items()} == expect


def test_a_link_does_not_hide_the_split_its_target_is_named_for(tmp_path):
    for name in ("wiki.train.tokens", "wiki.valid.tokens"):
        (tmp_path / name).write_text(" = A = \n text\n")
    (tmp_path / "current.tokens").symlink_to("wiki.train.tokens")
    assert sources.find_splits("wikitext", str(tmp_path)) == {
        "train": [str(tmp_path / "wiki.train.tokens")],
        "val": [str(tmp_path / "wiki.valid.tokens")]}


def test_a_file_reached_through_a_symlinked_folder_is_read_once(tmp_path, caplog):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "a.txt").write_text("one document")
    (tmp_path / "b.txt").write_text("another")
    (tmp_path / "latest").symlink_to("v1")
    (tmp_path / "b_link.txt").symlink_to("b.txt")
    with caplog.at_level(logging.WARNING, logger="jaxgpt.sources"):
        files = sources.resolve_paths(str(tmp_path))
    assert files == [str(tmp_path / "b.txt"), str(tmp_path / "v1" / "a.txt")]   # not a link
    assert "2 file(s) reached again through symlinks are read once" in caplog.text


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello")
    assert [d.text for d in sources.read_text(str(tmp_path / "bom.txt"),
                                              sources.BadRecords("error"))] == ["Hello"]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD + b"\n")
    assert [d.text for d in sources.read_jsonl(str(path), sources.BadRecords("error"))] == [
        "fine", "fine"]


# ---- bad input: each case raises naming file and line, or is skipped and counted ----


def _zst(path, lines: list[bytes]):
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return str(path)


GOOD = b'{"text": "fine", "meta": {"redpajama_set_name": "RedPajamaBook"}}'
BAD_LINES = {   # case: (kind counted, line, message)
    "malformed_json": ("malformed_json", b'{"text": "cut', "bad.jsonl.zst:2: malformed JSON"),
    "no_text": ("no_text", b'{"meta": {"redpajama_set_name": "X"}}',
                "bad.jsonl.zst:2: record has no"),
    "non_utf8": ("non_utf8", b'{"text": "\xff\xfe"}', "bad.jsonl.zst:2: not valid UTF-8"),
    # Valid JSON whose escape is half a surrogate pair: no tokenizer can encode it.
    "surrogate": ("non_utf8", b'{"text": "x \\ud800 y"}',
                  "bad.jsonl.zst:2: 'text' holds an unpaired surrogate"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_errors_or_is_skipped_and_counted(tmp_path, case):
    kind, line, message = BAD_LINES[case]
    path = _zst(tmp_path / "bad.jsonl.zst", [GOOD, line, GOOD])
    with pytest.raises(ValueError, match=message):
        list(sources.read_jsonl(path, sources.BadRecords("error")))
    bad = sources.BadRecords("skip")
    assert [d.text for d in sources.read_jsonl(path, bad)] == ["fine", "fine"]
    assert bad.counts == {kind: 1}


def test_truncated_zst_names_the_file_and_keeps_complete_lines_on_skip(tmp_path):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": rng.bytes(300).hex()}).encode() for _ in range(2000)]
    full = _zst(tmp_path / "full.jsonl.zst", lines)
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(pathlib.Path(full).read_bytes()[:os.path.getsize(full) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.zst: truncated zstd stream after line"):
        list(sources.read_jsonl(str(cut), sources.BadRecords("error")))
    bad = sources.BadRecords("skip")
    kept = list(sources.read_jsonl(str(cut), bad))
    assert 0 < len(kept) < 2000 and bad.counts == {"truncated_file": 1}
    assert [d.text for d in kept] == [json.loads(x)["text"] for x in lines[:len(kept)]]


def test_a_file_that_is_no_zstd_data_is_one_bad_record(tmp_path):
    path = tmp_path / "garbage.jsonl.zst"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="garbage.jsonl.zst: corrupt zstd data after line 0"):
        list(sources.read_jsonl(str(path), sources.BadRecords("error")))
    bad = sources.BadRecords("skip")
    assert list(sources.read_jsonl(str(path), bad)) == [] and bad.counts == {
        "truncated_file": 1}


@pytest.mark.parametrize("content", [b"", zstandard.ZstdCompressor().compress(b"")])
def test_file_without_documents(tmp_path, content):
    path = tmp_path / "empty.jsonl.zst"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="empty.jsonl.zst: holds no documents"):
        list(sources.read_jsonl(str(path), sources.BadRecords("error")))
    bad = sources.BadRecords("skip")
    assert list(sources.read_jsonl(str(path), bad)) == [] and bad.counts == {"empty_file": 1}


def test_missing_path_and_unknown_policy(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        sources.find_splits("slimpajama", str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no .jsonl.zst files"):
        sources.find_splits("slimpajama", str(tmp_path))
    with pytest.raises(ValueError, match="data.on_bad_record must be one of error|skip"):
        sources.BadRecords("ignore")


def test_bad_record_inside_a_grain_worker_thread_surfaces_with_its_line(tmp_path):
    """prepare reads files on grain threads: the error must reach the caller intact."""
    src = tmp_path / "src"
    src.mkdir()
    _zst(src / "a.jsonl.zst", [GOOD] * 3)
    _zst(src / "b.jsonl.zst", [GOOD, b"not json", GOOD])
    tok = _ByteTokenizer()
    dcfg = data.DataConfig(source="slimpajama", path=str(src), read_threads=2)
    with pytest.raises(ValueError, match="b.jsonl.zst:2: malformed JSON"):
        shards.prepare(dcfg, tok, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["src"]       # nothing half-written is left
    dcfg = data.DataConfig(source="slimpajama", path=str(src), on_bad_record="skip")
    manifest = shards.prepare(dcfg, tok, str(tmp_path / "out"))
    assert manifest["bad_records"] == {"malformed_json": 1}
    assert manifest["splits"]["train"]["documents"] == {"RedPajamaBook": 5}
    # 5 documents of "fine" (4 bytes) + one end-of-text each.
    assert manifest["splits"]["train"]["tokens"] == {"RedPajamaBook": 25}


def test_truncated_token_shard_is_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _zst(src / "a.jsonl.zst", [GOOD] * 40)
    dcfg = data.DataConfig(source="slimpajama", path=str(src), block_size=8)
    shards.prepare(dcfg, _ByteTokenizer(), str(tmp_path / "out"))
    shard = tmp_path / "out" / "train" / "RedPajamaBook" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(ValueError, match="00000.bin has 10 bytes"):
        data.load_prepared(str(tmp_path / "out"), dcfg, _ByteTokenizer.fingerprint)
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match="00000.bin has 0 bytes"):
        data.load_prepared(str(tmp_path / "out"), dcfg, _ByteTokenizer.fingerprint)


class _ByteTokenizer:
    """UTF-8 bytes as ids, 256 = end of text: a tokenizer whose output is known exactly."""

    vocab_size, eot_id, fingerprint, path = 257, 256, "bytes:v1", "<bytes>"

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def test_hf_streams_through_a_stand_in_datasets_module(tmp_path, monkeypatch, caplog):
    """The hub path offline: a stand-in `datasets.load_dataset` records what it was asked."""
    calls = []

    def load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "cerebras/SlimPajama-627B":
            return [{"text": f"doc {i}", "meta": {"redpajama_set_name": "RedPajamaC4"}}
                    for i in range(5)]
        return [{"text": t} for t in (" = A = \n", " a\n", " = = s = = \n", " = B = \n", " b\n")]

    def split_dataset_by_node(rows, *, rank, world_size):
        calls.append(("split", rank, world_size))
        return rows[rank::world_size]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setitem(sys.modules, "datasets.distributed",
                        types.SimpleNamespace(split_dataset_by_node=split_dataset_by_node))
    docs = list(sources.hf_documents("slimpajama", "val"))
    assert [d.text for d in docs] == [f"doc {i}" for i in range(5)]
    assert {d.source for d in docs} == {"RedPajamaC4"}
    arts = list(sources.hf_documents("wikitext", "train"))
    assert [a.text for a in arts] == [" = A = \n a\n = = s = = \n", " = B = \n b\n"]
    assert calls == [("cerebras/SlimPajama-627B", None, "validation", True),
                     ("wikitext", "wikitext-103-raw-v1", "train", True)]
    part = list(sources.hf_documents("slimpajama", "train", part=(1, 2)))
    assert [d.text for d in part] == ["doc 1", "doc 3"] and calls[-1] == ("split", 1, 2)
    assert "not a multiple of 2 processes" not in caplog.text     # a list has no n_shards
    with pytest.raises(ValueError, match="'wikitext' cannot be split"):
        list(sources.hf_documents("wikitext", "train", part=(0, 2)))

    class Shards(list):
        n_shards = 3

    real_load = load_dataset
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset",
                        lambda *a, **k: Shards(real_load(*a, **k)))
    with caplog.at_level(logging.WARNING):
        list(sources.hf_documents("slimpajama", "train", part=(0, 2)))
    assert "has 3 shard files, not a multiple of 2 processes" in caplog.text
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", real_load)
    del calls[2:]
    dcfg = data.DataConfig(source="slimpajama", max_documents=3)
    manifest = shards.prepare(dcfg, _ByteTokenizer(), str(tmp_path / "out"))
    assert manifest["splits"]["train"]["documents"] == {"RedPajamaC4": 3}
    assert manifest["inputs"] == {"hf": ["slimpajama"]}
    # val_max_documents caps the validation split only (the stand-in's splits hold 5 each).
    dcfg = data.DataConfig(source="slimpajama", max_documents=4, val_max_documents=2)
    manifest = shards.prepare(dcfg, _ByteTokenizer(), str(tmp_path / "out2"))
    assert manifest["splits"]["train"]["documents"] == {"RedPajamaC4": 4}
    assert manifest["splits"]["val"]["documents"] == {"RedPajamaC4": 2}
