"""GPT-2 block vs the modern block at the same size: validation loss side by side.

Both models see the same tokens in the same order (WikiText-2 valid split into train/val),
with the same optimizer, schedule and step budget; only the architecture differs
(`model.gpt2_config` vs `model.modern_config` of one size). The defaults train 2 x 300
steps of 2,048 tokens (~1.2M tokens through ~1M-parameter models); the steps of the two
models interleave, so both see the same machine load and the tok/s columns compare:

    python bench/arch.py                      # mini: 4 layers x 128, 300 steps
    python bench/arch.py --steps 600 --size tiny
"""

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import data, model, sharding, shards, tokenizer, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "valid.txt")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="a text file (default: WikiText-2 valid)")
    p.add_argument("--size", default="mini", help="a model.SIZES name (mini = 4 x 128)")
    p.add_argument("--vocab", type=int, default=2048, help="SentencePiece pieces")
    p.add_argument("--block", type=int, default=128, help="tokens per window")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (both models)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="tokenizer cache (default: a temp dir)")
    return p.parse_args()


def load_windows(args, workdir):
    if not os.path.isfile(args.data):
        sys.exit(f"error: data file {args.data} does not exist (expected the shared "
                 f"WikiText-2 copy beside the repository)")
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    tok = tokenizer.load_or_train_sentencepiece(
        os.path.join(workdir, f"wikitext2-{args.vocab}.model"), [text], args.vocab)
    tokens = shards.tokenize_documents([text], tok)
    train_tokens, val_tokens = data.split_tokens(tokens, args.val_fraction, args.block)
    return (data.pack_windows(train_tokens, args.block), data.pack_windows(val_tokens, args.block),
            len(train_tokens), len(val_tokens))


def batch_order(n_windows: int, args) -> np.ndarray:
    """[steps, batch] window indices: seeded epochs of shuffles, shared by both models."""
    rng = np.random.default_rng(args.seed)
    epochs = math.ceil(args.steps * args.batch / n_windows) + 1
    order = np.concatenate([rng.permutation(n_windows) for _ in range(epochs)])
    return order[:args.steps * args.batch].reshape(args.steps, args.batch)


def make_run(cfg, args, mesh, rules):
    tx = train.make_optimizer(train.OptimConfig(learning_rate=args.lr, warmup_steps=args.warmup),
                              args.steps)
    trainer = train.make_trainer(cfg, tx, mesh, rules, args.seed)
    return {"trainer": trainer, "state": trainer.init(), "losses": [], "seconds": 0.0,
            "curve": []}


def eval_table(step: int, runs: dict) -> str:
    """The progress report's per-eval block: one row per model."""
    lines = [f"eval @ step {step}",
             "| model  | params    | train loss | val loss | val ppl | tok/s  |",
             "|--------|-----------|------------|----------|---------|--------|"]
    for name, run in runs.items():
        _, train_loss, val_loss = run["curve"][-1]
        lines.append(f"| {name:<6} | {run['params']:>9,} | {train_loss:>10.4f} | "
                     f"{val_loss:>8.4f} | {math.exp(val_loss):>7.2f} | {run['tok_s']:>6,.0f} |")
    return "\n".join(lines)


def main():
    args = parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-arch-")
    train_w, val_w, n_train, n_val = load_windows(args, workdir)
    print(f"data: {args.data}: {n_train:,} train / {n_val:,} val tokens "
          f"({args.vocab}-piece SentencePiece), {len(train_w)} train windows of {args.block}")
    mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
    rules = sharding.RULES["dp"]
    shape = {"vocab_size": args.vocab, "n_positions": args.block}
    cfgs = {"gpt2": model.gpt2_config(args.size, **shape),
            "modern": model.modern_config(args.size, **shape)}
    runs = {name: make_run(cfg, args, mesh, rules) for name, cfg in cfgs.items()}
    for name, run in runs.items():
        run["params"] = model.count_params(run["state"].params)
        changed = {k: v for k, v in dataclasses.asdict(cfgs[name]).items()
                   if v != getattr(cfgs["gpt2"], k)}
        print(f"{name}: {run['params']:,} params; options {changed or 'GPT-2'}")
    order = batch_order(len(train_w), args)
    for step in range(args.steps):
        batch = np.asarray(train_w[order[step]], np.int32)[None]      # [1, B, T + 1]
        for run in runs.values():   # interleaved: both models share the machine's load
            t0 = time.perf_counter()
            run["state"], metrics = run["trainer"].train_step(run["state"], batch)
            run["losses"].append(float(metrics["loss"]))   # blocks: the step is timed
            if step:   # the first step compiles
                run["seconds"] += time.perf_counter() - t0
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            for run in runs.values():
                val = train.evaluate(run["trainer"], run["state"].params, val_w, 32, 0)
                recent = run["losses"][-args.eval_every:]
                run["curve"].append((done, float(np.mean(recent)), val["val_loss"]))
                run["tok_s"] = (done - 1) * args.batch * args.block / max(run["seconds"], 1e-9)
            print(eval_table(done, runs), flush=True)
    print("\ncurves (train loss = mean over the steps since the previous eval)")
    print("| step | gpt2 train | gpt2 val | modern train | modern val |")
    print("|------|------------|----------|--------------|------------|")
    for (step, gt, gv), (_, mt, mv) in zip(runs["gpt2"]["curve"], runs["modern"]["curve"]):
        print(f"| {step:>4} | {gt:>10.4f} | {gv:>8.4f} | {mt:>12.4f} | {mv:>10.4f} |")
    g, m = runs["gpt2"]["curve"][-1][2], runs["modern"]["curve"][-1][2]
    print(f"\nfinal val loss after {args.steps} steps: gpt2 {g:.4f}, modern {m:.4f} "
          f"(modern - gpt2 = {m - g:+.4f}; val ppl {math.exp(g):.2f} vs {math.exp(m):.2f})")


if __name__ == "__main__":
    main()
