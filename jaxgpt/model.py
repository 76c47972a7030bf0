"""GPT-2 in flax.nnx: GPTConfig, gpt2_config(size), Attention, Mlp, Block, GPT, KVCache.

Dimension letters used in shapes and einsums throughout jaxgpt:
  B batch, T query positions, S key positions (cache slots), D n_embd, H heads,
  G key/value heads (= H unless grouped-query attention), R = H / G query heads per group,
  K head_dim, F mlp width (4·D, or the SwiGLU width), V vocab, L layers.

Newer components (rotary positions, RMSNorm, SwiGLU, no biases, untied head, grouped-query
attention, QK-norm, parallel block) are GPTConfig switches whose defaults are GPT-2's;
`modern_config(size)` combines them at GPT-2's parameter budget.

Parameter names and layout follow HuggingFace GPT-2 (`wte wpe h.N.ln_1 attn.c_attn ...`)
so `convert/hf.py` is a table; heads are their own axis (`c_attn` is [D, 3, H, K]).
Every weight records logical axis names; only `sharding.py` maps them to mesh axes.
"""

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxgpt import choices, ops, sharding

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Activation rematerialisation per block: what the backward pass may keep instead of
# recomputing. "none" stores everything; "full" recomputes the whole block.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# "einsum": explicit scores and float32 softmax. "dot_product": jax.nn.dot_product_attention,
# asked for cuDNN's fused flash kernel on a GPU and, where cuDNN refuses the call (float32,
# an unsupported head size, a GPU before Ampere), XLA's attention with a warning; XLA's off
# GPUs. (JAX's own default is XLA's attention everywhere, whose backward runs two float32
# matmuls.)
# "cudnn": cuDNN or an error with cuDNN's reason on a GPU (elsewhere, e.g. evaluating the
# checkpoint on a CPU, it is "dot_product").
ATTENTION_KERNELS = ("einsum", "dot_product", "cudnn")
_CUDNN_REFUSED: list[str] = []    # why cuDNN refused "dot_product" calls (warned once)

# name -> (n_layer, n_head, n_embd). The four GPT-2 sizes are OpenAI's; the small ones are
# for tests and CPU runs.
SIZES = {
    "tiny": (2, 4, 64),
    "mini": (4, 4, 128),
    "small": (12, 12, 768),     # gpt2, 124M
    "medium": (24, 16, 1024),   # gpt2-medium, 355M
    "large": (36, 20, 1280),    # gpt2-large, 774M
    "xl": (48, 25, 1600),       # gpt2-xl, 1.56B
}
HF_NAMES = {"gpt2": "small", "gpt2-medium": "medium", "gpt2-large": "large", "gpt2-xl": "xl"}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyper-parameters; the defaults are GPT-2 small (124M) exactly."""

    vocab_size: int = 50257           # rows of wte (may be padded above the tokenizer's)
    n_positions: int = 1024           # rows of wpe: the longest context
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.0           # dropout on token + position embeddings
    attn_pdrop: float = 0.0           # dropout on attention probabilities
    resid_pdrop: float = 0.0          # dropout on each residual branch
    dtype: str = "float32"            # compute dtype (float32 | bfloat16); params stay fp32
    remat: str = "none"               # a key of REMAT_POLICIES, applied to every block
    scan_layers: bool = False         # run the blocks as one lax.scan (faster compiles)
    attention: str = "einsum"         # one of ATTENTION_KERNELS
    # Newer components, each independent; the defaults are GPT-2 (HF import/export exact).
    rotary: bool = False              # rotary position embeddings on q and k; no wpe param
    rope_theta: float = 10000.0       # RoPE base: pair i of a head turns at theta^(-2i/K)
    rms_norm: bool = False            # RMSNorm (no centring, no bias) instead of LayerNorm
    swiglu: bool = False              # SwiGLU MLP (silu(x W_gate) * x W_fc) instead of GELU
    # SwiGLU width F = ffn_multiple_of * ceil(int(ffn_dim_multiplier * int(8D/3)) / multiple),
    # LLaMA's rule: 2/3 of 4D keeps the three matrices at the GELU MLP's parameter count.
    ffn_dim_multiplier: float = 1.0
    ffn_multiple_of: int = 256
    bias: bool = True                 # biases in linear layers and LayerNorms
    tie_embeddings: bool = True       # LM head = wte^T; False adds an lm_head [D, V] param
    # 0 = GPT-2's fused qkv projection (c_attn); > 0 = grouped-query attention with separate
    # c_q and c_kv projections and n_kv_head key/value heads (a divisor of n_head).
    n_kv_head: int = 0
    qk_norm: bool = False             # RMSNorm over head_dim on q and k (before RoPE)
    parallel_block: bool = False      # x + attn(ln_1(x)) + mlp(ln_1(x)) (GPT-J, PaLM); no ln_2

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        choices.check("model.dtype", self.dtype, DTYPES)
        choices.check("model.remat", self.remat, REMAT_POLICIES)
        choices.check("model.attention", self.attention, ATTENTION_KERNELS)
        if self.attention != "einsum" and self.attn_pdrop:
            raise ValueError(f"model.attention={self.attention!r} has no attention dropout; "
                             f"model.attn_pdrop must be 0, got {self.attn_pdrop}")
        self._check_options()

    def _check_options(self):
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"model.{name} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if self.rotary and self.head_dim % 2:
            raise ValueError(f"model.rotary needs an even head_dim, got {self.head_dim} "
                             f"(n_embd {self.n_embd} / n_head {self.n_head})")
        if self.ffn_dim_multiplier <= 0:
            raise ValueError(f"model.ffn_dim_multiplier must be > 0, "
                             f"got {self.ffn_dim_multiplier}")
        if self.ffn_multiple_of < 1:
            raise ValueError(f"model.ffn_multiple_of must be >= 1, got {self.ffn_multiple_of}")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ValueError(f"model.n_kv_head ({self.n_kv_head}) must be 0 or divide "
                             f"model.n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """G: key/value heads (n_head unless grouped-query attention)."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        """F: 4D for GPT-2's MLP; LLaMA's rounded 2/3 of that for SwiGLU."""
        if not self.swiglu:
            return 4 * self.n_embd
        width = int(self.ffn_dim_multiplier * int(8 * self.n_embd / 3))
        return self.ffn_multiple_of * math.ceil(width / self.ffn_multiple_of)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def proj_std(self) -> float:
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init.
        return 0.02 / math.sqrt(2 * self.n_layer)


# Options without a GPT-2 (HF) equivalent, with their GPT-2 values.
_SWITCHES = ("rotary", "rms_norm", "swiglu", "bias", "tie_embeddings", "qk_norm",
             "parallel_block")


def non_gpt2_options(cfg: GPTConfig) -> list[str]:
    """`name=value` for every option that HF GPT-2 cannot express (empty for GPT-2)."""
    gpt2 = GPTConfig()
    return [f"{name}={getattr(cfg, name)}" for name in _SWITCHES + ("n_kv_head",)
            if getattr(cfg, name) != getattr(gpt2, name)]


def gpt2_config(size: str = "small", **overrides) -> GPTConfig:
    """A GPTConfig by size name (`tiny mini small medium large xl` or an HF name like `gpt2`)."""
    size = HF_NAMES.get(size, size)
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    n_layer, n_head, n_embd = SIZES[size]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)


# Key/value heads of the modern presets: a third to a quarter of the query heads, as
# LLaMA-2 70B / Mistral group them (a divisor of n_head).
MODERN_KV_HEADS = {"tiny": 2, "mini": 2, "small": 4, "medium": 4, "large": 5, "xl": 5}


def modern_config(size: str = "small", **overrides) -> GPTConfig:
    """GPT-2's sizes with the newer components, at GPT-2's parameter budget.

    Rotary positions, RMSNorm, SwiGLU, no biases, grouped-query attention and QK-norm; the
    embedding stays tied (an untied head would cost 30% of the 124M budget). Grouped-query
    attention saves 2D^2(1 - G/H) per layer; the SwiGLU width spends it again, so the
    per-layer count matches GPT-2's 12D^2 (`small` is "modern-124M").
    """
    if size not in MODERN_KV_HEADS:
        raise ValueError(f"unknown model size {size!r}; choose one of "
                         f"{', '.join(MODERN_KV_HEADS)}")
    n_layer, n_head, n_embd = SIZES[size]
    kv_heads = MODERN_KV_HEADS[size]
    # Per layer: attention (2 + 2G/H)D^2, SwiGLU 3DF; 12D^2 in all gives F = (10 - 2G/H)D/3.
    multiplier = (10 - 2 * kv_heads / n_head) / 8
    options = {"rotary": True, "rms_norm": True, "swiglu": True,
               "ffn_dim_multiplier": round(multiplier, 4), "ffn_multiple_of": 64,
               "bias": False, "n_kv_head": kv_heads, "qk_norm": True}
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **(options | overrides))


def _init(std: float, *names: str | None):
    """normal(std) recording logical axis names; jit shards later (eager_sharding=False)."""
    return nnx.with_partitioning(nnx.initializers.normal(std), names, eager_sharding=False)


def _const(init, *names: str | None):
    return nnx.with_partitioning(init, names, eager_sharding=False)


class LayerNorm(nnx.LayerNorm):
    """flax's LayerNorm (same parameters, same arithmetic) through `layer_norm`."""

    def __call__(self, x, *, mask=None):
        if (mask is not None or not self.use_scale or self.reduction_axes != -1
                or self.feature_axes != -1):
            return super().__call__(x, mask=mask)
        dtype = self.dtype or x.dtype
        bias = self.bias[...].astype(dtype) if self.bias else None
        return ops.layer_norm(x.astype(dtype), self.scale[...].astype(dtype), bias, self.epsilon)


def _norm(cfg: GPTConfig, rngs: nnx.Rngs, features: int | None = None,
          name: str = "embed") -> nnx.LayerNorm | nnx.RMSNorm:
    """The block's normalization over the last axis: GPT-2's LayerNorm or RMSNorm."""
    features = features or cfg.n_embd
    scale_init = _const(nnx.initializers.ones, name)
    if cfg.rms_norm:
        # x / sqrt(mean(x^2) + eps) * scale; flax computes the statistics in float32.
        return nnx.RMSNorm(features, epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype,
                           use_fast_variance=False, scale_init=scale_init, rngs=rngs)
    return LayerNorm(
        features, epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype,
        use_fast_variance=False,  # E[(x-mean)^2], as PyTorch computes it
        use_bias=cfg.bias, scale_init=scale_init,
        bias_init=_const(nnx.initializers.zeros, name), rngs=rngs)


def rope_tables(positions_BT, head_dim: int, theta: float):
    """cos, sin [B, T, K/2] of the rotary angles positions * theta^(-2i/K) (float32)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTHK, cos_sin):
    """Rotate pairs (x_i, x_{i+K/2}) of every head by its position's angles (GPT-NeoX/LLaMA
    half-split layout), so q·k depends on positions only through their difference."""
    cos, sin = (c[:, :, None].astype(x_BTHK.dtype) for c in cos_sin)   # [B, T, 1, K/2]
    x1, x2 = jnp.split(x_BTHK, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@struct.dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding; a plain pytree, no mode flag.

    Slots are shared by all rows: a call with T tokens writes slots [index, index + T).
    `valid` marks slots that hold real tokens (False for padding), so left-padded prompts
    of different lengths decode together; each row's positions are passed separately.
    Keys are stored after RoPE, so cached slots never need re-rotating.
    """

    # One [B, G, S, K] buffer per layer, heads before slots: a decode step writes each
    # layer's new slots in place and attention reads them with no slice or transpose copy
    # (a stacked [L, ...] array would be copied per layer to take its slice).
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array   # [B, S] bool
    index: jax.Array   # int32 scalar: the next slot to write

    @classmethod
    def create(cls, cfg: GPTConfig, batch: int, length: int, dtype=None) -> "KVCache":
        if length > cfg.n_positions:
            raise ValueError(f"cache length {length} exceeds n_positions {cfg.n_positions}")
        shape = (batch, cfg.kv_heads, length, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        layers = range(cfg.n_layer)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.k[0].shape[2]


class Dense(nnx.Module):
    """A weight of any shape plus (with bias=True) a bias over its last `bias_rank` dims (HF's
    Conv1D split into head axes); `project` does the caller's einsum."""

    def __init__(self, shape, names, std, *, bias_rank, bias: bool, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(std, *names)(rngs.params(), shape))
        if bias:
            self.bias = nnx.Param(_const(nnx.initializers.zeros, *names[-bias_rank:])(
                rngs.params(), shape[-bias_rank:]))
        self.use_bias = bias

    def project(self, spec: str, x, dtype):
        out = jnp.einsum(spec, x, self.kernel[...].astype(dtype))
        if not self.use_bias:
            return out
        b = self.bias[...].astype(dtype)
        return out + b.reshape((1,) * (out.ndim - b.ndim) + b.shape)


def _attend(q_BTHK, k, v, mask_BTS, dropout, rngs, *, kv_layout: str = "BSGK"):
    """Softmax attention where each of the G key/value heads serves R = H/G query heads
    (R = 1 is plain multi-head attention); mask_BTS None = plain causal. Returns [B, T, H, K].

    k, v are [B, S, G, K] (kv_layout "BSGK", as projected) or [B, G, S, K] ("BGSK", the
    cache's layout, which both einsums read without a transpose)."""
    B, T, H, K = q_BTHK.shape
    G, S = k.shape[kv_layout.index("G")], k.shape[kv_layout.index("S")]
    dtype = q_BTHK.dtype
    if mask_BTS is None:
        mask_BTS = jnp.tril(jnp.ones((T, S), bool))[None]
    q = q_BTHK.reshape(B, T, G, H // G, K)   # query head h uses key/value head h // R
    scores = jnp.einsum(f"BTGRK,{kv_layout}->BGRTS", q, k) / jnp.sqrt(K).astype(dtype)
    # Softmax in float32; masked scores get the most negative float, not -inf, so a fully
    # masked (padding) query row stays finite.
    scores = scores.astype(jnp.float32)
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = ops.softmax(scores).astype(dtype)
    probs = dropout(probs, deterministic=rngs is None, rngs=rngs)
    return jnp.einsum(f"BGRTS,{kv_layout}->BTGRK", probs, v).reshape(B, T, H, K)


class Attention(nnx.Module):
    """Causal self-attention: GPT-2's fused qkv projection, or grouped-query attention."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d, h, g, k = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.cfg = cfg
        if cfg.n_kv_head:
            self.c_q = Dense((d, h, k), ("embed", "heads", "head_dim"), 0.02, bias_rank=2,
                             bias=cfg.bias, rngs=rngs)
            self.c_kv = Dense((d, 2, g, k), ("embed", None, "kv_heads", "head_dim"), 0.02,
                              bias_rank=3, bias=cfg.bias, rngs=rngs)
        else:
            self.c_attn = Dense((d, 3, h, k), ("embed", None, "heads", "head_dim"), 0.02,
                                bias_rank=3, bias=cfg.bias, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = _norm(dataclasses.replace(cfg, rms_norm=True), rngs, k, "head_dim")
            self.k_norm = _norm(dataclasses.replace(cfg, rms_norm=True), rngs, k, "head_dim")
        self.c_proj = Dense((h, k, d), ("heads", "head_dim", "embed"), cfg.proj_std,
                            bias_rank=1, bias=cfg.bias, rngs=rngs)
        self.attn_dropout = nnx.Dropout(cfg.attn_pdrop)
        self.resid_dropout = nnx.Dropout(cfg.resid_pdrop)

    def _qkv(self, x):
        """x [B, T, D] -> q [B, T, H, K], k and v [B, T, G, K]."""
        dtype = self.cfg.compute_dtype
        if self.cfg.n_kv_head:
            kv = self.c_kv.project("BTD,DCGK->BTCGK", x, dtype)
            return self.c_q.project("BTD,DHK->BTHK", x, dtype), kv[:, :, 0], kv[:, :, 1]
        # Three matmuls on slices of the fused weight rather than one whose [B, T, 3, H, K]
        # output is sliced: the slicing, and the gradient's assembly, would be passes over
        # the activations (~3% of a gpt2-124M step on a GPU).
        w = self.c_attn.kernel[...].astype(dtype)                           # [D, 3, H, K]
        b = self.c_attn.bias[...].astype(dtype) if self.c_attn.use_bias else None
        return tuple(jnp.einsum("BTD,DHK->BTHK", x, w[:, i])
                     + (0 if b is None else b[i][None, None]) for i in range(3))

    def __call__(self, x, mask_BTS, kv=None, *, rope=None, rngs=None):
        """x [B, T, D]; mask_BTS bool [B, T, S]; kv: (k, v, index) with this layer's cache
        k, v [B, G, S, K], or None; rope: rope_tables(...) of the tokens' positions when
        cfg.rotary.

        Returns the output [B, T, D] and the updated (k, v) (or None). Only the T new slots
        are written, in place, so a decode step never copies the cache.
        """
        dtype = self.cfg.compute_dtype
        q, k, v = self._qkv(x)
        q = sharding.constrain(q, ("batch", None, "heads", None))
        k, v = (sharding.constrain(t, ("batch", None, "kv_heads", None)) for t in (k, v))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.rotary:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        new_kv, kv_layout = None, "BSGK"
        if kv is not None:
            cache_k, cache_v, index = kv

            def write(cache, x_BTGK):
                x = x_BTGK.transpose(0, 2, 1, 3).astype(cache.dtype)   # [B, G, T, K]
                return jax.lax.dynamic_update_slice(cache, x, (0, 0, index, 0))
            cache_k, cache_v = write(cache_k, k), write(cache_v, v)
            new_kv, kv_layout = (cache_k, cache_v), "BGSK"
            k, v = cache_k.astype(dtype), cache_v.astype(dtype)
        if self.cfg.attention != "einsum":
            if kv_layout == "BGSK":   # the kernel takes [B, S, G, K]
                k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            out = _fused_attention(q, k, v, mask_BTS, self.cfg.attention == "cudnn")
        else:
            out = _attend(q, k, v, mask_BTS, self.attn_dropout, rngs, kv_layout=kv_layout)
        out = sharding.constrain(out, ("batch", None, "heads", None))
        out = self.c_proj.project("BTHK,HKD->BTD", out, dtype)
        return self.resid_dropout(out, deterministic=rngs is None, rngs=rngs), new_kv


def gpu_capability() -> float:
    """The first device's CUDA compute capability (9.0 for an H100), 0 when it has none."""
    try:
        return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)
    except ValueError:
        return 0.0


def _fused_attention(q, k, v, mask_BTS, cudnn: bool = False):
    """jax.nn.dot_product_attention on q [B, T, H, K], k/v [B, S, G, K] (it groups query heads
    over G key/value heads itself); mask_BTS None means plain causal, which takes the
    kernel's is_causal path, the one cuDNN flash attention accelerates: on a GPU cuDNN's,
    or (not `cudnn`) XLA's where cuDNN refuses. Masked calls (sampling) take XLA's."""
    if mask_BTS is None:
        if jax.default_backend() == "gpu":
            try:
                capability = gpu_capability()
                if not cudnn and capability < 8.0:
                    # jax leaves this check to cuDNN, which fails only when XLA compiles
                    raise NotImplementedError(f"cuDNN flash attention needs compute "
                                              f"capability 8.0 (Ampere), not {capability}")
                return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                    implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError) as e:
                if cudnn:
                    raise
                if not _CUDNN_REFUSED:
                    log.warning("attention: cuDNN refused q %s %s (%s); using XLA's",
                                q.shape, q.dtype, e)
                _CUDNN_REFUSED.append(str(e))
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None])


class Mlp(nnx.Module):
    """GPT-2's GELU MLP, or SwiGLU: c_proj(silu(c_gate(x)) * c_fc(x)) (Shazeer 2020)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d, f = cfg.n_embd, cfg.mlp_width
        self.swiglu = cfg.swiglu

        def linear(n_in, n_out, std, names):
            return nnx.Linear(n_in, n_out, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                              kernel_init=_init(std, *names),
                              bias_init=_const(nnx.initializers.zeros, names[-1]), rngs=rngs)

        self.c_fc = linear(d, f, 0.02, ("embed", "mlp"))
        if cfg.swiglu:
            self.c_gate = linear(d, f, 0.02, ("embed", "mlp"))
        self.c_proj = linear(f, d, cfg.proj_std, ("mlp", "embed"))
        self.dropout = nnx.Dropout(cfg.resid_pdrop)

    def __call__(self, x, *, rngs=None):  # [B, T, D] -> [B, T, D]
        if self.swiglu:
            h = jax.nn.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = jax.nn.gelu(self.c_fc(x), approximate=True)  # GPT-2's tanh GELU
        h = sharding.constrain(h, ("batch", None, "mlp"))
        return self.dropout(self.c_proj(h), deterministic=rngs is None, rngs=rngs)


_RESIDUAL = ("batch", None, None)   # the residual stream [B, T, D]: rows over the batch axes


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); with
    cfg.parallel_block both branches read ln_1(x) of the same x."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.parallel = cfg.parallel_block
        self.ln_1 = _norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        if not cfg.parallel_block:
            self.ln_2 = _norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x, mask_BTS, kv=None, *, rope=None, rngs=None):
        x = sharding.constrain(x, _RESIDUAL)
        h = self.ln_1(x)
        a, new_kv = self.attn(h, mask_BTS, kv, rope=rope, rngs=rngs)
        if self.parallel:
            return sharding.constrain(x + a + self.mlp(h, rngs=rngs), _RESIDUAL), new_kv
        x = sharding.constrain(x + a, _RESIDUAL)
        return sharding.constrain(x + self.mlp(self.ln_2(x), rngs=rngs), _RESIDUAL), new_kv


def _run_blocks(blocks: nnx.List, x, mask_BTS, cfg: GPTConfig, rngs, rope=None):
    """x [B, T, D] through every block, with cfg.remat's policy on each block and, with
    cfg.scan_layers, one lax.scan over the blocks' weights stacked to [L, ...] on the fly.

    Stacking inside the step (rather than storing stacked weights) keeps the parameter tree
    `h.N.*`, so checkpoints, HF conversion and the sharding rules are the same either way;
    the price is one transient copy of the block weights per step.
    """
    splits = [nnx.split(block) for block in blocks]   # the blocks share one graphdef
    graphdef, states = splits[0][0], [state for _, state in splits]
    # Dropout keys are drawn only when some dropout is on: drawing mutates `rngs`, which is
    # an error when the caller built it outside the trace we run in (value_and_grad).
    dropout = cfg.embd_pdrop or cfg.attn_pdrop or cfg.resid_pdrop
    keys = None if rngs is None or not dropout else jax.random.split(rngs.dropout(),
                                                                     len(states))
    policy = REMAT_POLICIES[cfg.remat]

    def block_fn(state, x, key):
        block = nnx.merge(graphdef, state)
        return block(x, mask_BTS, rope=rope,
                     rngs=None if key is None else nnx.Rngs(dropout=key))[0]

    if policy is not None:
        block_fn = jax.checkpoint(block_fn, policy=policy)
    if not cfg.scan_layers:
        for i, state in enumerate(states):
            x = block_fn(state, x, None if keys is None else keys[i])
        return x
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    x, _ = jax.lax.scan(lambda x, xs: (block_fn(xs[0], x, xs[1]), None), x, (stacked, keys))
    return x


class GPT(nnx.Module):
    """GPT-2 language model; the LM head is tied to `wte` unless cfg.tie_embeddings is off."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.compute_dtype,
                             embedding_init=_init(0.02, "vocab", "embed"), rngs=rngs)
        if not cfg.rotary:
            self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.compute_dtype,
                                 embedding_init=_init(0.02, "positions", "embed"), rngs=rngs)
        self.drop = nnx.Dropout(cfg.embd_pdrop)
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(_init(0.02, "embed", "vocab")(
                rngs.params(), (cfg.n_embd, cfg.vocab_size)))

    def _logits(self, x):
        """Final hidden [B, T, D] -> logits float32 [B, T, V] (the loss is in float32)."""
        if self.cfg.tie_embeddings:
            w = self.wte.embedding[...].astype(self.cfg.compute_dtype)
            return ops.tied_head(x, w).astype(jnp.float32)
        w = self.lm_head[...].astype(self.cfg.compute_dtype)
        return jnp.einsum("BTD,DV->BTV", x, w).astype(jnp.float32)

    def __call__(self, tokens, *, positions=None, attention_mask=None, cache=None,
                 rngs=None, return_hidden=False, head=True):
        """tokens int [B, T] -> (logits float32 [B, T, V], cache or None).

        positions [B, T]: position ids (default: 0..T-1, after the cache's filled slots).
        attention_mask [B, T]: False marks padding tokens (never attended to).
        cache: a KVCache to read and extend; rngs: nnx.Rngs(dropout=key) to enable dropout.
        With return_hidden, also returns the residual stream after the embeddings and after
        every block (the last one after ln_f, as HF's `hidden_states`). With head=False the
        first output is the final hidden state [B, T, D] (after ln_f), not the logits, for a
        loss that applies the head itself (ops.tied_head_loss).
        """
        cfg = self.cfg
        B, T = tokens.shape
        valid_BT = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        start = 0 if cache is None else cache.index
        if cache is not None and not isinstance(start, jax.core.Tracer) and (
                int(start) + T > cache.length):   # the write would clamp over the last slots
            raise ValueError(f"the KV cache has {cache.length} slots, {int(start)} filled: "
                             f"{T} more tokens do not fit")
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(T), (B, T))
        if cache is None and attention_mask is None:
            mask_BTS = None   # plain causal: the attention kernels build or fuse it
        elif cache is None:
            causal = jnp.tril(jnp.ones((T, T), bool))
            mask_BTS = causal[None] & valid_BT[:, None, :]
        else:
            valid_BS = jax.lax.dynamic_update_slice(cache.valid, valid_BT, (0, start))
            slots_S = jnp.arange(cache.length)
            causal = slots_S[None, :] <= (start + jnp.arange(T))[:, None]   # [T, S]
            mask_BTS = causal[None] & valid_BS[:, None, :]
        x = self.wte(tokens)
        rope = None
        if cfg.rotary:
            rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        else:
            x = x + self.wpe(positions)
        x = self.drop(x, deterministic=rngs is None, rngs=rngs)
        hidden = [x]
        new_k, new_v = [], []
        # Training-shaped calls (no cache, no per-layer outputs) may remat and/or scan.
        stacked = cache is None and not return_hidden and (self.cfg.scan_layers or
                                                            self.cfg.remat != "none")
        if stacked:
            x = _run_blocks(self.h, x, mask_BTS, self.cfg, rngs, rope)
        for i, block in enumerate(() if stacked else self.h):
            kv = None if cache is None else (cache.k[i], cache.v[i], start)
            x, layer_kv = block(x, mask_BTS, kv, rope=rope, rngs=rngs)
            if cache is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
            hidden.append(x)
        x = self.ln_f(x)
        hidden[-1] = x
        logits = self._logits(x) if head else x
        if cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid_BS, index=start + T)
        if return_hidden:
            return logits, cache, hidden
        return logits, cache


def abstract_params(cfg: GPTConfig) -> nnx.State:
    """The nnx.State of `nnx.split(GPT(cfg), nnx.Param)`, as shapes and dtypes only."""
    return nnx.state(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
