"""Side-by-side variants of bench/gpu_train.sh on one machine, in one call: XLA flags and
benchmark arguments, each in a fresh process, the baseline first and again last.

Throughput of the same code varies about 2% between machines of one kind but about 0.2%
between runs on one machine, so a change is only judged against a baseline measured beside
it; the repeated baseline shows the drift over the call. Prints one table with each variant's
tokens/s and MFU, its ratio to the mean of the baselines, and the drift.

    python bench/gpu_ab.py                                  # the default variants below
    python bench/gpu_ab.py --variant 'lt|--xla_gpu_enable_cublaslt=true|' \\
        --variant 'b96||--batch 96'                          # NAME|XLA flags|bench args
    python bench/gpu_ab.py --dry-run                         # print the commands only

Each run costs about a minute on an H100 (compilation included). Before any run, every
variant's XLA flags are parsed by this jaxlib on the CPU (no GPU time): a misspelt flag is
named at once instead of aborting its run. `--budget` keeps the whole call inside the
device's 10-minute limit per command: a variant starts only if, at the longest run so far,
it and the closing baseline still fit; the variants left out are named. Extra arguments
after `--` go to every run.
"""

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = re.compile(r"RESULT gpt2: tokens/s ([\d,]+)  MFU ([\d.]+)%")

# name, extra XLA flags, extra bench/train.py arguments.
DEFAULT_VARIANTS = (   # most promising first: --budget may leave out the last
    # cuBLASLt lets XLA fold the MLP's bias and tanh GELU into the matmul's epilogue.
    ("cublaslt", "--xla_gpu_enable_cublaslt=true", ""),
    # cuDNN's layer-norm kernel for the 25 layer norms (forward and backward) per step.
    ("cudnn_layer_norm", "--xla_gpu_enable_cudnn_layer_norm=true", ""),
    ("batch_96", "", "--batch 96"),
    # 4 chunks of 256 positions for the fused head + loss instead of 16 of 64: fewer passes
    # over the [V, D] head weight, larger matmuls, fewer f32 [D, V] accumulations (~1 ms a step).
    ("loss_chunk_2e30", "", "--loss_chunk_elements 1073741824"),
    # Triton GEMMs can fuse elementwise producers and consumers into the matmul.
    ("triton_gemm", "--xla_gpu_enable_triton_gemm=true", ""),
)


def _parse_variant(text: str):
    parts = text.split("|")
    if len(parts) != 3 or not parts[0] or not re.fullmatch(r"[\w.-]+", parts[0]):
        raise SystemExit(f"--variant {text!r}: expected NAME|XLA flags|bench args, with a "
                         f"name of letters, digits, '_', '.' or '-'")
    return tuple(p.strip() for p in parts)


def _command(script: str, xla: str, args: str, common: list[str]):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), xla) if f)
    # The variant's own arguments last, so they override the common ones.
    return ["bash", script, *common, *shlex.split(args)], env


def _check_flags(plan) -> str | None:
    """None if this jaxlib knows every XLA flag in the plan and the caller's XLA_FLAGS, else
    the error (XLA aborts a process at start-up on an unknown flag). Parsed by a CPU-only
    process, so no GPU time: all at once, then (on an error) one at a time, to name it."""
    def error(xla):
        env = {**os.environ, "XLA_FLAGS": xla, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        if out.returncode == 0:
            return None
        unknown = re.search(r"Unknown flags? in XLA_FLAGS: *(.*)", out.stderr)
        return unknown[1] if unknown else (out.stderr.strip().splitlines() or ["?"])[-1]

    flagged = [(f"variant {name}", xla) for name, xla, _ in plan if xla]
    if os.environ.get("XLA_FLAGS"):
        flagged.insert(0, ("the environment's XLA_FLAGS", os.environ["XLA_FLAGS"]))
    if not flagged or not error(" ".join(xla for _, xla in flagged)):
        return None
    for label, xla in flagged:
        if why := error(xla):
            return f"{label}: XLA rejects its flags ({why})"
    return "XLA rejects the variants' flags together, though each variant's alone parse"


def _run(script, name, xla, args, common, timeout):
    cmd, env = _command(script, xla, args, common)
    print(f"## {name}: XLA_FLAGS={env['XLA_FLAGS']!r} {shlex.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        print(f"## {name}: no result within {timeout} s", flush=True)
        return None
    wall = time.perf_counter() - start
    match = RESULT.search(out.stdout)
    if out.returncode != 0 or not match:
        tail = (out.stdout + out.stderr).strip().splitlines()[-15:]
        print(f"## {name}: failed (exit {out.returncode}) after {wall:.0f} s:\n  "
              + "\n  ".join(tail), flush=True)
        return None
    tps, util = float(match.group(1).replace(",", "")), float(match.group(2))
    print(f"## {name}: {tps:,.0f} tokens/s, MFU {util:.1f}%, {wall:.0f} s", flush=True)
    return tps, util


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", type=_parse_variant, default=None,
                   metavar="NAME|XLA|ARGS", help="a variant (repeatable; default: built-in)")
    p.add_argument("--timeout", type=int, default=240, help="seconds per run")
    p.add_argument("--budget", type=float, default=540,
                   help="seconds for the whole call (0: no limit); see above")
    p.add_argument("--script", default=os.path.join(REPO, "bench", "gpu_train.sh"),
                   help="the benchmark each run executes; it prints a RESULT line")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("common", nargs="*", help="after --: arguments for every run")
    a = p.parse_args()
    variants = a.variant or list(DEFAULT_VARIANTS)
    plan = [("baseline", "", ""), *variants, ("baseline", "", "")]
    if error := _check_flags(plan):
        print(error, file=sys.stderr)
        return 2
    if a.dry_run:
        for name, xla, args in plan:
            cmd, env = _command(a.script, xla, args, a.common)
            print(f"{name}: XLA_FLAGS={shlex.quote(env['XLA_FLAGS'])} {shlex.join(cmd)}")
        return 0
    results, skipped, longest, start = [], [], 0.0, time.monotonic()
    for i, (name, xla, args) in enumerate(plan):
        # A variant needs room for itself and the closing baseline; the baselines always run.
        if (0 < i < len(plan) - 1 and a.budget
                and time.monotonic() - start + 2 * longest > a.budget):
            print(f"## {name}: left out, the budget of {a.budget:.0f} s would not hold it "
                  f"and the closing baseline at {longest:.0f} s a run", flush=True)
            skipped.append(name)
            continue
        t = time.monotonic()
        results.append((name, _run(a.script, name, xla, args, a.common, a.timeout)))
        longest = max(longest, time.monotonic() - t)
    base = [r[0] for name, r in results if name == "baseline" and r]
    if not base:
        print("no baseline result: nothing to compare", file=sys.stderr)
        return 1
    mean = statistics.fmean(base)
    print(f"\nbaseline drift over the call: {100 * (max(base) / min(base) - 1):.2f}%")
    print("| variant | tokens/s | MFU | vs baseline |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in results:
        if r is None:
            print(f"| {name} | failed | | |")
        else:
            print(f"| {name} | {r[0]:,.0f} | {r[1]:.1f}% | {r[0] / mean:.3f}x |")
    if skipped:
        print(f"left out for time: {', '.join(skipped)} (run them in a call of their own)")
    return 0 if all(r for _, r in results) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
