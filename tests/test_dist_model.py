"""Model speed options change no numbers: fused attention, remat policies, scanned layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import model
from tests.helpers import assert_trees_close


def _loss_and_grads(cfg, tokens, attention_mask=None):
    graphdef, params = nnx.split(model.GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens, attention_mask=attention_mask)
        return jnp.mean(logits ** 2), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


TINY = model.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 16), dtype=np.int32)


@pytest.fixture(scope="module")
def baseline():
    return _loss_and_grads(TINY, TOKENS)


@pytest.mark.parametrize("options", [dict(attention="dot_product"), dict(remat="full"),
                                     dict(scan_layers=True, remat="dots_saveable",
                                          attention="dot_product")], ids=str)
def test_options_give_the_same_logits_and_grads(baseline, options):
    want = baseline
    got = _loss_and_grads(dataclasses.replace(TINY, **options), TOKENS)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert_trees_close(got[2], want[2], rtol=1e-4, atol=1e-6)


def test_fused_attention_with_padding_and_cache_equals_einsum(tiny_cfg, key):
    fused = dataclasses.replace(tiny_cfg, attention="dot_product")
    tokens = jax.random.randint(key, (2, 12), 0, tiny_cfg.vocab_size)
    mask = jnp.arange(12)[None, :] >= jnp.array([[0], [5]])       # row 1 left-padded
    want, got = (_loss_and_grads(c, tokens, mask)[1] for c in (tiny_cfg, fused))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    outs = []
    for cfg in (tiny_cfg, fused):
        gpt = model.GPT(cfg, rngs=nnx.Rngs(0))
        cache = model.KVCache.create(cfg, 2, 16)
        _, cache = gpt(tokens[:, :8], cache=cache)
        logits, _ = gpt(tokens[:, 8:9], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value", [("remat", "some"), ("attention", "flash")])
def test_bad_options_are_named(tiny_cfg, field, value):
    with pytest.raises(ValueError, match=f"model.{field} must be one of .*{value!r}"):
        dataclasses.replace(tiny_cfg, **{field: value})
    with pytest.raises(ValueError, match="attn_pdrop must be 0"):
        dataclasses.replace(tiny_cfg, attention="dot_product", attn_pdrop=0.1)
