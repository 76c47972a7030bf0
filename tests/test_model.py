"""GPT-2 model: sizes, causality, dropout, KV cache, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import model, ops

# Parameter counts of HF's GPT2LMHeadModel with the LM head tied to wte (published figures:
# `sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(name).parameters())`).
HF_PARAM_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168,
                   "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def _params(cfg, seed=0):
    return nnx.split(model.GPT(cfg, rngs=nnx.Rngs(seed)), nnx.Param)


@pytest.mark.parametrize("name", HF_PARAM_COUNTS)
def test_parameter_counts_equal_hf(name):
    cfg = model.gpt2_config(name)
    abstract = nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0)))
    assert model.count_params(nnx.state(abstract, nnx.Param)) == HF_PARAM_COUNTS[name]


def test_every_weight_has_logical_axis_names(tiny_cfg):
    gpt = model.GPT(tiny_cfg, rngs=nnx.Rngs(0))
    leaves = jax.tree_util.tree_leaves_with_path(
        nnx.state(gpt, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, \
            jax.tree_util.keystr(path)


def test_gpt2_init_scales(tiny_cfg):
    cfg = model.GPTConfig(vocab_size=97, n_positions=32, n_embd=256, n_layer=8, n_head=4)
    _, params = _params(cfg)
    fc = np.asarray(params["h"][0]["mlp"]["c_fc"]["kernel"].get_value())
    proj = np.asarray(params["h"][0]["mlp"]["c_proj"]["kernel"].get_value())
    np.testing.assert_allclose(fc.std(), 0.02, rtol=0.05)
    np.testing.assert_allclose(proj.std(), 0.02 / np.sqrt(2 * 8), rtol=0.05)
    assert float(jnp.abs(params["h"][0]["attn"]["c_attn"]["bias"].get_value()).max()) == 0


def test_future_tokens_never_change_earlier_logits(tiny_cfg, key):
    gpt = model.GPT(tiny_cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(key, (2, 16), 0, tiny_cfg.vocab_size)
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % tiny_cfg.vocab_size)
    a, _ = gpt(tokens)
    b, _ = gpt(changed)
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-3


def test_dropout_off_is_deterministic_and_on_is_not(key):
    cfg = model.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                          embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    gpt = model.GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(key, (2, 16), 0, 97)
    np.testing.assert_array_equal(gpt(tokens)[0], gpt(tokens)[0])
    d1 = gpt(tokens, rngs=nnx.Rngs(dropout=1))[0]
    d1_again = gpt(tokens, rngs=nnx.Rngs(dropout=1))[0]
    d2 = gpt(tokens, rngs=nnx.Rngs(dropout=2))[0]
    np.testing.assert_array_equal(d1, d1_again)
    assert np.abs(np.asarray(d1 - d2)).max() > 1e-4


def test_cached_decode_equals_full_forward(tiny_cfg, key):
    gpt = model.GPT(tiny_cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(key, (3, 16), 0, tiny_cfg.vocab_size)
    full, _ = gpt(tokens)
    cache = model.KVCache.create(tiny_cfg, 3, 20)
    parts = []
    for lo, hi in [(0, 7), (7, 8), (8, 9), (9, 16)]:
        logits, cache = gpt(tokens[:, lo:hi], cache=cache)
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=1e-5)
    assert int(cache.index) == 16


def test_padding_is_masked_out(tiny_cfg, key):
    """Left padding with a mask and shifted positions gives the unpadded logits."""
    gpt = model.GPT(tiny_cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(key, (1, 10), 0, tiny_cfg.vocab_size)
    ref, _ = gpt(tokens)
    padded = jnp.concatenate([jnp.full((1, 6), 5), tokens], axis=1)
    mask = jnp.arange(16)[None] >= 6
    pos = jnp.maximum(jnp.arange(16) - 6, 0)[None]
    out, _ = gpt(padded, positions=pos, attention_mask=mask)
    np.testing.assert_allclose(out[:, 6:], ref, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits(key):
    cfg = model.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                          dtype="bfloat16")
    gpt = model.GPT(cfg, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(gpt, nnx.Param)))
    logits, _ = gpt(jax.random.randint(key, (2, 8), 0, 97))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("change, match", [
    ({"n_head": 5}, "divisible by model.n_head"),
    ({"dtype": "float16"}, "model.dtype"),
    ({"attn_pdrop": 1.5}, "attn_pdrop"),
    ({"n_layer": 0}, "n_layer"),
])
def test_bad_model_config_names_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        model.GPTConfig(**change)


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="gpt3"):
        model.gpt2_config("gpt3")


def test_cache_longer_than_context_is_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="exceeds n_positions"):
        model.KVCache.create(tiny_cfg, 1, tiny_cfg.n_positions + 1)


def test_tokens_past_the_caches_last_slot_are_rejected(tiny_cfg):
    """dynamic_update_slice would clamp the write over the last slots, silently."""
    gpt = model.GPT(tiny_cfg, rngs=nnx.Rngs(0))
    _, cache = gpt(jnp.zeros((1, 7), jnp.int32), cache=model.KVCache.create(tiny_cfg, 1, 8))
    _, full = gpt(jnp.zeros((1, 1), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="8 slots, 8 filled: 1 more tokens do not fit"):
        gpt(jnp.zeros((1, 1), jnp.int32), cache=full)
    with pytest.raises(ValueError, match="8 slots, 7 filled: 2 more tokens do not fit"):
        gpt(jnp.zeros((1, 2), jnp.int32), cache=cache)


# The hand-written backward passes (layer_norm, softmax, tied_head_loss, token_nll) against
# autodiff of the library reference each one replaces: flax's LayerNorm, jax.nn.softmax
# differentiated through its division, einsum logits + log_softmax + take_along_axis.

def _value_and_grads(fn, *args):
    """fn(*args), and the gradient of sum(fn(*args) * w) for a fixed random cotangent w."""
    out = fn(*args)
    w = jax.random.normal(jax.random.key(7), out.shape, jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w),
                     argnums=tuple(range(len(args))))(*args)
    return out, grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_layer_norm_equals_flax_value_and_grads(key, bias, dtype, tol):
    import flax.linen
    features = 48
    k1, k2, k3 = jax.random.split(key, 3)
    scale = 1 + 0.3 * jax.random.normal(k1, (features,))
    shift = 0.3 * jax.random.normal(k2, (features,))
    x = (3 + 2 * jax.random.normal(k3, (4, 5, features))).astype(dtype)
    ref = flax.linen.LayerNorm(epsilon=1e-5, dtype=dtype, use_bias=bias, use_fast_variance=False)

    def flax_ln(x, scale, shift):
        params = {"scale": scale} | ({"bias": shift} if bias else {})
        return ref.apply({"params": params}, x)

    def our_ln(x, scale, shift):
        cast = lambda v: v.astype(dtype)     # what model.LayerNorm passes in
        return ops.layer_norm(x, cast(scale), cast(shift) if bias else None, 1e-5)

    want, want_g = _value_and_grads(flax_ln, x, scale, shift)
    got, got_g = _value_and_grads(our_ln, x, scale, shift)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
    for g, w in zip(got_g, want_g):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=tol, atol=tol * float(jnp.abs(w).max()))
    # The module (as the model builds it) computes the same as the function.
    module = model.LayerNorm(features, epsilon=1e-5, dtype=dtype, use_bias=bias,
                             use_fast_variance=False, rngs=nnx.Rngs(0))
    module.scale.set_value(scale)
    if bias:
        module.bias.set_value(shift)
    np.testing.assert_array_equal(np.asarray(module(x), np.float32), np.asarray(got, np.float32))


def test_softmax_equals_jax_value_and_grads(key):
    x = 4 * jax.random.normal(key, (3, 2, 7, 11))
    x = jnp.where(jnp.arange(11) > 8, jnp.finfo(jnp.float32).min, x)   # masked columns
    want, (want_g,) = _value_and_grads(lambda x: jax.nn.softmax(x, axis=-1), x)
    got, (got_g,) = _value_and_grads(ops.softmax, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_fused_tied_head_loss_equals_logits_then_loss(key, chunk):
    k1, k2, k3 = jax.random.split(key, 3)
    x, w = jax.random.normal(k1, (2, 6, 16)), 0.5 * jax.random.normal(k2, (37, 16))
    targets = jax.random.randint(k3, (2, 6), 0, 37)

    def reference(x, w):
        logits = jnp.einsum("BTD,VD->BTV", x, w)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    want, want_g = jax.value_and_grad(reference, argnums=(0, 1))(x, w)
    got, got_g = jax.value_and_grad(ops.tied_head_loss, argnums=(0, 1))(x, w, targets, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(ops.tied_head_loss(x, w, targets, chunk), want, rtol=1e-6)
    for g, r in zip(got_g, want_g):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
    # Under a scaled loss (as in grad accumulation) the stored gradients scale too.
    scaled = jax.grad(lambda x: 3.0 * ops.tied_head_loss(x, w, targets, chunk))(x)
    np.testing.assert_allclose(scaled, 3.0 * want_g[0], rtol=1e-5, atol=1e-7)


def test_fused_tied_head_loss_in_bfloat16_matches_reference(key):
    """bf16 compute (the GPU setting): logits in bf16, loss and softmax in float32."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (4, 8, 32)).astype(jnp.bfloat16)
    w = (0.5 * jax.random.normal(k2, (53, 32))).astype(jnp.bfloat16)
    targets = jax.random.randint(k3, (4, 8), 0, 53)

    def reference(x, w):
        logits = jnp.einsum("BTD,VD->BTV", x, w).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    want, want_g = jax.value_and_grad(reference, argnums=(0, 1))(x, w)
    got, got_g = jax.value_and_grad(ops.tied_head_loss, argnums=(0, 1))(x, w, targets, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(got_g, want_g):
        assert g.dtype == r.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=2e-2, atol=2e-2 * float(jnp.abs(r).max()))


def test_loss_chunk_divides_the_sequence_within_budget():
    budget, min_rows = ops.CHUNK_ELEMENTS["cpu"], ops.MIN_CHUNK_ROWS
    for batch, seq, vocab in [(16, 128, 4096), (2, 256, 50257), (64, 100, 97), (1, 7, 1 << 22),
                              (32, 1024, 50304)]:
        c = ops.loss_chunk(batch, seq, vocab)
        assert seq % c == 0
        divisors = [d for d in range(1, seq + 1) if seq % d == 0]
        if batch * c * vocab <= budget:     # the largest that fits, unless too few rows
            assert all(batch * d * vocab > budget for d in divisors if d > c)
            assert batch * c >= min_rows or c == seq
        else:                               # raised: the fewest positions with enough rows
            assert batch * c >= min_rows or c == seq
            assert all(batch * d < min_rows for d in divisors if d < c)
    assert ops.loss_chunk(16, 128, 4096) == 32      # bench/train.py's small config
    assert ops.loss_chunk(2, 256, 50257) == 256     # one chunk: the head weight is read once
