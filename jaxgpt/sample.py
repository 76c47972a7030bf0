"""Sampling: a jitted prefill over left-padded prompts, then a lax.scan decode with a KV cache.

Prompts of different lengths share one batch: each is left-padded to the batch's prompt
bucket, padding slots are masked out of attention, and every row keeps its own positions.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import model


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Temperature + top-k sampling; temperature 0 is greedy."""

    temperature: float = 1.0
    top_k: int = 0            # 0 = the whole vocabulary

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def __call__(self, logits_BV, key):
        if self.temperature == 0:
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        logits_BV = logits_BV / self.temperature
        if self.top_k:
            kth = jax.lax.top_k(logits_BV, self.top_k)[0][:, -1:]
            logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "max_new_tokens",
                                             "n_valid_vocab"))
def _generate(params, tokens_BT, mask_BT, key, *, graphdef, method, max_new_tokens,
              n_valid_vocab):
    gpt = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    cache = model.KVCache.create(gpt.cfg, B, T + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    logits, cache = gpt(tokens_BT, positions=positions, attention_mask=mask_BT, cache=cache)
    vocab_ok = jnp.arange(logits.shape[-1]) < n_valid_vocab   # padded rows are never sampled

    def step(carry, key_t):
        logits_BV, cache, pos_B = carry
        logits_BV = jnp.where(vocab_ok[None], logits_BV, -jnp.inf)
        token_B = method(logits_BV, key_t)
        logits, cache = gpt(token_B[:, None], positions=pos_B[:, None], cache=cache)
        return (logits[:, -1], cache, pos_B + 1), token_B

    keys = jax.random.split(key, max_new_tokens)
    _, out = jax.lax.scan(step, (logits[:, -1], cache, positions[:, -1] + 1), keys)
    return out.T   # [B, max_new_tokens]


@functools.lru_cache(maxsize=8)
def graphdef_of(cfg: model.GPTConfig) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))))


def generate(cfg: model.GPTConfig, params, prompts: list[list[int]], *, max_new_tokens: int,
             method: Sampling, seed: int = 0, eot_id: int | None = None,
             n_valid_vocab: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (cut at the first `eot_id`, if given)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (use the end-of-text id)")
    T = _bucket(max(len(p) for p in prompts))
    if T + max_new_tokens > cfg.n_positions:
        T = max(len(p) for p in prompts)
    if T + max_new_tokens > cfg.n_positions:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the "
                         f"context n_positions={cfg.n_positions}")
    tokens = np.zeros((len(prompts), T), np.int32)
    mask = np.zeros((len(prompts), T), bool)
    for i, p in enumerate(prompts):
        if max(p) >= cfg.vocab_size or min(p) < 0:
            raise ValueError(f"prompt {i} has token id outside [0, {cfg.vocab_size})")
        tokens[i, T - len(p):] = p
        mask[i, T - len(p):] = True
    out = _generate(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
                    graphdef=graphdef_of(cfg), method=method, max_new_tokens=max_new_tokens,
                    n_valid_vocab=n_valid_vocab or cfg.vocab_size)
    rows = np.asarray(out).tolist()
    if eot_id is not None:
        rows = [r[:r.index(eot_id)] if eot_id in r else r for r in rows]
    return rows
