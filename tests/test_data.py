"""Text source, packing, batching and the SentencePiece tokenizer."""

import pathlib

import numpy as np
import pytest

from jaxgpt import data, shards, sources, tokenizer
from tests import helpers


def test_windows_reproduce_the_stream_and_targets_are_next_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    w = data.pack_windows(tokens, 32)
    assert w.shape == (31, 33)
    # Dropping each window's last token (the next window's first) gives the stream back.
    np.testing.assert_array_equal(np.concatenate([x[:-1] for x in w]), tokens[:31 * 32])
    for x in w:
        np.testing.assert_array_equal(x[1:], x[:-1] + 1)


def test_split_holds_out_the_tail():
    tokens = np.arange(1000)
    train, val = data.split_tokens(tokens, 0.1, 16)
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
    assert len(val) == 100


def test_train_batches_cover_each_epoch_once_and_reshuffle():
    windows = np.arange(40, dtype=np.int32).reshape(20, 2)
    ds = data.make_train_dataset(windows, global_batch=5, seed=3)
    epoch1 = np.concatenate([ds[i][:, 0] for i in range(4)])
    epoch2 = np.concatenate([ds[i][:, 0] for i in range(4, 8)])
    assert sorted(epoch1) == sorted(epoch2) == list(range(0, 40, 2))
    assert list(epoch1) != list(epoch2)
    again = data.make_train_dataset(windows, global_batch=5, seed=3)
    np.testing.assert_array_equal(again[2], ds[2])


def test_process_shards_partition_the_global_batch():
    windows = np.arange(64, dtype=np.int32).reshape(32, 2)
    full = data.make_train_dataset(windows, global_batch=8, seed=0)
    parts = [data.make_train_dataset(windows, global_batch=8, seed=0, process_index=i,
                                     process_count=4) for i in range(4)]
    for step in range(6):
        np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), full[step])


def test_iterator_state_resumes_exactly():
    windows = np.arange(60, dtype=np.int32).reshape(30, 2)
    ds = data.make_train_dataset(windows, global_batch=4, seed=1).to_iter_dataset()
    it = iter(ds)
    for _ in range(9):
        next(it)
    state = it.get_state()
    expect = [next(it) for _ in range(5)]
    it2 = iter(ds)
    it2.set_state(state)
    for e in expect:
        np.testing.assert_array_equal(next(it2), e)


def test_default_corpus_is_the_stdlib_without_tests():
    files = sources.default_corpus_files()
    assert len(files) > 100
    assert not any("/test/" in f or "/tests/" in f for f in files)


def test_sentencepiece_round_trip_is_exact(tmp_path):
    text = pathlib.Path(helpers.small_corpus(tmp_path)).read_text(encoding="utf-8")
    tok = tokenizer.load_or_train_sentencepiece(str(tmp_path / "t.model"), [text], 512)
    assert tok.vocab_size == 512
    for sample in [text[:5000], "  indented\n\ttabs\n", "ünïcødé → 日本語 🙂"]:
        assert tok.decode(tok.encode(sample)) == sample
    reloaded = tokenizer.load_or_train_sentencepiece(str(tmp_path / "t.model"), [], 512)
    assert reloaded.fingerprint == tok.fingerprint
    with pytest.raises(ValueError, match="vocab_size 512"):
        tokenizer.load_or_train_sentencepiece(str(tmp_path / "t.model"), [], 1024)


def test_tokenized_documents_are_separated_by_eot(tmp_path):
    text = pathlib.Path(helpers.small_corpus(tmp_path)).read_text(encoding="utf-8")
    tok = tokenizer.load_or_train_sentencepiece(str(tmp_path / "t.model"), [text], 512)
    tokens = shards.tokenize_documents(["a b", "c d"], tok)
    assert list(tokens).count(tok.eot_id) == 2 and tokens[-1] == tok.eot_id
    assert tokens.dtype == np.uint16


def test_too_few_tokens_for_a_window():
    with pytest.raises(ValueError, match="too few for one window of block_size 64"):
        data.pack_windows(np.arange(10), 64)


def test_sources_too_small_for_their_own_validation_share_the_streams_tail():
    from jaxgpt import data
    # Two sources of 100 tokens, windows of 65: neither can spare one, the stream can.
    segments = [("A", "a.bin", 0, 100), ("B", "b.bin", 0, 100)]
    n_val, per_source = data._held_out_tokens(segments, 0.1, 64)
    assert n_val == {"B": 65} and not per_source
    train, val = data._hold_out_tail(segments, n_val)
    assert train == [("A", "a.bin", 0, 100), ("B", "b.bin", 0, 35)]
    assert val == [("B", "b.bin", 35, 100)]
    # Big enough: each source gives its own tail.
    segments = [("A", "a.bin", 0, 1000), ("B", "b.bin", 0, 500), ("A", "a2.bin", 0, 1000)]
    n_val, per_source = data._held_out_tokens(segments, 0.1, 64)
    assert n_val == {"A": 200, "B": 65} and per_source
    train, val = data._hold_out_tail(segments, n_val)
    assert val == [("B", "b.bin", 435, 500), ("A", "a2.bin", 800, 1000)]
    assert train == [("A", "a.bin", 0, 1000), ("B", "b.bin", 0, 435), ("A", "a2.bin", 0, 800)]
