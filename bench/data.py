"""Loader speed: tokens/s delivered to the trainer, side by side with what training eats.

    python bench/data.py                       # ~8 MB of shared text, GPT-2 BPE, block 1024
    python bench/data.py --mb=1 --batches=50   # a quick check

Rows: (a) text -> tokens through the pipeline's read+tokenize stage (`shards.prepare`,
grain threads over files), with GPT-2 BPE and a SentencePiece model, next to the bare
tokenizers (HF `tokenizers` byte-level BPE and SentencePiece, batch encode) on the same
text; (b) batches of `block_size + 1` windows from the pre-tokenized shards through the
training iterator (shuffle, batch, prefetch threads); (c) the same batches streamed
(`data.streaming`: the same text as SlimPajama-layout `.jsonl`, tokenized while served,
GPT-2 BPE with the tokenizer's own threads). The reference rate is gpt2-124M
training on one H100 at 50% MFU: (6N + 12 L T D) FLOP per token against 989 dense bf16
TFLOP/s. Shards must beat it many times over (target >= 10M tokens/s per host).
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import data, shards, stream, tokenizer

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data")


def h100_gpt2_tokens_per_s(mfu: float = 0.5, block: int = 1024) -> float:
    n, layers, d = 124e6, 12, 768
    flop_per_token = 6 * n + 12 * layers * block * d
    return 989e12 * mfu / flop_per_token


def corpus_files(tmp: str, mb: float, n_files: int) -> list[str]:
    """The shared corpora repeated to `mb` megabytes, cut at line ends into n_files files."""
    text = "".join(pathlib.Path(SHARED, p).read_text(encoding="utf-8")
                   for p in ("wikitext-2/valid.txt", "tinyshakespeare/input.txt"))
    text = text * max(1, int(mb * 1e6 / len(text)) + 1)
    text = text[:text.rfind("\n", 0, int(mb * 1e6)) + 1]
    lines = text.splitlines(keepends=True)
    per = len(lines) // n_files + 1
    paths = []
    for i in range(n_files):
        path = os.path.join(tmp, f"part{i:02d}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines[i * per:(i + 1) * per])
        paths.append(path)
    return paths


def timed(fn, repeats: int = 2):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def bench_prepare(dcfg, tok, tmp, name, threads):
    dcfg = data.DataConfig(**{**dcfg.__dict__, "read_threads": threads})
    counter = iter(range(100))
    manifest, secs = timed(lambda: shards.prepare(dcfg, tok, os.path.join(
        tmp, f"{name}-{threads}-{next(counter)}")))
    tokens = sum(manifest["splits"]["train"]["tokens"].values())
    return tokens / secs, manifest


def bench_bare(texts, encode_batch):
    ids, secs = timed(lambda: encode_batch(texts))
    return sum(len(x) for x in ids) / secs


def tile_shards(root: str, out: str, million_tokens: float, n_shards: int = 4) -> str:
    """A prepared directory whose train split is `root`'s tokens repeated to the given size
    in `n_shards` shards: epochs as long as a real corpus's (grain's per-epoch reshuffle
    costs show on a tiny epoch), without tokenizing that much text first."""
    manifest = json.loads(pathlib.Path(root, data.MANIFEST).read_text())
    import numpy as np
    tokens = np.concatenate([np.fromfile(os.path.join(root, s["path"]), manifest["dtype"])
                             for s in manifest["splits"]["train"]["shards"]])
    per = int(million_tokens * 1e6 / n_shards)
    tiled = np.resize(tokens, per)
    entries = []
    for i in range(n_shards):
        rel = f"train/tiled/{i:05d}.bin"
        os.makedirs(os.path.join(out, "train", "tiled"), exist_ok=True)
        tiled.tofile(os.path.join(out, rel))
        entries.append({"path": rel, "source": "tiled", "tokens": per})
    manifest["splits"] = {"train": {"shards": entries, "tokens": {"tiled": per * n_shards},
                                    "documents": {}}}
    with open(os.path.join(out, data.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return out


def bench_shards(root, dcfg, tok, batch, batches, threads):
    dcfg = data.DataConfig(**{**dcfg.__dict__, "read_threads": threads, "prefetch": 8})
    corpus = data.load_prepared(root, dcfg, tok.fingerprint)
    ds = data.make_train_dataset(corpus, global_batch=batch, seed=0)
    it = data.make_iterator(ds, dcfg)
    next(it)   # start the threads
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    secs = time.perf_counter() - t0
    assert b.shape == (batch, dcfg.block_size + 1)
    return batch * dcfg.block_size * batches / secs


def bench_stream(texts, tmp, block_size, tok, batch, batches):
    """(c): the texts as SlimPajama-layout documents of 50 lines, streamed."""
    root = os.path.join(tmp, "stream")
    for split, parts in (("train", texts), ("validation", texts[:1])):
        os.makedirs(os.path.join(root, split))
        for i, text in enumerate(parts):
            lines = text.splitlines(keepends=True)
            with open(os.path.join(root, split, f"part{i:02d}.jsonl"), "w") as f:
                f.writelines(json.dumps({"text": "".join(lines[k:k + 50]),
                                         "meta": {"redpajama_set_name": "bench"}}) + "\n"
                             for k in range(0, len(lines), 50))
    dcfg = data.DataConfig(source="slimpajama", path=root, block_size=block_size,
                           tokenizer="gpt2", streaming=True, shuffle_windows=16 * batch)
    it = stream.StreamIterator(dcfg, tok, global_batch=batch, seed=0)
    next(it)   # the first block
    # Blocks of 16 batches are tokenized while served: time several of them, not batches
    # the first block already holds.
    batches = max(batches, 4 * 16)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    secs = time.perf_counter() - t0
    assert b.shape == (batch, block_size + 1)
    return batch * block_size * batches / secs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=8.0, help="megabytes of text")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--sp_vocab", type=int, default=8000)
    parser.add_argument("--shard_mtokens", type=float, default=50.0,
                        help="million tokens in the shards read by (b)")
    args = parser.parse_args()
    import tokenizers
    import transformers  # noqa: F401  (Gpt2Bpe needs it; fail early with a clear import)

    rows, ref = [], h100_gpt2_tokens_per_s(block=args.block_size)
    with tempfile.TemporaryDirectory() as tmp:
        files = corpus_files(tmp, args.mb, args.files)
        texts = [pathlib.Path(f).read_text(encoding="utf-8") for f in files]
        dcfg = data.DataConfig(source="text", path=os.path.join(tmp, "part*.txt"),
                               block_size=args.block_size, tokenizer="gpt2")
        gpt2 = tokenizer.load("gpt2", os.path.join(SHARED, "gpt2-bpe"))
        sp = tokenizer.SentencePiece(tokenizer.train_sentencepiece(
            texts, args.sp_vocab, max_sentences=100_000))
        hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
            os.path.join(SHARED, "gpt2-bpe", "encoder.json"),
            os.path.join(SHARED, "gpt2-bpe", "vocab.bpe")))
        hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        rows.append(("(a) HF tokenizers GPT-2 BPE, bare encode_batch", "-",
                     bench_bare(texts, lambda t: [e.ids for e in hf.encode_batch(t)])))
        rows.append(("(a) SentencePiece BPE, bare encode (2 threads)", "-",
                     bench_bare(texts, lambda t: sp.sp.encode(t, num_threads=2))))
        for threads in (1, 2):
            rate, _ = bench_prepare(dcfg, gpt2, tmp, "gpt2", threads)
            rows.append(("(a) pipeline read+tokenize, GPT-2 BPE", threads, rate))
            rate, _ = bench_prepare(data.DataConfig(**{**dcfg.__dict__,
                                                       "tokenizer": "sentencepiece"}),
                                    sp, tmp, "sp", threads)
            rows.append((f"(a) pipeline read+tokenize, SentencePiece {args.sp_vocab}", threads,
                         rate))
        root = os.path.join(tmp, "shards")
        manifest = shards.prepare(dcfg, gpt2, root)
        root = tile_shards(root, os.path.join(tmp, "tiled"), args.shard_mtokens)
        for threads in (1, 2):
            name = (f"(b) {args.shard_mtokens:g}M-token shards -> shuffled batches "
                    f"{args.batch}x{args.block_size + 1}")
            rows.append((name, threads, bench_shards(root, dcfg, gpt2, args.batch,
                                                     args.batches, threads)))
        name = f"(c) streamed .jsonl -> shuffled batches {args.batch}x{args.block_size + 1}"
        rows.append((name, "-",
                     bench_stream(texts, tmp, args.block_size, gpt2, args.batch,
                                  args.batches // 3)))
    n_tokens = sum(manifest["splits"]["train"]["tokens"].values())
    print(f"\n{args.mb:.1f} MB text in {args.files} files = {n_tokens:,} GPT-2 tokens; "
          f"{os.cpu_count()} CPU cores")
    print(f"gpt2-124M on one H100 at 50% MFU consumes {ref / 1e6:.2f}M tokens/s\n")
    print(f"| {'stage':<58} | threads | {'tokens/s':>12} | x H100 need |")
    print(f"|{'-' * 60}|---------|{'-' * 14}|-------------|")
    for name, threads, rate in rows:
        print(f"| {name:<58} | {threads!s:>7} | {rate:>12,.0f} | {rate / ref:>11.2f} |")
    print(json.dumps({name + f" [{t}]": round(r) for name, t, r in rows}))


if __name__ == "__main__":
    main()
