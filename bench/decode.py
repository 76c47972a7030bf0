"""Decode speed: jaxgpt's sampler vs HF transformers `generate` on the same random weights.

    python bench/decode.py                      # gpt2-124M shapes, batch 1 and 8, 128 new
    python bench/decode.py --size=tiny --batch=2 --new_tokens=16    # a quick check

Both sides run prefill + decode for `--prompt_len` prompt tokens and exactly `--new_tokens`
new tokens per row (no early EOS); tokens/s counts new tokens. jaxgpt's compile time is
reported separately and excluded from its rate; HF gets one untimed warm-up run. On a GPU,
the table adds the HBM-bandwidth bound: per step every weight and the whole KV cache are read.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import model, sample
from jaxgpt.convert import hf as hf_convert

METHODS = {"greedy": (sample.Greedy(), {"do_sample": False}),
           "top_p": (sample.Sampling(temperature=1.0, top_p=0.9),
                     {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": 0})}


def to_hf(cfg, params, device):
    """A torch GPT2LMHeadModel with these weights (through jaxgpt's HF export mapping)."""
    import torch
    import transformers
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    sd = hf_convert.hf_tensors(cfg, params)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    hf.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
    return hf.to(device)


def bench_jax(cfg, params, prompts, new_tokens, method, repeats):
    stats = {}
    sample.generate(cfg, params, prompts, max_new_tokens=new_tokens, method=method, stats=stats)
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        sample.generate(cfg, params, prompts, max_new_tokens=new_tokens, method=method, seed=r)
        best = min(best, time.perf_counter() - t0)
    return len(prompts) * new_tokens / best, stats["compile_s"]


def bench_hf(hf, prompts, new_tokens, kwargs, repeats, device):
    import torch
    ids = torch.tensor(prompts, device=device)
    run = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
               min_new_tokens=new_tokens, use_cache=True, pad_token_id=0, **kwargs)
    with torch.inference_mode():
        hf.generate(ids, **run)    # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = hf.generate(ids, **run)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / best


def hbm_bound(cfg, params, batch, cache_len, gbps):
    """New tokens/s if every decode step only had to read the weights and the full cache."""
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    cache_bytes = 2 * cfg.n_layer * batch * cache_len * cfg.n_embd * 4
    return batch / ((weight_bytes + cache_bytes) / (gbps * 1e9))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="model size (tiny mini small ...)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--methods", default="greedy,top_p")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs; the best counts")
    ap.add_argument("--no_hf", action="store_true", help="skip the HF transformers side")
    ap.add_argument("--hbm_gbps", type=float, default=3350.0, help="H100 SXM: 3350 GB/s")
    args = ap.parse_args()

    cfg = model.gpt2_config(args.size)
    params = nnx.state(model.GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    on_gpu = jax.default_backend() == "gpu"
    hf, device = None, "cpu"
    if not args.no_hf:
        import torch
        device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        hf = to_hf(cfg, params, device)
    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"{os.cpu_count()} CPUs, size {args.size}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens; HF on {device}")
    head = f"{'batch':>5} {'method':>7} {'jaxgpt tok/s':>13} {'HF tok/s':>9} {'ratio':>6} " \
           f"{'compile s':>9}" + (f" {'HBM bound tok/s':>16}" if on_gpu else "")
    print(head)
    for batch in (int(b) for b in args.batch.split(",")):
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        for name in args.methods.split(","):
            method, hf_kwargs = METHODS[name]
            ours, compile_s = bench_jax(cfg, params, prompts, args.new_tokens, method,
                                        args.repeats)
            theirs = (bench_hf(hf, prompts, args.new_tokens, hf_kwargs, args.repeats, device)
                      if hf is not None else float("nan"))
            line = f"{batch:>5} {name:>7} {ours:>13.1f} {theirs:>9.1f} {ours / theirs:>5.2f}x " \
                   f"{compile_s:>9.1f}"
            if on_gpu:
                cache_len = sample.bucket(args.prompt_len) + args.new_tokens
                line += f" {hbm_bound(cfg, params, batch, cache_len, args.hbm_gbps):>16.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
