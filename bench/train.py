"""Training throughput and MFU: jaxgpt's sharded train step vs a plain PyTorch GPT-2 of the
same shape (transformers' GPT2LMHeadModel, eager and torch.compile), side by side in one run.

CPU (the issue's comparison; run from the repo root on an otherwise idle machine):
    python bench/train.py --threads 2
GPU (jaxgpt only, bf16, cuDNN attention; see bench/gpu_train.sh):
    python bench/train.py --frameworks jax --sizes gpt2 --dtype bfloat16 \
        --attention cudnn --batch 32 --seq 1024 --vocab 50304 --steps 20

Every variant trains on the same random tokens with AdamW and global-norm clipping, float32
unless --dtype says otherwise. tokens/s is measured over --steps steps after --warmup steps
(compilation excluded and reported apart); MFU uses jaxgpt.mfu (PaLM FLOPs per token; the
CPU's peak is its measured float32 matmul rate).
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (GPTConfig overrides, batch, seq) for the CPU comparison.
SIZES = {
    "small": ({"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 4096,
               "n_positions": 128}, 16, 128),
    "gpt2": ({"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257,
              "n_positions": 1024}, 2, 256),
}


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="small,gpt2", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--frameworks", default="jax,torch,torch_compile")
    p.add_argument("--batch", type=int, help="sequences per step (default: per size)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: per size)")
    p.add_argument("--vocab", type=int, help="vocabulary rows (default: per size)")
    p.add_argument("--layers", type=int, help="override n_layer (quick tests)")
    p.add_argument("--embd", type=int, help="override n_embd (quick tests)")
    p.add_argument("--heads", type=int, help="override n_head (quick tests)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (incl. compile)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--dtype", default="float32", help="jaxgpt compute dtype")
    p.add_argument("--attention", default="einsum", help="jaxgpt attention kernel")
    p.add_argument("--remat", default="none", help="jaxgpt remat policy")
    p.add_argument("--scan_layers", action="store_true")
    p.add_argument("--loss_chunk_elements", type=int, default=0, metavar="N",
                   help="logits elements per chunk of the fused head + loss on an accelerator "
                        "(default: ops.CHUNK_ELEMENTS_ACCELERATOR)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, trace N jaxgpt steps and print where the time goes")
    p.add_argument("--profile_dir", default="", help="keep the trace here (default: a tmp dir)")
    return p.parse_args()


@dataclasses.dataclass
class Result:
    size: str
    framework: str
    tokens_per_s: float
    mfu: float | None
    step_s: float
    compile_s: float


def _shape(args, size):
    overrides, batch, seq = SIZES[size]
    overrides = dict(overrides)
    for key, value in (("n_layer", args.layers), ("n_embd", args.embd),
                       ("n_head", args.heads), ("vocab_size", args.vocab)):
        if value:
            overrides[key] = value
    seq = args.seq or seq
    overrides["n_positions"] = max(overrides["n_positions"], seq)
    return overrides, args.batch or batch, seq


def bench_jax(args, size) -> Result:
    import jax
    import numpy as np

    from jaxgpt import mfu, model, sharding, train
    overrides, batch, seq = _shape(args, size)
    cfg = model.GPTConfig(**overrides, dtype=args.dtype, attention=args.attention,
                          remat=args.remat, scan_layers=args.scan_layers)
    tx = train.make_optimizer(train.OptimConfig(warmup_steps=0), args.steps + args.warmup)
    mesh = sharding.make_mesh((-1, 1, 1))       # data parallel over whatever devices exist
    trainer = train.make_trainer(cfg, tx, mesh, sharding.RULES["dp"], seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq + 1),
                                               dtype=np.int32)
    windows = train.to_global(tokens, mesh, (None, "batch", None), trainer.rules)
    start = time.perf_counter()
    state = trainer.init()
    for _ in range(max(1, args.warmup)):
        state, metrics = trainer.train_step(state, windows)
        jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = trainer.train_step(state, windows)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps
    tps = batch * seq / step_s
    peak = mfu.peak_flops(list(mesh.devices.flat))
    util = tps * mfu.flops_per_token(cfg, seq) / peak if peak else None
    if args.profile:
        profile(lambda s: trainer.train_step(s, windows), state, args.profile, args.profile_dir)
    return Result(size, "jaxgpt", tps, util, step_s, compile_s)


def profile(step, state, n_steps: int, trace_dir: str = "", top: int = 25):
    """Trace `n_steps` calls of step(state) -> (state, metrics) with jax.profiler and print
    the ops that took the most time per step: device kernels where the trace has a device
    (GPU/TPU), else the XLA CPU ops (fusions, dots) of the compiled step."""
    import collections
    import glob
    import gzip
    import json
    import re
    import tempfile

    import jax
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="jaxgpt_trace_")
    jax.block_until_ready(state)
    with jax.profiler.trace(trace_dir):
        for _ in range(n_steps):
            state, metrics = step(state)
        jax.block_until_ready((state, metrics))
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        print(f"profile: no trace written under {trace_dir}")
        return state
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name)}
    # Host-side noise: Python frames ($...), runtime bookkeeping, thread-pool waits.
    noise = re.compile(r"^\$|Execute|Slinky|ThreadPool|PjitFunction|ParseArguments|^end: ")
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (device and e["pid"] not in device):
            continue
        if not device and noise.search(e["name"]):
            continue
        totals[e["name"]] += e.get("dur", 0)
        counts[e["name"]] += 1
    where = "device" if device else "host XLA ops"
    total = sum(totals.values()) / 1e3 / n_steps
    print(f"\nprofile ({where}, {n_steps} steps, trace in {trace_dir}): "
          f"{total:.2f} ms/step of ops; top {top}:")
    kinds = collections.Counter()
    for name, us in totals.items():
        kinds[re.sub(r"[._]?\d+$", "", name)] += us
    for name, us in totals.most_common(top):
        print(f"  {us / 1e3 / n_steps:9.3f} ms/step {100 * us / max(sum(totals.values()), 1):5.1f}%"
              f"  x{counts[name] // n_steps:<3d} {name[:110]}")
    print("  by kind (names without their numeric suffix):")
    for name, us in kinds.most_common(12):
        print(f"  {us / 1e3 / n_steps:9.3f} ms/step {100 * us / max(sum(totals.values()), 1):5.1f}%"
              f"  {name[:110]}")
    return state


def bench_torch(args, size, compiled: bool) -> Result:
    import torch
    import transformers

    from jaxgpt import mfu, model
    overrides, batch, seq = _shape(args, size)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=overrides["vocab_size"], n_positions=overrides["n_positions"],
        n_embd=overrides["n_embd"], n_layer=overrides["n_layer"], n_head=overrides["n_head"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new")
    net = transformers.GPT2LMHeadModel(hf_cfg).train()
    opt = torch.optim.AdamW(net.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    forward = torch.compile(net) if compiled else net
    tokens = torch.randint(0, hf_cfg.vocab_size, (batch, seq))

    def step():
        loss = forward(input_ids=tokens, labels=tokens).loss   # HF shifts labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(max(1, args.warmup)):
        step()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_s = (time.perf_counter() - start) / args.steps
    # HF's labels shift drops one position per row: seq - 1 predicted tokens per row.
    tps = batch * (seq - 1) / step_s
    cfg = model.GPTConfig(**overrides)
    peak = _cpu_peak()
    return Result(size, "torch.compile" if compiled else "torch eager", tps,
                  tps * mfu.flops_per_token(cfg, seq) / peak, step_s, compile_s)


def _cpu_peak() -> float:
    import jax

    from jaxgpt import mfu
    return mfu.peak_flops(jax.devices("cpu")[:1]) * jax.local_device_count("cpu")


def main():
    args = _parse()
    if args.loss_chunk_elements:
        from jaxgpt import ops
        if args.loss_chunk_elements < 1:
            raise SystemExit(f"--loss_chunk_elements must be >= 1, got {args.loss_chunk_elements}")
        ops.CHUNK_ELEMENTS_ACCELERATOR = args.loss_chunk_elements
    results = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
        for framework in args.frameworks.split(","):
            if framework == "jax":
                results.append(bench_jax(args, size))
            elif framework in ("torch", "torch_compile"):
                results.append(bench_torch(args, size, compiled=framework == "torch_compile"))
            else:
                raise SystemExit(f"--frameworks: unknown {framework!r} "
                                 f"(jax, torch, torch_compile)")
            r = results[-1]
            print(f"# {r.size} {r.framework}: {r.tokens_per_s:,.0f} tokens/s", flush=True)
    import jax
    print(f"\ndevices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"dtype {args.dtype}; attention {args.attention}; remat {args.remat}")
    print("| size | framework | tokens/s | MFU | s/step | warm-up s | jaxgpt / best torch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        torch_best = max((t.tokens_per_s for t in results
                          if t.size == r.size and t.framework.startswith("torch")), default=None)
        ratio = (f"{r.tokens_per_s / torch_best:.2f}x"
                 if r.framework == "jaxgpt" and torch_best else "")
        util = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        print(f"| {r.size} | {r.framework} | {r.tokens_per_s:,.0f} | {util} | "
              f"{r.step_s:.3f} | {r.compile_s:.1f} | {ratio} |")
    for r in results:
        if r.framework == "jaxgpt":
            print(f"RESULT {r.size}: tokens/s {r.tokens_per_s:,.0f}  MFU "
                  + (f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"))


if __name__ == "__main__":
    main()
