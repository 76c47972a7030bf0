"""Model FLOPs utilisation: FLOPs per token from the model's shape, peak FLOP/s per device.

MFU = tokens/s x FLOPs/token / (devices x peak FLOP/s per device), with FLOPs/token counted
as in PaLM (Chowdhery et al. 2022, appendix B): 6N for the matmuls of N weights (forward 2N,
backward 4N) plus 12·L·H·K·T for attention scores and their weighted sums.
"""

import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt import model

# Dense bf16 peak FLOP/s per device from the vendors' data sheets (no sparsity). Matched as
# substrings of `device.device_kind`, first match wins.
PEAK_FLOPS = (
    ("H200", 989e12),          # NVIDIA H200 SXM
    ("H100", 989e12),          # NVIDIA H100 SXM ("H100 PCIe" is 756e12: listed first below)
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),        # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12),   # v6e (Trillium)
)
_PCIE = {"H100 PCIe": 756e12}


def flops_per_token(cfg: model.GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·H·K·T (PaLM app. B).

    N counts every weight a matmul multiplies by: the blocks (biases and norms are negligible
    but counted) and the LM head, which is `wte` when tied and `lm_head` otherwise; not the
    embedding lookups (`wpe`, and `wte` under an untied head). Counted from the model's own
    parameter shapes, so every option (grouped-query attention, SwiGLU, no biases) is in.
    """
    shapes = nnx.to_pure_dict(model.abstract_params(cfg))
    lookups = [shapes["wpe"]["embedding"]] if "wpe" in shapes else []
    if not cfg.tie_embeddings:
        lookups.append(shapes["wte"]["embedding"])
    n = model.count_params(shapes) - model.count_params(lookups)
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return 6.0 * n + attention


@functools.cache
def _measured_cpu_flops(n: int = 1024, repeats: int = 10) -> float:
    """float32 matmul FLOP/s of this host's CPU, measured (there is no data sheet): the
    fastest of `repeats` timed matmuls, since a peak is what the busiest moment of a
    start-up (data threads, compiles) can only slow down."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops_per_device(device: jax.Device) -> float | None:
    """Peak FLOP/s of one device: the table for GPUs/TPUs; for CPU devices, the host's
    measured matmul rate split over its CPU devices; None for unknown accelerators."""
    kind = device.device_kind
    for name, flops in tuple(_PCIE.items()) + PEAK_FLOPS:
        if name in kind:
            return flops
    if device.platform == "cpu":
        return _measured_cpu_flops() / max(1, jax.local_device_count("cpu"))
    return None


def peak_flops(devices=None) -> float | None:
    """Summed peak FLOP/s of `devices` (default: every device of the job)."""
    devices = jax.devices() if devices is None else devices
    per = [peak_flops_per_device(d) for d in devices]
    return None if any(p is None for p in per) else float(sum(per))
