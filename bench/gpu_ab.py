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

Each run costs about a minute on an H100 (compilation included): five fit the device's
10-minute limit per command. Extra arguments after `--` go to every run.
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
DEFAULT_VARIANTS = (
    # cuBLASLt lets XLA fold the MLP's bias and tanh GELU into the matmul's epilogue.
    ("cublaslt", "--xla_gpu_enable_cublaslt=true", ""),
    # Triton GEMMs can fuse elementwise producers and consumers into the matmul.
    ("triton_gemm", "--xla_gpu_enable_triton_gemm=true", ""),
    ("batch_96", "", "--batch 96"),
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
    p.add_argument("--script", default=os.path.join(REPO, "bench", "gpu_train.sh"),
                   help="the benchmark each run executes; it prints a RESULT line")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("common", nargs="*", help="after --: arguments for every run")
    a = p.parse_args()
    variants = a.variant or list(DEFAULT_VARIANTS)
    plan = [("baseline", "", ""), *variants, ("baseline", "", "")]
    if a.dry_run:
        for name, xla, args in plan:
            cmd, env = _command(a.script, xla, args, a.common)
            print(f"{name}: XLA_FLAGS={shlex.quote(env['XLA_FLAGS'])} {shlex.join(cmd)}")
        return 0
    results = [(name, _run(a.script, name, xla, args, a.common, a.timeout))
               for name, xla, args in plan]
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
    return 0 if all(r for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
