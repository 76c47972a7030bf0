"""Operations with hand-written backward passes: layer_norm, softmax, tied_head, token_nll.

Each computes what its library counterpart computes (flax's LayerNorm, jax.nn.softmax, an
einsum with the embedding, log_softmax + take_along_axis) and differentiates in closed form,
which on XLA's CPU backend avoids re-derived fusion chains, scatters and layout copies;
tests/test_model.py and tests/test_train.py compare values and gradients with autodiff of
those counterparts.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, statistics in float32;
    the same arithmetic as flax's LayerNorm (use_fast_variance=False), in x's dtype.

    The backward pass is the closed form dx = rstd * (gy - mean(gy) - xhat * mean(gy * xhat))
    with gy = g * scale, two row reductions and one elementwise pass. Autodiff's version
    broadcasts the scale to the activation's shape and leaves a chain of elementwise terms
    that XLA's CPU fusion re-derives in every consumer, across layers.
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    centered = x32 - mean
    rstd = jax.lax.rsqrt((centered * centered).mean(-1, keepdims=True) + eps)
    y = centered * (rstd * _features(scale, x))
    if bias is not None:
        y = y + _features(bias, x)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _features(v_D, x):
    """A per-feature vector as float32, shaped to broadcast against x [..., D]."""
    return v_D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + v_D.shape)


def _layer_norm_bwd(eps, res, g):
    x, mean, rstd, scale, bias = res
    g32 = g.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gy = g32 * _features(scale, x)
    dx = rstd * (gy - gy.mean(-1, keepdims=True) - xhat * (gy * xhat).mean(-1, keepdims=True))
    batch_axes = tuple(range(x.ndim - 1))
    dscale = (g32 * xhat).sum(batch_axes).astype(scale.dtype)
    dbias = None if bias is None else g32.sum(batch_axes).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def tied_head(x_BTD, w_VD):
    """Logits x @ w.T through the tied embedding [V, D].

    The same product as autodiff's, with the weight gradient taken as (x.T @ g).T: XLA's CPU
    dot wants the contraction on g's rows, and the transposed form otherwise makes it copy
    the whole [B*T, V] gradient into column-major order each step.
    """
    return jnp.einsum("BTD,VD->BTV", x_BTD, w_VD)


def _tied_head_fwd(x_BTD, w_VD):
    return tied_head(x_BTD, w_VD), (x_BTD, w_VD)


def _tied_head_bwd(res, g_BTV):
    x_BTD, w_VD = res
    dx = jnp.einsum("BTV,VD->BTD", g_BTV, w_VD)
    dw = jnp.einsum("BTD,BTV->DV", x_BTD, g_BTV).T
    return dx, dw


tied_head.defvjp(_tied_head_fwd, _tied_head_bwd)


@jax.custom_vjp
def softmax(x):
    """Softmax over the last axis, with the closed-form backward y * (g - sum(g * y)).

    jax.nn.softmax differentiates through its division unless the global
    `jax_softmax_custom_jvp` flag is set, which costs an extra pass over the [B, H, T, S]
    scores in the backward pass.
    """
    return _softmax_fwd(x)[0]


def _softmax_fwd(x):
    e = jnp.exp(x - x.max(-1, keepdims=True))
    y = e / e.sum(-1, keepdims=True)
    return y, y


def _softmax_bwd(y, g):
    return (y * (g - (g * y).sum(-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@jax.custom_vjp
def token_nll(logits, targets):
    """-log softmax(logits)[target] per token, in float32; logits [..., V], targets int [...].

    The gradient is written out, softmax - one_hot(target), as one elementwise pass over the
    logits: autodiff of log_softmax + take_along_axis instead builds a zero array, scatters
    into it, and (on CPU) recomputes the result in a second layout.
    """
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    nll = lse - jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
    return nll, (logits, lse, targets)


def _token_nll_bwd(res, g):
    logits, lse, targets = res
    one_hot = targets[..., None] == jax.lax.broadcasted_iota(targets.dtype, logits.shape,
                                                             logits.ndim - 1)
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    return ((probs - one_hot) * g[..., None]).astype(logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
