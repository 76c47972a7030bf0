"""bench/gpu_train.sh runs end to end on CPU with tiny shapes and prints its result line
and, with --profile, the per-step op table."""

import os
import re
import subprocess
import sys

import pytest

from tests import helpers


@pytest.mark.slow
def test_gpu_bench_script_runs_tiny_on_cpu():
    out = subprocess.run(
        ["bash", os.path.join(helpers.REPO, "bench", "gpu_train.sh"), "--layers", "2",
         "--embd", "64", "--heads", "4", "--vocab", "256", "--batch", "2", "--seq", "32",
         "--steps", "2", "--warmup", "1", "--profile", "2"],
        cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    # The GPU defaults (bf16, fused attention) are what ran; the CPU's peak is measured.
    assert "dtype bfloat16; attention cudnn" in out.stdout
    match = re.search(r"RESULT gpt2: tokens/s ([\d,]+)  MFU ([\d.]+)%", out.stdout)
    assert match and float(match.group(1).replace(",", "")) > 0 and float(match.group(2)) > 0
    # --profile: a per-step op table whose shares are of the traced ops' total.
    table = re.search(r"profile \(host XLA ops, 2 steps, .*\): ([\d.]+) ms/step", out.stdout)
    assert table and float(table.group(1)) > 0, out.stdout[-3000:]
    shares = [float(x) for x in re.findall(r"ms/step +([\d.]+)%  x", out.stdout)]
    assert shares and sum(shares) <= 100.5


@pytest.mark.slow
def test_gpu_ab_runs_baseline_around_each_variant_and_compares():
    """bench/gpu_ab.py: the baseline, the variant (its arguments override the common ones,
    its XLA flag reaches the process), the baseline again, then the ratio table."""
    tiny = ["--layers", "2", "--embd", "64", "--heads", "4", "--vocab", "256", "--batch",
            "2", "--seq", "32", "--steps", "2", "--warmup", "1"]
    out = subprocess.run(
        [sys.executable, os.path.join(helpers.REPO, "bench", "gpu_ab.py"), "--variant",
         "b4|--xla_gpu_enable_cublaslt=true|--batch 4", "--", *tiny],
        cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    names = re.findall(r"^## (\w+): XLA_FLAGS", out.stdout, re.MULTILINE)
    assert names == ["baseline", "b4", "baseline"]
    assert re.search(r"## b4: XLA_FLAGS='[^']*--xla_gpu_enable_cublaslt=true' .*--batch 2 .*"
                     r"--batch 4$", out.stdout, re.MULTILINE)
    rows = re.findall(r"^\| (\w+) \| ([\d,]+) \| ([\d.]+)% \| ([\d.]+)x \|$", out.stdout,
                      re.MULTILINE)
    assert [r[0] for r in rows] == names
    tps = [float(r[1].replace(",", "")) for r in rows]
    mean_base = (tps[0] + tps[2]) / 2
    assert [float(r[3]) for r in rows] == pytest.approx([t / mean_base for t in tps], abs=2e-3)
    assert "baseline drift over the call:" in out.stdout
