"""Tokenizers behind one protocol: SentencePiece (trained here) and GPT-2 BPE.

Every tokenizer exposes `encode`, `decode`, `vocab_size`, `eot_id` (the document separator,
also the start token for empty prompts) and `fingerprint` (a hash stored with checkpoints
and token shards so data and models never silently pair with another vocabulary).
"""

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Protocol

import sentencepiece as spm

from jaxgpt import choices

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class SentencePiece:
    """A SentencePiece model (BPE or unigram, byte fallback); `</s>` separates documents."""

    def __init__(self, model_proto: bytes, path: str = "<memory>"):
        self.path = path
        self.proto = model_proto
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:    # its message is a C++ source line and says nothing of the file
            raise ValueError(f"{path} is not a SentencePiece model") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.eos_id()
        if self.eot_id < 0:
            raise ValueError(f"{path}: SentencePiece model has no eos piece to separate documents")
        self.fingerprint = "spm:" + hashlib.sha256(model_proto).hexdigest()[:16]

    @classmethod
    def load(cls, path: str) -> "SentencePiece":
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory, not a SentencePiece .model file")
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def save(self, path: str) -> None:
        """Write the model to `path` atomically (a crash never leaves half a file)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(self.proto)
        os.replace(path + ".tmp", path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


# Local GPT-2 BPE file pairs: (vocabulary, merges). transformers writes the first; OpenAI's
# release (and ../shared/data/gpt2-bpe) uses the second.
GPT2_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
GPT2_EOT = "<|endoftext|>"


class Gpt2Bpe:
    """GPT-2 byte-level BPE through transformers' fast tokenizer; `<|endoftext|>` separates
    documents.

    `path` is a hub name (`gpt2` or `hf:gpt2`), a directory (`hf:DIR` too) holding one of
    GPT2_FILE_PAIRS or a `tokenizer.json`, or a vocabulary file whose merges file sits beside
    it. Text is encoded as ordinary text: a literal `<|endoftext|>` inside a document becomes
    its bytes' tokens, so only the data pipeline inserts document separators.
    """

    def __init__(self, path: str):
        import tokenizers  # optional dependencies (jaxgpt[hf])
        from transformers import GPT2TokenizerFast

        self.path = path
        # `hf:` marks a hub name or a directory, as in convert.hf.import_gpt2; a hub name
        # (`gpt2`, `hf:gpt2`) stands for its files in the HF cache.
        local = os.path.expanduser(path.removeprefix("hf:"))
        local = local if os.path.exists(local) else _hub_files(path)
        files = _gpt2_files(local)
        if files is not None:
            self.hf = GPT2TokenizerFast(vocab=files[0], merges=files[1])
        elif os.path.isdir(local) and os.path.exists(os.path.join(local, "tokenizer.json")):
            self.hf = GPT2TokenizerFast.from_pretrained(local)
        else:
            raise ValueError(f"{path}: not a GPT-2 BPE tokenizer; expected a directory with "
                             f"vocab.json+merges.txt, encoder.json+vocab.bpe or tokenizer.json")
        model = json.loads(self.hf.backend_tokenizer.to_str())["model"]
        self.vocab, self.merges = model["vocab"], model["merges"]
        # The old vocab_file=/merges_file= keywords are ignored silently and leave an empty
        # vocabulary, so check that the files were really read.
        if len(self.vocab) <= 256 or GPT2_EOT not in self.vocab:
            raise ValueError(f"{path}: GPT-2 BPE vocabulary has {len(self.vocab)} entries and "
                             f"{'a' if GPT2_EOT in self.vocab else 'no'} {GPT2_EOT}")
        self.vocab_size = len(self.hf)
        self.eot_id = self.vocab[GPT2_EOT]
        # The fingerprint hashes the vocabulary and merges, not the file bytes, so the same
        # tokenizer read from the hub, encoder.json or tokenizer.json matches.
        digest = hashlib.sha256(json.dumps([sorted(self.vocab.items()), self.merges],
                                           ensure_ascii=False).encode())
        self.fingerprint = "gpt2:" + digest.hexdigest()[:16]
        # A copy, so the saved transformers tokenizer keeps its usual special-token handling.
        self._plain = tokenizers.Tokenizer.from_str(self.hf.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True   # documents are text, see the docstring

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._plain.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str, *, model_max_length: int | None = None) -> None:
        """Write tokenizer.json + tokenizer_config.json (transformers) and vocab.json +
        merges.txt (older GPT-2 tools) into `directory`.

        `model_max_length` (a model's n_positions) is the length `truncation=True` cuts
        to; without it transformers writes 1e30, which never truncates.
        """
        self.hf.save_pretrained(directory)
        if model_max_length is not None:
            path = os.path.join(directory, "tokenizer_config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config | {"model_max_length": model_max_length}, f, indent=2,
                          ensure_ascii=False)
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(" ".join(m) + "\n" for m in self.merges)


# What is fetched of a hub repository: the BPE pair, or else its tokenizer.json.
HUB_FILES = (GPT2_FILE_PAIRS[0], ("tokenizer.json",))


def _hub_files(name: str) -> str:
    """The folder in the HF cache holding hub repository `name`'s tokenizer files (HUB_FILES),
    downloaded on first use.

    transformers' `from_pretrained` retries an unreachable hub for minutes per file and then
    builds an empty vocabulary; here a cache miss costs one request without retries, and a
    failure says that the hub could not be reached.
    """
    import httpx
    import huggingface_hub as hub
    from huggingface_hub import constants, errors, utils

    repo = name.removeprefix("hf:")
    try:
        utils.validate_repo_id(repo)
    except ValueError:
        raise FileNotFoundError(f"{name} does not exist (and is not a HF hub repository "
                                f"name)") from None
    instead = ("use local files instead: a directory with vocab.json and merges.txt (or "
               "encoder.json and vocab.bpe), e.g. data.tokenizer_path=DIR")
    for files in HUB_FILES:
        try:
            paths = [hub.hf_hub_download(repo, f, local_files_only=True) for f in files]
            return os.path.dirname(paths[0])
        except errors.EntryNotFoundError:   # not in the cache
            continue
    if constants.is_offline_mode():
        raise FileNotFoundError(f"{name}: the GPT-2 tokenizer files are not in the HF cache and "
                                f"HF_HUB_OFFLINE is set, so they cannot be downloaded; {instead}")
    try:
        # One request without retries (hf_hub_download retries ~25 s per file).
        hub.get_hf_file_metadata(hub.hf_hub_url(repo, HUB_FILES[0][0]))
        files = HUB_FILES[0]
    except errors.RemoteEntryNotFoundError:
        files = HUB_FILES[1]
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{name}: the HF hub has no repository {repo!r} (or it is "
                                f"private or gated); {instead}") from None
    except (httpx.HTTPError, OSError) as e:
        raise FileNotFoundError(f"{name}: the HF hub could not be reached to download the "
                                f"GPT-2 tokenizer files ({e}); {instead}") from None
    try:
        paths = [hub.hf_hub_download(repo, f) for f in files]
    except (httpx.HTTPError, OSError) as e:
        raise FileNotFoundError(f"{name}: downloading {' and '.join(files)} from the HF hub "
                                f"failed ({e}); {instead}") from None
    return os.path.dirname(paths[0])


def _gpt2_files(path: str) -> tuple[str, str] | None:
    """(vocab, merges) paths for a directory or a vocabulary file, None for other paths."""
    if os.path.isfile(path):
        name, directory = os.path.basename(path), os.path.dirname(path)
        for vocab, merges in GPT2_FILE_PAIRS:
            if name == vocab:
                if not os.path.isfile(os.path.join(directory, merges)):
                    raise FileNotFoundError(f"{path}: merges file {merges} missing beside it")
                return path, os.path.join(directory, merges)
        return None
    if os.path.isdir(path):
        for vocab, merges in GPT2_FILE_PAIRS:
            pair = os.path.join(path, vocab), os.path.join(path, merges)
            if all(os.path.isfile(p) for p in pair):
                return pair
    return None


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines(keepends=True):
            if line.strip():
                yield line


# The trainer's refusals of a vocabulary size (a C++ check's text): what the corpus needs.
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)")
_TOO_LARGE = re.compile(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, model_type: str = "bpe",
                        max_sentences: int = 300_000, seed_sentences: bool = True,
                        vocab_name: str = "model.vocab_size") -> bytes:
    """Train a SentencePiece model on `texts` (documents) and return the serialized model.

    Whitespace is kept verbatim (identity normalization, no dummy prefix, whitespace-only
    pieces allowed) so code and prose round-trip exactly; unseen characters fall back to
    bytes. `\\n` is its own piece because training sees one line per sentence. A vocabulary
    size the corpus cannot fill is a ValueError naming `vocab_name` and the bound.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer model_type must be bpe|unigram, got {model_type!r}")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
            character_coverage=0.9999, input_sentence_size=max_sentences,
            shuffle_input_sentence=seed_sentences, max_sentence_length=16384, unk_id=0,
            eos_id=1, bos_id=-1, pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        if m := _TOO_SMALL.search(str(e)):
            raise ValueError(f"{vocab_name}={vocab_size} is too small for this corpus: its "
                             f"characters, the 256 byte pieces and the special pieces need "
                             f"{vocab_name} >= {m[1]}") from None
        if m := _TOO_LARGE.search(str(e)):
            raise ValueError(f"{vocab_name}={vocab_size} is too large for this corpus: a "
                             f"{model_type} SentencePiece model of it has at most {m[1]} "
                             f"pieces") from None
        raise
    return buf.getvalue()


def load_or_train_sentencepiece(path: str, texts: Iterable[str], vocab_size: int,
                                model_type: str = "bpe") -> SentencePiece:
    """Load the model cached at `path`, or train one on `texts` and cache it there."""
    if os.path.exists(path):
        tok = SentencePiece.load(path)
        if tok.vocab_size != vocab_size:
            raise ValueError(f"{path} has vocab_size {tok.vocab_size}, but the config asks for "
                             f"{vocab_size}; delete it or use another workdir")
        return tok
    log.info("training a %d-piece SentencePiece %s tokenizer -> %s", vocab_size,
             model_type, path)
    tok = SentencePiece(train_sentencepiece(texts, vocab_size, model_type=model_type), path)
    tok.save(path)
    return tok


KINDS = ("sentencepiece", "gpt2")


def load(kind: str, path: str) -> Tokenizer:
    """A tokenizer by kind: `sentencepiece` (a .model file) or `gpt2` (BPE files or hub name).

    Runs record (kind, path, fingerprint) in their checkpoints, so tools rebuild the exact
    tokenizer a model was trained with.
    """
    choices.check("tokenizer kind", kind, KINDS)
    path = os.path.expanduser(path)
    return SentencePiece.load(path) if kind == "sentencepiece" else Gpt2Bpe(path)


def from_meta(meta: dict) -> Tokenizer:
    """The tokenizer recorded in a checkpoint's metadata; its fingerprint must match."""
    spec = meta["tokenizer"]
    tok = load(spec["kind"], spec["path"])
    if tok.fingerprint != spec["fingerprint"]:
        raise ValueError(f"tokenizer {spec['path']} has fingerprint {tok.fingerprint}, but "
                         f"the checkpoint was trained with {spec['fingerprint']}")
    return tok


def _train_main(argv: list[str] | None = None) -> None:
    """`python -m jaxgpt.tokenizer train --input=PATH --vocab_size=N --out=FILE.model`."""
    import argparse

    from jaxgpt import sources
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.tokenizer")
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--input", required=True, help="file, directory or glob")
    parser.add_argument("--source", default="text", choices=sources.SOURCES,
                        help="how to read --input into documents")
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--max_sentences", type=int, default=300_000,
                        help="lines sampled for training")
    parser.add_argument("--out", required=True, help="where to write the .model file")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} exists; remove it or choose another path")
    try:
        files = sources.find_splits(args.source, args.input)["train"]
        texts = [d.text for d in sources.iter_documents(args.source, files,
                                                        sources.BadRecords("error"))]
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        proto = train_sentencepiece(texts, args.vocab_size, model_type=args.model_type,
                                    max_sentences=args.max_sentences, vocab_name="--vocab_size")
    except ValueError as e:
        parser.error(str(e))
    tok = SentencePiece(proto, args.out)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.vocab_size} pieces ({args.model_type}), {tok.fingerprint}")


if __name__ == "__main__":
    _train_main()
