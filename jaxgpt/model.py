"""GPT-2 in flax.nnx: GPTConfig, gpt2_config(size), Attention, Mlp, Block, GPT, KVCache.

Dimension letters used in shapes and einsums throughout jaxgpt:
  B batch, T query positions, S key positions (cache slots), D n_embd, H heads,
  K head_dim, F mlp width (4·D), V vocab, L layers.

Parameter names and layout follow HuggingFace GPT-2 (`wte wpe h.N.ln_1 attn.c_attn ...`)
so `convert/hf.py` is a table; heads are their own axis (`c_attn` is [D, 3, H, K]).
Every weight records logical axis names; only `sharding.py` maps them to mesh axes.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

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
# which runs cuDNN's fused flash kernel on GPUs where it applies (XLA elsewhere).
ATTENTION_KERNELS = ("einsum", "dot_product")

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
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {'|'.join(DTYPES)}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {'|'.join(REMAT_POLICIES)}, "
                             f"got {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"model.attention must be one of {'|'.join(ATTENTION_KERNELS)}, "
                             f"got {self.attention!r}")
        if self.attention == "dot_product" and self.attn_pdrop:
            raise ValueError(f"model.attention='dot_product' has no attention dropout; "
                             f"model.attn_pdrop must be 0, got {self.attn_pdrop}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def proj_std(self) -> float:
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init.
        return 0.02 / math.sqrt(2 * self.n_layer)


def gpt2_config(size: str = "small", **overrides) -> GPTConfig:
    """A GPTConfig by size name (`tiny mini small medium large xl` or an HF name like `gpt2`)."""
    size = HF_NAMES.get(size, size)
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    n_layer, n_head, n_embd = SIZES[size]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)


def _init(std: float, *names: str | None):
    """normal(std) recording logical axis names; jit shards later (eager_sharding=False)."""
    return nnx.with_partitioning(nnx.initializers.normal(std), names, eager_sharding=False)


def _const(init, *names: str | None):
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.n_embd, epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype,
        use_fast_variance=False,  # E[(x-mean)^2], as PyTorch computes it
        scale_init=_const(nnx.initializers.ones, "embed"),
        bias_init=_const(nnx.initializers.zeros, "embed"), rngs=rngs)


@struct.dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding; a plain pytree, no mode flag.

    Slots are shared by all rows: a call with T tokens writes slots [index, index + T).
    `valid` marks slots that hold real tokens (False for padding), so left-padded prompts
    of different lengths decode together; each row's positions are passed separately.
    """

    k: jax.Array       # [L, B, S, H, K]
    v: jax.Array       # [L, B, S, H, K]
    valid: jax.Array   # [B, S] bool
    index: jax.Array   # int32 scalar: the next slot to write

    @classmethod
    def create(cls, cfg: GPTConfig, batch: int, length: int, dtype=None) -> "KVCache":
        if length > cfg.n_positions:
            raise ValueError(f"cache length {length} exceeds n_positions {cfg.n_positions}")
        shape = (cfg.n_layer, batch, length, cfg.n_head, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.k.shape[2]


class Dense(nnx.Module):
    """A weight of any shape plus a bias over its last `bias_rank` dims (HF's Conv1D split
    into head axes); the caller does the einsum."""

    def __init__(self, shape, names, std, *, bias_rank, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(std, *names)(rngs.params(), shape))
        self.bias = nnx.Param(_const(nnx.initializers.zeros, *names[-bias_rank:])(
            rngs.params(), shape[-bias_rank:]))


class Attention(nnx.Module):
    """Causal multi-head self-attention with GPT-2's fused qkv projection."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d, h, k = cfg.n_embd, cfg.n_head, cfg.head_dim
        self.cfg = cfg
        self.c_attn = Dense((d, 3, h, k), ("embed", None, "heads", "head_dim"), 0.02,
                            bias_rank=3, rngs=rngs)
        self.c_proj = Dense((h, k, d), ("heads", "head_dim", "embed"), cfg.proj_std,
                            bias_rank=1, rngs=rngs)
        self.attn_dropout = nnx.Dropout(cfg.attn_pdrop)
        self.resid_dropout = nnx.Dropout(cfg.resid_pdrop)

    def __call__(self, x, mask_BTS, kv=None, *, rngs=None):
        """x [B, T, D]; mask_BTS bool [B, T, S]; kv: (k, v, index) cache slices or None.

        Returns the output [B, T, D] and the updated (k, v) [B, S, H, K] (or None).
        """
        dtype = self.cfg.compute_dtype
        w, b = self.c_attn.kernel[...].astype(dtype), self.c_attn.bias[...].astype(dtype)
        qkv = jnp.einsum("BTD,DCHK->BTCHK", x, w) + b[None, None]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]     # [B, T, H, K]
        new_kv = None
        if kv is not None:
            cache_k, cache_v, index = kv
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
            new_kv = (k, v)
            k, v = k.astype(dtype), v.astype(dtype)
        if self.cfg.attention == "dot_product":
            out = _fused_attention(q, k, v, mask_BTS)
        else:
            out = self._einsum_attention(q, k, v, mask_BTS, rngs)
        w_o, b_o = self.c_proj.kernel[...].astype(dtype), self.c_proj.bias[...].astype(dtype)
        out = jnp.einsum("BTHK,HKD->BTD", out, w_o) + b_o[None, None]
        return self.resid_dropout(out, deterministic=rngs is None, rngs=rngs), new_kv

    def _einsum_attention(self, q, k, v, mask_BTS, rngs):  # -> [B, T, H, K]
        dtype = self.cfg.compute_dtype
        if mask_BTS is None:
            mask_BTS = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None]
        scores_BHTS = jnp.einsum("BTHK,BSHK->BHTS", q, k) / jnp.sqrt(q.shape[-1]).astype(dtype)
        # Softmax in float32; masked scores get the most negative float, not -inf, so a fully
        # masked (padding) query row stays finite.
        scores_BHTS = scores_BHTS.astype(jnp.float32)
        scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores_BHTS, axis=-1).astype(dtype)
        probs = self.attn_dropout(probs, deterministic=rngs is None, rngs=rngs)
        return jnp.einsum("BHTS,BSHK->BTHK", probs, v)


def _fused_attention(q, k, v, mask_BTS):
    """jax.nn.dot_product_attention on [B, T, H, K]; mask_BTS None means plain causal, which
    takes the kernel's is_causal path (the one cuDNN flash attention accelerates)."""
    if mask_BTS is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None])


class Mlp(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d, f = cfg.n_embd, 4 * cfg.n_embd
        self.c_fc = nnx.Linear(d, f, dtype=cfg.compute_dtype,
                               kernel_init=_init(0.02, "embed", "mlp"),
                               bias_init=_const(nnx.initializers.zeros, "mlp"), rngs=rngs)
        self.c_proj = nnx.Linear(f, d, dtype=cfg.compute_dtype,
                                 kernel_init=_init(cfg.proj_std, "mlp", "embed"),
                                 bias_init=_const(nnx.initializers.zeros, "embed"), rngs=rngs)
        self.dropout = nnx.Dropout(cfg.resid_pdrop)

    def __call__(self, x, *, rngs=None):  # [B, T, D] -> [B, T, D]
        h = jax.nn.gelu(self.c_fc(x), approximate=True)  # GPT-2's tanh GELU
        return self.dropout(self.c_proj(h), deterministic=rngs is None, rngs=rngs)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x, mask_BTS, kv=None, *, rngs=None):
        a, new_kv = self.attn(self.ln_1(x), mask_BTS, kv, rngs=rngs)
        x = x + a
        return x + self.mlp(self.ln_2(x), rngs=rngs), new_kv


def _run_blocks(blocks: nnx.List, x, mask_BTS, cfg: GPTConfig, rngs):
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
        return block(x, mask_BTS, rngs=None if key is None else nnx.Rngs(dropout=key))[0]

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
    """GPT-2 language model; the LM head is tied to `wte`."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.compute_dtype,
                             embedding_init=_init(0.02, "vocab", "embed"), rngs=rngs)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.compute_dtype,
                             embedding_init=_init(0.02, "positions", "embed"), rngs=rngs)
        self.drop = nnx.Dropout(cfg.embd_pdrop)
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)

    def __call__(self, tokens, *, positions=None, attention_mask=None, cache=None,
                 rngs=None, return_hidden=False):
        """tokens int [B, T] -> (logits float32 [B, T, V], cache or None).

        positions [B, T]: position ids (default: 0..T-1, after the cache's filled slots).
        attention_mask [B, T]: False marks padding tokens (never attended to).
        cache: a KVCache to read and extend; rngs: nnx.Rngs(dropout=key) to enable dropout.
        With return_hidden, also returns the residual stream after the embeddings and after
        every block (the last one after ln_f, as HF's `hidden_states`).
        """
        B, T = tokens.shape
        valid_BT = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        start = 0 if cache is None else cache.index
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
        x = self.wte(tokens) + self.wpe(positions)
        x = self.drop(x, deterministic=rngs is None, rngs=rngs)
        hidden = [x]
        new_k, new_v = [], []
        # Training-shaped calls (no cache, no per-layer outputs) may remat and/or scan.
        stacked = cache is None and not return_hidden and (self.cfg.scan_layers or
                                                            self.cfg.remat != "none")
        if stacked:
            x = _run_blocks(self.h, x, mask_BTS, self.cfg, rngs)
        for i, block in enumerate(() if stacked else self.h):
            kv = None if cache is None else (cache.k[i], cache.v[i], start)
            x, layer_kv = block(x, mask_BTS, kv, rngs=rngs)
            if cache is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
            hidden.append(x)
        x = self.ln_f(x)
        hidden[-1] = x
        logits = self.wte.attend(x).astype(jnp.float32)   # tied LM head; loss in float32
        if cache is not None:
            cache = KVCache(k=jnp.stack(new_k), v=jnp.stack(new_v), valid=valid_BS,
                            index=start + T)
        if return_hidden:
            return logits, cache, hidden
        return logits, cache


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
