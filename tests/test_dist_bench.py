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


def test_gpu_ab_runs_baseline_around_each_variant_and_compares(tmp_path):
    """bench/gpu_ab.py: the baseline, the variant (its arguments after the common ones, its
    XLA flag in the environment), the baseline again, then ratios to the baselines' mean.
    A stand-in benchmark reports a rate from what it was given: 100 tokens/s plus 10 per
    argument, 1000 more with the variant's flag."""
    script = tmp_path / "bench.sh"
    script.write_text('echo "args: $*"\n'
                      'rate=$((100 + 10 * $#))\n'
                      'case "$XLA_FLAGS" in *enable_cublaslt*) rate=$((rate + 1000));; esac\n'
                      'echo "RESULT gpt2: tokens/s $rate  MFU 1.5%"\n')
    out = subprocess.run(
        [sys.executable, os.path.join(helpers.REPO, "bench", "gpu_ab.py"), "--script",
         str(script), "--variant", "lt|--xla_gpu_enable_cublaslt=true|--batch 4", "--",
         "--batch", "2"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    names = re.findall(r"^## (\w+): XLA_FLAGS", out.stdout, re.MULTILINE)
    assert names == ["baseline", "lt", "baseline"]
    assert re.search(r"## lt: XLA_FLAGS='[^']*--xla_gpu_enable_cublaslt=true' .*--batch 2 "
                     r"--batch 4$", out.stdout, re.MULTILINE)
    rows = re.findall(r"^\| (\w+) \| ([\d,]+) \| ([\d.]+)% \| ([\d.]+)x \|$", out.stdout,
                      re.MULTILINE)
    # baseline: 2 arguments -> 120; the variant: 4 arguments and the flag -> 1140.
    assert rows == [("baseline", "120", "1.5", "1.000"), ("lt", "1,140", "1.5", "9.500"),
                    ("baseline", "120", "1.5", "1.000")]
    assert "baseline drift over the call: 0.00%" in out.stdout


def test_gpu_ab_keeps_to_its_budget_and_always_closes_with_the_baseline(tmp_path):
    """A 1.5 s stand-in run and a 5.2 s budget: after the first baseline the first variant
    still fits with the closing baseline (1.5 + 2 x 1.5 s), the second does not (3 + 3 s)."""
    script = tmp_path / "bench.sh"
    script.write_text('sleep 1.5\necho "RESULT gpt2: tokens/s 100  MFU 1.0%"\n')
    out = subprocess.run(
        [sys.executable, os.path.join(helpers.REPO, "bench", "gpu_ab.py"), "--script",
         str(script), "--budget", "5.2", "--variant", "a||", "--variant", "b||"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1, (out.stdout + out.stderr)[-3000:]
    ran = re.findall(r"^## (\w+): XLA_FLAGS", out.stdout, re.MULTILINE)
    assert ran == ["baseline", "a", "baseline"]
    assert re.search(r"^## b: left out, the budget of 5 s", out.stdout, re.MULTILINE)
    assert "left out for time: b" in out.stdout


def test_gpu_ab_flags_are_checked_before_any_run(tmp_path):
    """Every default variant's XLA flags are known to this jaxlib (a dry run checks them on
    the CPU), and a misspelt flag stops the call before any run, named."""
    gpu_ab = os.path.join(helpers.REPO, "bench", "gpu_ab.py")
    ok = subprocess.run([sys.executable, gpu_ab, "--dry-run"], capture_output=True, text=True,
                        timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "cudnn_layer_norm: XLA_FLAGS=--xla_gpu_enable_cudnn_layer_norm=true" in ok.stdout
    script = tmp_path / "bench.sh"
    script.write_text('echo ran > "$0.ran"\n')
    bad = subprocess.run(
        [sys.executable, gpu_ab, "--script", str(script), "--variant",
         "typo|--xla_gpu_enable_cublaslt=true --xla_gpu_enable_cublast=true|"],
        capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("variant typo: XLA rejects its flags "
                                  "(--xla_gpu_enable_cublast=true)")
    assert not (tmp_path / "bench.sh.ran").exists()
