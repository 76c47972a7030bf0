"""MFU: FLOPs per token against published parameter counts, peak FLOP/s lookup, display."""

import types

import jax
import pytest

from jaxgpt import mfu, model, report

# HF GPT2LMHeadModel parameter counts (tied head), as in test_model.py.
HF_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168}


@pytest.mark.parametrize("name", HF_PARAMS)
def test_flops_per_token_is_6n_plus_attention(name):
    cfg = model.gpt2_config(name)
    n = HF_PARAMS[name] - cfg.n_positions * cfg.n_embd      # wpe is a lookup, not a matmul
    attention = 12 * cfg.n_layer * cfg.n_embd * 1024        # 12·L·H·K·T with H·K = D
    assert mfu.flops_per_token(cfg, 1024) == 6 * n + attention


def test_flops_per_token_counts_every_option_in_closed_form():
    """Grouped-query attention, SwiGLU, no biases, RMSNorm, QK-norm, rotary (no wpe) and an
    untied head: N by hand from the shapes, with the untied head's [D, V] matmul in and the
    wte lookup out."""
    cfg = model.modern_config("small", tie_embeddings=False, vocab_size=50304)
    D, H, G, K, F, V = (cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_width,
                        cfg.vocab_size)
    per_layer = D * H * K + 2 * D * G * K + H * K * D + 3 * D * F + 2 * D + 2 * K
    n = cfg.n_layer * per_layer + D + D * V          # + ln_f + lm_head
    assert (G, cfg.rotary, cfg.bias, cfg.qk_norm) == (4, True, False, True)
    assert mfu.flops_per_token(cfg, 1024) == 6 * n + 12 * cfg.n_layer * H * K * 1024


def _device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_peak_flops_by_device_kind():
    assert mfu.peak_flops([_device("NVIDIA H100 80GB HBM3")] * 8) == 8 * 989e12
    assert mfu.peak_flops([_device("NVIDIA H100 PCIe")]) == 756e12
    assert mfu.peak_flops([_device("NVIDIA H200")]) == 989e12
    assert mfu.peak_flops([_device("NVIDIA A100-SXM4-80GB")]) == 312e12
    assert mfu.peak_flops([_device("TPU v4", "tpu")]) == 275e12
    assert mfu.peak_flops([_device("TPU v5 lite", "tpu")]) == 197e12
    assert mfu.peak_flops([_device("TPU v5", "tpu")]) == 459e12
    assert mfu.peak_flops([_device("Some Future GPU")]) is None
    cpu = mfu.peak_flops(jax.devices()[:2])             # measured, split over 8 devices
    assert 1e8 < cpu and mfu.peak_flops(jax.devices()) == pytest.approx(4 * cpu)


def test_progress_line_shows_mfu_when_known():
    record = {"step": 5, "total_steps": 10, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0,
              "tokens_per_s": 1000.0, "samples_per_s": 10.0, "epoch": 0.1, "eta_s": 5.0}
    assert "MFU 41.5%" in report.progress_line(record | {"mfu": 0.415})
    assert "MFU" not in report.progress_line(record | {"mfu": None})
