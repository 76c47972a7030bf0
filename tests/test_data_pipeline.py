"""Token shards, packing, per-process epochs, mixture and exact iterator resume on the
SlimPajama sample, plus the prepare and tokenizer command lines."""

import glob
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from jaxgpt import data, shards, sources, tokenizer
from tests import helpers

BLOCK = 32


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(DataConfig, tokenizer, prepared dir) for the SlimPajama sample (skips without it)."""
    from tests.conftest import SHARED_DATA
    root = os.path.join(SHARED_DATA, "slimpajama-sample")
    if not os.path.isdir(root):
        pytest.skip(f"reference data folder {root} is absent")
    tmp = tmp_path_factory.mktemp("sample")
    dcfg = data.DataConfig(source="slimpajama", path=root, block_size=BLOCK)
    tok = tokenizer.SentencePiece(tokenizer.train_sentencepiece(
        shards.tokenizer_training_texts(dcfg), 512))
    out = str(tmp / "prepared")
    shards.prepare(dcfg, tok, out)
    return dcfg, tok, out


def _stream(tok, files):
    """Independent reference of the joined token stream, per source, in file order."""
    out = {}
    for d in sources.iter_documents("slimpajama", files, sources.BadRecords("error")):
        out.setdefault(d.source, []).extend(tok.encode(d.text) + [tok.eot_id])
    return out


def test_manifest_records_tokenizer_files_and_counts(sample):
    dcfg, tok, out = sample
    manifest = json.loads(pathlib.Path(out, data.MANIFEST).read_text())
    splits = sources.find_splits("slimpajama", dcfg.path)
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    assert manifest["inputs"] == splits and manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        expect = _stream(tok, splits[split])
        assert manifest["splits"][split]["tokens"] == {k: len(v) for k, v in expect.items()}
    docs = manifest["splits"]["train"]["documents"]
    assert set(docs) == {"RedPajamaBook", "RedPajamaWikipedia"}
    assert sum(docs.values()) + sum(manifest["splits"]["val"]["documents"].values()) == 321


def test_windows_reproduce_the_stream_and_targets_are_next_tokens(sample):
    dcfg, tok, out = sample
    corpus = data.load_prepared(out, dcfg, tok.fingerprint)
    expect = _stream(tok, sources.find_splits("slimpajama", dcfg.path)["train"])
    for name, windows in corpus.train_by_source.items():
        stream = np.asarray(expect[name])
        w = np.stack([windows[i] for i in range(len(windows))])
        assert w.dtype == np.int32 and w.shape == (len(windows), BLOCK + 1)
        assert len(windows) == (len(stream) - 1) // BLOCK
        # Dropping each window's last token (the next window's first) gives the stream back.
        np.testing.assert_array_equal(w[:, :-1].reshape(-1), stream[:len(w) * BLOCK])
        # Every target is the token after its input in the stream.
        np.testing.assert_array_equal(w[:, 1:].reshape(-1),
                                      stream[1:len(w) * BLOCK + 1])
    assert corpus.n_val_tokens == sum(len(v) for v in _stream(
        tok, sources.find_splits("slimpajama", dcfg.path)["val"]).values())


def test_without_a_validation_split_every_source_gives_its_tail(sample, tmp_path):
    dcfg, tok, _ = sample
    train_only = data.DataConfig(source="slimpajama", path=os.path.join(dcfg.path, "train"),
                                 block_size=BLOCK, val_fraction=0.1)
    out = str(tmp_path / "prepared")
    shards.prepare(train_only, tok, out)
    corpus = data.load_prepared(out, train_only, tok.fingerprint)
    expect = _stream(tok, sources.find_splits("slimpajama", dcfg.path)["train"])
    assert set(corpus.val_by_source) == set(corpus.train_by_source) == set(expect)
    for name, stream in expect.items():
        n_val = max(int(len(stream) * 0.1), BLOCK + 1)
        # Training windows cover the source's stream up to its last n_val tokens, and
        # validation windows the tail after them.
        train, val = corpus.train_by_source[name], corpus.val_by_source[name]
        w = np.stack([train[i] for i in range(len(train))])
        np.testing.assert_array_equal(w[:, :-1].reshape(-1), stream[:len(w) * BLOCK])
        assert len(train) == (len(stream) - n_val - 1) // BLOCK
        v = np.stack([val[i] for i in range(len(val))])
        tail = np.asarray(stream[len(stream) - n_val:])
        np.testing.assert_array_equal(v[:, :-1].reshape(-1), tail[:len(v) * BLOCK])
        assert corpus.stats["tokens"]["train"][name] == len(stream) - n_val
        assert corpus.stats["tokens"]["val"][name] == n_val
    assert corpus.n_val_tokens == sum(corpus.stats["tokens"]["val"].values())
    # Held out of each source, not the stream's tail: another fingerprint than the manifest's
    # alone gives, so a run saved with the older split refuses to resume onto this one.
    manifest = json.loads(pathlib.Path(out, data.MANIFEST).read_text())
    assert corpus.fingerprint != hashlib.sha256(
        json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("n_proc", [1, 2, 4])
def test_each_window_once_per_epoch_across_processes(sample, n_proc):
    dcfg, tok, out = sample
    corpus = data.load_prepared(out, dcfg, tok.fingerprint)
    n, batch = len(corpus.train), 8
    ids = np.arange(n)[:, None]      # the same pipeline over window indices
    parts = [data.make_train_dataset(ids, global_batch=batch, seed=5, process_index=p,
                                     process_count=n_proc) for p in range(n_proc)]
    steps = n // batch
    seen = np.concatenate([p[s][:, 0] for s in range(steps) for p in parts])
    assert len(set(seen)) == len(seen) == steps * batch       # no window twice in an epoch
    single = data.make_train_dataset(ids, global_batch=batch, seed=5)
    np.testing.assert_array_equal(np.sort(seen),
                                  np.sort(np.concatenate([single[s][:, 0]
                                                          for s in range(steps)])))
    # The real windows served for those indices are the corpus's.
    real = data.make_train_dataset(corpus, global_batch=batch, seed=5, process_index=n_proc - 1,
                                   process_count=n_proc)
    np.testing.assert_array_equal(real[n_proc - 1],
                                  np.stack([corpus.train[i] for i in parts[-1][n_proc - 1][:, 0]]))


@pytest.mark.parametrize("mixture", [{}, {"RedPajamaBook": 3.0, "RedPajamaWikipedia": 1.0}])
def test_resume_continues_the_batch_stream_bitwise(sample, mixture):
    dcfg, tok, out = sample
    dcfg = data.DataConfig(**{**dcfg.__dict__, "read_threads": 2, "prefetch": 3,
                              "mixture": mixture})

    def fresh():
        corpus = data.load_prepared(out, dcfg, tok.fingerprint)
        ds = data.make_train_dataset(corpus, global_batch=16, seed=1, mixture=mixture)
        return data.make_iterator(ds, dcfg), len(corpus.train)

    it, n = fresh()
    k = n // 16 + 3                    # past the first epoch boundary
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))   # as the checkpoint stores it
    expect = [next(it) for _ in range(4)]
    again, _ = fresh()
    again.set_state(state)
    for e in expect:
        np.testing.assert_array_equal(next(again), e)


def test_mixture_draws_sources_by_weight(sample):
    dcfg, tok, out = sample
    corpus = data.load_prepared(out, dcfg, tok.fingerprint)
    book = {corpus.train_by_source["RedPajamaBook"][i].tobytes()
            for i in range(len(corpus.train_by_source["RedPajamaBook"]))}
    ds = data.make_train_dataset(corpus, global_batch=20, seed=0,
                                 mixture={"RedPajamaBook": 3, "RedPajamaWikipedia": 1})
    rows = np.concatenate([ds[s] for s in range(10)])
    assert sum(r.tobytes() in book for r in rows) == 150       # 3:1 of 200 windows
    with pytest.raises(ValueError, match=r"no weight for source\(s\) \['RedPajamaWikipedia'\]"):
        data.make_train_dataset(corpus, global_batch=20, seed=0, mixture={"RedPajamaBook": 1})


def test_prepared_data_refuses_another_tokenizer_and_existing_output(sample):
    dcfg, tok, out = sample
    with pytest.raises(ValueError, match="not by this run's tokenizer spm:other"):
        data.load_prepared(out, dcfg, "spm:other")
    with pytest.raises(FileExistsError, match="not empty"):
        shards.prepare(dcfg, tok, out)


def _source_stream(root, manifest, split, source):
    return np.concatenate([np.fromfile(os.path.join(root, s["path"]), manifest["dtype"])
                           for s in manifest["splits"][split]["shards"]
                           if s["source"] == source])


def test_parts_merged_are_the_whole_token_stream(sample, tmp_path):
    dcfg, tok, whole = sample
    splits = sources.find_splits("slimpajama", dcfg.path)
    out = str(tmp_path / "parts")
    for i in (2, 0, 1):                      # in any order, as the jobs of an array finish
        assert shards.prepare(dcfg, tok, out, part=(i, 3))["part"]["index"] == i
    with pytest.raises(FileNotFoundError, match="it holds parts: join them"):
        data.DataConfig(source="slimpajama", prepared=out)
    merged = shards.merge(out)
    assert merged["parts"] == 3 and merged["inputs"] == splits
    for entry in merged["splits"].values():      # each source's shards together
        names = [s["source"] for s in entry["shards"]]
        assert names == sorted(names, key=names.index)
    single = json.loads(pathlib.Path(whole, data.MANIFEST).read_text())
    assert merged["bad_records"] == single["bad_records"] == {}
    for split in ("train", "val"):
        expect = _stream(tok, splits[split])          # independent of shards.py
        assert merged["splits"][split]["tokens"] == {k: len(v) for k, v in expect.items()}
        assert merged["splits"][split]["documents"] == single["splits"][split]["documents"]
        for name, stream in expect.items():
            np.testing.assert_array_equal(_source_stream(out, merged, split, name), stream)
    corpus = data.load_prepared(out, dcfg, tok.fingerprint)
    reference = data.load_prepared(whole, dcfg, tok.fingerprint)
    assert (corpus.n_train_tokens, corpus.n_val_tokens) == (reference.n_train_tokens,
                                                            reference.n_val_tokens)
    batch = data.make_train_dataset(corpus, global_batch=8, seed=0)[0]
    assert batch.shape == (8, BLOCK + 1) and batch.max() < tok.vocab_size
    with pytest.raises(FileExistsError, match="complete already"):
        shards.merge(out)


def test_prepare_logs_progress_per_file(sample, tmp_path, monkeypatch, caplog):
    dcfg, tok, _ = sample
    monkeypatch.setattr(shards, "PROGRESS_EVERY_S", 0.0)      # a line after every file
    with caplog.at_level(logging.INFO, logger="jaxgpt.shards"):
        manifest = shards.prepare(dcfg, tok, str(tmp_path / "out"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepare ")]
    assert [line.split(",")[0] for line in lines] == [
        "prepare train: 1/4 files", "prepare train: 2/4 files", "prepare train: 3/4 files",
        "prepare train: 4/4 files", "prepare val: 1/1 files"]
    for line, split in ((lines[3], "train"), (lines[4], "val")):
        docs = sum(manifest["splits"][split]["documents"].values())
        tokens = sum(manifest["splits"][split]["tokens"].values())
        assert f" {docs:,} documents, {tokens:,} tokens, " in line and "ETA 0m00s" in line


def test_parts_missing_mismatched_or_unsplittable_are_refused(sample, tmp_path):
    dcfg, tok, _ = sample
    out = str(tmp_path / "parts")
    first = shards.prepare(dcfg, tok, out, part=(0, 2))
    shard = pathlib.Path(out, shards.part_name(0, 2), first["splits"]["train"]["shards"][0]["path"])
    mtime = shard.stat().st_mtime_ns
    assert shards.prepare(dcfg, tok, out, part=(0, 2)) == first   # a rerun keeps a done part
    assert shard.stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match=r"part\(s\) \[1\] of 2 are not prepared"):
        shards.merge(out)
    skip = data.DataConfig(**{**dcfg.__dict__, "on_bad_record": "skip"})
    shards.prepare(skip, tok, out, part=(1, 2))
    with pytest.raises(ValueError, match="part 1 was prepared from other input files"):
        shards.merge(out)
    other = tokenizer.SentencePiece(tokenizer.train_sentencepiece(
        shards.tokenizer_training_texts(dcfg), 600))
    out2 = str(tmp_path / "parts2")
    shards.prepare(dcfg, tok, out2, part=(0, 2))
    shards.prepare(dcfg, other, out2, part=(1, 2))
    with pytest.raises(ValueError, match="part 1 has tokenizer"):
        shards.merge(out2)
    assert not os.path.exists(os.path.join(out2, data.MANIFEST))
    with pytest.raises(ValueError, match="4 train files cannot be split into 5 parts"):
        shards.prepare(dcfg, tok, str(tmp_path / "p5"), part=(0, 5))
    capped = data.DataConfig(**{**dcfg.__dict__, "max_documents": 10})
    with pytest.raises(ValueError, match="max_documents=10 caps a whole preparation"):
        shards.prepare(capped, tok, str(tmp_path / "p"), part=(0, 2))
    with pytest.raises(ValueError, match=r"part 2/2: the index must be in \[0, 2\)"):
        shards.prepare(dcfg, tok, str(tmp_path / "p"), part=(2, 2))
    with pytest.raises(ValueError, match="streams from the HF hub"):
        shards.prepare(data.DataConfig(source="slimpajama"), tok, str(tmp_path / "p"),
                       part=(0, 2))


def test_a_part_whose_input_files_changed_is_prepared_again_only_on_request(sample, tmp_path):
    dcfg, tok, _ = sample
    root = tmp_path / "inputs"
    shutil.copytree(os.path.join(dcfg.path, "train"), root)
    local = data.DataConfig(source="slimpajama", path=str(root), block_size=BLOCK)
    out = str(tmp_path / "parts")
    shards.prepare(local, tok, out, part=(0, 2))
    files = sources.find_splits("slimpajama", str(root))["train"]
    pathlib.Path(files[0]).write_bytes(                       # a file of part 0
        zstandard.ZstdCompressor().compress(b'{"text": "replaced"}\n'))
    with pytest.raises(FileExistsError, match="part-00000-of-00002 was prepared from other "
                                              "inputs or options \\(an input file changed"):
        shards.prepare(local, tok, out, part=(0, 2))
    shutil.rmtree(os.path.join(out, shards.part_name(0, 2)))
    again = shards.prepare(local, tok, out, part=(0, 2))
    assert sum(again["splits"]["train"]["documents"].values()) == sum(
        1 for _ in sources.iter_documents("slimpajama", sources.part_files(files, 0, 2),
                                           sources.BadRecords("error")))


def test_prepared_cache_follows_a_rewrite_within_the_same_second(tmp_path, caplog):
    tok = tokenizer.SentencePiece(tokenizer.train_sentencepiece(
        ["First Citizen: FIRST CITIZEN: second citizen"] * 20, 300))
    path = tmp_path / "a.txt"
    dcfg = data.DataConfig(source="text", path=str(path), block_size=8)
    cache = str(tmp_path / "cache")
    second = 1_700_000_000 * 10**9        # every write below lands in this second

    def write(text, ns):
        path.write_text(text * 50)
        os.utime(path, ns=(second + ns, second + ns))

    def first_window(**kw):
        corpus = data.load_corpus(dcfg, tok, cache, **kw)
        return corpus.train[0].tolist(), corpus.fingerprint

    write("First Citizen: ", 100)
    before, fp = first_window()
    write("FIRST CITIZEN: ", 200)                            # same size, same second
    with caplog.at_level(logging.WARNING, logger="jaxgpt.data"):
        after, fp_after = first_window()
    assert "1 input file(s) changed since" in caplog.text and "preparing it again" in caplog.text
    assert after == (tok.encode("FIRST CITIZEN: " * 50) + [tok.eot_id])[:9] != before
    assert fp_after != fp and os.listdir(cache) == [os.path.basename(os.path.dirname(
        glob.glob(f"{cache}/*/{data.MANIFEST}")[0]))]      # one cache, the stale one gone
    # Another process of the job reads what process 0 left, without judging it.
    write("First Citizen: ", 300)
    assert first_window(check_stamps=False) == (after, fp_after)
    # A removal cut short (no manifest left) is cleared, not an error.
    root = os.path.dirname(glob.glob(f"{cache}/*/{data.MANIFEST}")[0])
    os.remove(os.path.join(root, data.MANIFEST))
    assert first_window()[0] == before
    # The same tokens prepared again are the same data.
    assert first_window()[1] == fp


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("corpus", ["tinyshakespeare/input.txt", "wikitext-2/valid.txt"])
def test_sentencepiece_round_trip_on_shared_corpora(shared_data, corpus, model_type):
    text = pathlib.Path(shared_data, corpus).read_text(encoding="utf-8")
    tok = tokenizer.SentencePiece(tokenizer.train_sentencepiece(
        [text[:300_000]], 800, model_type=model_type, max_sentences=20_000))
    for piece in (text[300_000:340_000], "ünïcødé → 日本語 🙂\n\ttab"):   # unseen too
        ids = tok.encode(piece)
        assert tok.decode(ids) == piece
        assert max(ids) < tok.vocab_size


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=240, check=False)


@pytest.mark.slow
def test_prepare_and_tokenizer_command_lines(shared_data, tmp_path):
    model = tmp_path / "wt.model"
    proc = _run("-m", "jaxgpt.tokenizer", "train",
                f"--input={shared_data}/wikitext-2/valid.txt", "--vocab_size=600",
                "--model_type=unigram", f"--out={model}")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "shards"
    proc = _run("-m", "jaxgpt.shards", "prepare", "--config=configs/wikitext.py",
                f"--config.data.path={shared_data}/wikitext-2", "--config.data.tokenizer="
                "sentencepiece", f"--config.data.tokenizer_path={model}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / data.MANIFEST).read_text())
    tok = tokenizer.SentencePiece.load(str(model))
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    assert manifest["splits"]["train"]["documents"] == {"wikitext": 60}
    stream = []
    for d in sources.read_wikitext(f"{shared_data}/wikitext-2/valid.txt",
                                   sources.BadRecords("error")):
        stream += tok.encode(d.text) + [tok.eot_id]
    shard = np.fromfile(out / manifest["splits"]["train"]["shards"][0]["path"], np.uint16)
    np.testing.assert_array_equal(shard, stream)
    # Training reads the shards through data.prepared, never touching its cache folder.
    dcfg = data.DataConfig(source="wikitext", prepared=str(out), block_size=BLOCK)
    corpus = data.load_corpus(dcfg, tok, cache_dir=str(tmp_path / "unused"))
    assert corpus.n_train_tokens + corpus.n_val_tokens == len(stream)
    assert not os.path.exists(tmp_path / "unused")
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        data.DataConfig(prepared=str(tmp_path))
    # SlimPajama in two parts (as two hosts or array jobs would), then merged.
    sample = f"{shared_data}/slimpajama-sample"
    prepare = ("-m", "jaxgpt.shards", "prepare", "--config=configs/slimpajama.py",
               f"--config.data.path={sample}", "--config.data.tokenizer=sentencepiece",
               f"--config.data.tokenizer_path={model}", f"--out={tmp_path / 'sp'}")
    for part in ("1/2", "0/2"):
        proc = _run(*prepare, f"--part={part}")
        assert proc.returncode == 0, proc.stderr
    proc = _run(*prepare, "--part=2/2")
    assert proc.returncode != 0 and "part 2/2: the index must be in [0, 2)" in proc.stderr
    proc = _run("-m", "jaxgpt.shards", "merge", f"--out={tmp_path / 'sp'}")
    assert proc.returncode == 0, proc.stderr
    merged = json.loads((tmp_path / "sp" / data.MANIFEST).read_text())
    for split, files in sources.find_splits("slimpajama", sample).items():
        assert merged["splits"][split]["tokens"] == {
            k: len(v) for k, v in _stream(tok, files).items()}


def test_gpt2_bpe_shards_decode_to_the_articles(shared_data, tmp_path):
    pytest.importorskip("transformers")
    path = os.path.join(shared_data, "wikitext-2", "valid.txt")
    tok = tokenizer.load("gpt2", os.path.join(shared_data, "gpt2-bpe"))
    dcfg = data.DataConfig(source="wikitext", path=path, tokenizer="gpt2", block_size=64)
    manifest = shards.prepare(dcfg, tok, str(tmp_path / "out"))
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["eot_id"] == 50256
    shard = np.fromfile(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["path"],
                        np.uint16)
    assert shard[-1] == 50256 and int((shard == 50256).sum()) == 60      # one per article
    pieces = np.split(shard, np.flatnonzero(shard == 50256) + 1)[:-1]
    text = pathlib.Path(path).read_text(encoding="utf-8")
    assert "".join(tok.decode(p[:-1]) for p in pieces) == text
    corpus = data.load_prepared(str(tmp_path / "out"), dcfg, tok.fingerprint)
    assert corpus.n_train_tokens + corpus.n_val_tokens == len(shard)
    np.testing.assert_array_equal(corpus.val[len(corpus.val) - 1][1:],
                                  shard[len(shard) - corpus.n_val_tokens:][
                                      (len(corpus.val) - 1) * 64 + 1:len(corpus.val) * 64 + 1])


def test_a_corpus_of_empty_files_is_named_empty(sample, tmp_path):
    _, tok, _ = sample
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("")
    dcfg = data.DataConfig(source="text", path=str(tmp_path), block_size=8)
    with pytest.raises(ValueError, match=r"the corpus is empty: 2 text file\(s\) hold no text "
                                         r"\(first: .*a.txt\)"):
        shards.prepare(dcfg, tok, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
