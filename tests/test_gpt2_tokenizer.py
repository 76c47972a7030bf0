"""GPT-2 byte-level BPE: same ids as transformers' GPT-2 tokenizer, exact round trips."""

import os
import re

import pytest

pytest.importorskip("transformers")

from jaxgpt import tokenizer


@pytest.fixture(scope="module")
def bpe_dir():
    from tests.conftest import SHARED_DATA
    path = os.path.join(SHARED_DATA, "gpt2-bpe")
    if not os.path.isdir(path):
        pytest.skip(f"GPT-2 BPE files {path} are absent")
    return path


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return tokenizer.load("gpt2", bpe_dir)


@pytest.fixture(scope="module")
def reference(bpe_dir):
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast(vocab=os.path.join(bpe_dir, "encoder.json"),
                             merges=os.path.join(bpe_dir, "vocab.bpe"))


def _read(shared_data, *parts):
    with open(os.path.join(shared_data, *parts), encoding="utf-8") as f:
        return f.read()


def test_vocabulary_and_published_ids(tok):
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    # Ids of OpenAI's GPT-2 vocabulary, as published with the model.
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.decode([50256]) == "<|endoftext|>"


def test_wikitext_articles_match_transformers(tok, reference, shared_data):
    text = _read(shared_data, "wikitext-2", "valid.txt")
    # Articles start at top-level headings " = Title = ".
    articles = [a for a in re.split(r"(?m)^(?= = [^=])", text) if a]
    assert len(articles) > 50
    ours = tok.encode_batch(articles)
    theirs = reference(articles)["input_ids"]
    assert ours == theirs
    assert sum(map(len, ours)) > 200_000
    assert "".join(tok.decode(ids) for ids in ours) == text


def test_shakespeare_matches_transformers(tok, reference, shared_data):
    text = _read(shared_data, "tinyshakespeare", "input.txt")
    ids = tok.encode(text)
    assert ids == reference(text)["input_ids"]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "",
    "naïve café, Ærøskøbing, ﬁ ligature, e\u0301 combining",
    "日本語のテキスト、中文，한국어 🤖🚀👩‍👩‍👧 \U0001F3F3\uFE0F\u200D\U0001F308",
    "tabs\tand\r\nwindows\nnewlines\x00\x7f\u2028  trailing   ",
    "  leading spaces and ending with a space ",
    "<|endoftext|> inside a document is plain text <|endoftext|>",
    "".join(chr(c) for c in range(1, 3000, 7)),
], ids=["empty", "latin", "cjk_emoji", "controls", "spaces", "eot_literal", "code_points"])
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_separator_is_only_inserted_by_the_pipeline(tok):
    assert tok.eot_id not in tok.encode("a <|endoftext|> b")


def test_sources_agree_and_fingerprint(tok, bpe_dir, tmp_path):
    tok.save(str(tmp_path / "saved"))
    from_vocab_json = tokenizer.load("gpt2", str(tmp_path / "saved" / "vocab.json"))
    os.remove(tmp_path / "saved" / "vocab.json")
    from_tokenizer_json = tokenizer.load("gpt2", str(tmp_path / "saved"))
    text = "Tokenizers read from any file layout agree."
    for other in (from_vocab_json, from_tokenizer_json):
        assert other.fingerprint == tok.fingerprint
        assert other.encode(text) == tok.encode(text)
    assert tok.fingerprint.startswith("gpt2:")


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        tokenizer.load("gpt2", str(tmp_path / "vocab.json"))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=re.escape("0 entries and no <|endoftext|>")):
        tokenizer.load("gpt2", str(tmp_path))
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="notes.txt: not a GPT-2 BPE tokenizer"):
        tokenizer.load("gpt2", str(tmp_path / "notes.txt"))


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An HF cache folder of our own (empty), so the machine's cache plays no part."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_hub_name_offline_without_cache_names_the_cause(empty_hf_cache, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the HF cache and HF_HUB_OFFLINE") as e:
        tokenizer.load("gpt2", "gpt2")
    assert "data.tokenizer_path=" in str(e.value) and "entries" not in str(e.value)


def test_hub_name_with_the_hub_unreachable_fails_at_once(empty_hf_cache, monkeypatch):
    import time
    import types

    import httpx
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(url, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    def no_retries(seconds):
        raise AssertionError(f"retried the hub (sleep {seconds} s)")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    # huggingface_hub's backoff sleeps between retries; here any retry fails the test.
    clock = {n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**clock | {"sleep": no_retries}))
    with pytest.raises(FileNotFoundError, match="HF hub could not be reached") as e:
        tokenizer.load("gpt2", "hf:gpt2")
    assert "Name or service not known" in str(e.value) and "vocab.json" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope/gpt2-bpe does not exist"):
        tokenizer.load("gpt2", "/nope/gpt2-bpe")   # a mistyped folder is no hub name


def test_hub_name_reads_the_hf_cache_offline(bpe_dir, tok, empty_hf_cache, monkeypatch):
    import shutil

    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0" * 40   # the cache's layout: refs/main names the snapshot
    snapshot = empty_hf_cache / "models--gpt2" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (empty_hf_cache / "models--gpt2" / "refs").mkdir()
    (empty_hf_cache / "models--gpt2" / "refs" / "main").write_text(commit)
    shutil.copy(os.path.join(bpe_dir, "encoder.json"), snapshot / "vocab.json")
    shutil.copy(os.path.join(bpe_dir, "vocab.bpe"), snapshot / "merges.txt")
    cached = tokenizer.load("gpt2", "gpt2")
    assert cached.path == "gpt2" and cached.fingerprint == tok.fingerprint
    assert cached.encode("Hello world") == [15496, 995]


def test_hf_prefix_also_takes_a_directory(tok, bpe_dir):
    """`hf:DIR`, as `convert.hf.import_gpt2` takes it (and sample/eval --hf pass it on)."""
    prefixed = tokenizer.load("gpt2", "hf:" + bpe_dir)
    assert prefixed.fingerprint == tok.fingerprint
    assert prefixed.encode("Hello world") == [15496, 995]
