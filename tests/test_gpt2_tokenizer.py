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
