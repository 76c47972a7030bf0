"""Resuming the HF SlimPajama stream: time to the first batch from a saved stream state
(`datasets`' state_dict) against reading the stream again up to the saved document.

    python bench/stream_resume.py [--docs=200000] [--files=8]

Offline: `datasets` streams local JSON-lines shards (SlimPajama's row format) wherever
jaxgpt asks for the hub's copy. A run streams until about --at of the documents, saves the
iterator state, and two fresh iterators resume from it: one with the saved stream state, one
without it (as checkpoints from before it was saved). Both must give the same next batch.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import data, stream, tokenizer

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data")


def write_shards(root: str, n_docs: int, n_files: int) -> dict[str, list[str]]:
    rng = random.Random(0)
    with open(os.path.join(SHARED, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        lines = [s.strip() for s in f if s.strip()]
    files = {"train": [], "validation": []}
    for split, n, k in (("train", n_docs, n_files), ("validation", 200, 1)):
        os.makedirs(os.path.join(root, split))
        for i in range(k):
            path = os.path.join(root, split, f"chunk_{i}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for _ in range(n // k):
                    j = rng.randrange(len(lines) - 4)
                    f.write(json.dumps({"text": " ".join(lines[j:j + 4]), "meta": {
                        "redpajama_set_name": "RedPajamaBook"}}) + "\n")
            files[split].append(path)
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--at", type=float, default=0.75, help="resume point (fraction)")
    args = parser.parse_args()
    import datasets
    root = tempfile.mkdtemp(prefix="jaxgpt-stream-resume-")
    files = write_shards(root, args.docs, args.files)
    real_load = datasets.load_dataset
    datasets.load_dataset = lambda name, split, streaming: real_load(
        "json", data_files={split: files[split]}, split=split, streaming=True)
    tok = tokenizer.load("gpt2", os.path.join(SHARED, "gpt2-bpe"))
    dcfg = data.DataConfig(source="slimpajama", block_size=1024, streaming=True,
                           tokenizer="gpt2", shuffle_windows=256)
    make = lambda: stream.StreamIterator(dcfg, tok, global_batch=16, seed=0)
    it, t0 = make(), time.perf_counter()
    while it.local_state()[1] < args.at * args.docs:
        next(it)
    state, want = it.get_state(), next(it)
    it.close()
    doc = state["processes"][0][1]
    print(f"streamed to document {doc:,} of {args.docs:,} ({len(files['train'])} shard files) "
          f"in {time.perf_counter() - t0:.1f} s")
    times = {}
    for name, saved in (("saved stream state", state),
                        ("reading again", {k: v for k, v in state.items() if k != "hf_states"})):
        again, t0 = make(), time.perf_counter()
        again.set_state(saved)
        got = next(again)
        times[name] = time.perf_counter() - t0
        again.close()
        assert np.array_equal(got, want), name
        print(f"resume from {name:18}: first batch after {times[name]:6.2f} s (same batch)")
    print(f"RESULT stream resume: {times['reading again'] / times['saved stream state']:.1f}x "
          f"faster with the saved state at document {doc:,}")


if __name__ == "__main__":
    main()
