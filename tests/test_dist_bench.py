"""bench/gpu_train.sh runs end to end on CPU with tiny shapes and prints its result line
and, with --profile, the per-step op table."""

import os
import re
import subprocess

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
