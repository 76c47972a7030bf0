"""Operations with hand-written backward passes: layer_norm, softmax, token_nll, and
tied_head_loss (the tied head and the loss fused, chunk by chunk); tied_head (the logits)
and tied_head_nll_sum (evaluation's weighted loss, chunk by chunk).

Each computes what its library counterpart computes (flax's LayerNorm, jax.nn.softmax,
log_softmax + take_along_axis) and differentiates in closed form,
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


def tied_head(x_BTD, w_VD):
    """Logits x @ w.T through the tied embedding [V, D] (inference; training differentiates
    the head through tied_head_loss)."""
    return jnp.einsum("BTD,VD->BTV", x_BTD, w_VD)


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


def _nll_and_lse(logits, targets):
    """(per-token NLL, logsumexp), both float32."""
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    return lse - jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0], lse


def _nll_grad(logits, lse, targets, g):
    """d NLL / d logits scaled by the per-token cotangent g: (softmax - one_hot) * g."""
    one_hot = targets[..., None] == jax.lax.broadcasted_iota(targets.dtype, logits.shape,
                                                             logits.ndim - 1)
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    return ((probs - one_hot) * g[..., None]).astype(logits.dtype)


def _token_nll_fwd(logits, targets):
    nll, lse = _nll_and_lse(logits, targets)
    return nll, (logits, lse, targets)


def _token_nll_bwd(res, g):
    logits, lse, targets = res
    return _nll_grad(logits, lse, targets, g), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


# Elements of one chunk's [rows, V] float32 logits in tied_head_loss: about L3-sized on a
# CPU (8 MiB); on accelerators large enough that each chunk's matmuls stay efficient. Every
# chunk reads the whole [V, D] head weight again, so a chunk never has fewer rows than
# MIN_CHUNK_ROWS (enough that those reads are cheap next to the chunk's matmul FLOPs).
CHUNK_ELEMENTS = {"cpu": 1 << 21}
CHUNK_ELEMENTS_ACCELERATOR = 1 << 28
MIN_CHUNK_ROWS = 512


def loss_chunk(batch: int, seq: int, vocab: int) -> int:
    """Positions per chunk: the largest divisor of `seq` whose logits fit CHUNK_ELEMENTS,
    raised to the smallest divisor giving MIN_CHUNK_ROWS rows (or `seq`) if it has fewer."""
    budget = CHUNK_ELEMENTS.get(jax.default_backend(), CHUNK_ELEMENTS_ACCELERATOR)
    divisors = [c for c in range(1, seq + 1) if seq % c == 0]
    chunk = max((c for c in divisors if batch * c * vocab <= budget), default=1)
    if batch * chunk < MIN_CHUNK_ROWS:
        chunk = min((c for c in divisors if batch * c >= MIN_CHUNK_ROWS), default=seq)
    return chunk


def _chunks(x_BTD, targets_BT, chunk: int):
    """[B, T, ...] -> [T / chunk, B, chunk, ...], the scan axis first."""
    B, T = targets_BT.shape
    xs = x_BTD.reshape(B, T // chunk, chunk, -1).transpose(1, 0, 2, 3)
    return xs, targets_BT.reshape(B, T // chunk, chunk).transpose(1, 0, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tied_head_loss(x_BTD, w_VD, targets_BT, chunk: int):
    """Mean token NLL of the logits x @ w.T (the tied head) without materializing them:
    equal to token_nll(tied_head(x, w), targets).mean().

    A lax.scan over `chunk` positions at a time computes each chunk's logits, its loss and,
    when differentiated, its gradients at once (the loss is the scalar at the end of the
    graph, so dlogits = (softmax - one_hot) / N is known in the forward pass): no [B, T, V]
    array is ever stored, and the backward pass only scales the stored dx and dw.
    """
    return tied_head_nll_sum(x_BTD, w_VD, targets_BT, None, chunk) / targets_BT.size


def tied_head_nll_sum(x_BTD, w_VD, targets_BT, weights_BT, chunk: int):
    """Sum over tokens of weights * NLL of the logits x @ w.T, chunk by chunk (no gradient:
    evaluation, and tied_head_loss's value); a weight of 0 leaves a token out, weights None
    counts every token."""
    xs, ts = _chunks(x_BTD, targets_BT, chunk)
    ws = None if weights_BT is None else _chunks(x_BTD, weights_BT, chunk)[1]

    def body(total, xtw):
        x_BCD, t_BC, w_BC = xtw
        nll = _nll_and_lse(tied_head(x_BCD, w_VD), t_BC)[0]
        return total + (nll if w_BC is None else nll * w_BC).sum(), None

    return jax.lax.scan(body, jnp.float32(0), (xs, ts, ws))[0]


def _tied_head_loss_fwd(x_BTD, w_VD, targets_BT, chunk):
    xs, ts = _chunks(x_BTD, targets_BT, chunk)
    scale = 1.0 / targets_BT.size

    def body(carry, xt):
        total, dw_DV = carry
        x_BCD, t_BC = xt
        logits = tied_head(x_BCD, w_VD)
        nll, lse = _nll_and_lse(logits, t_BC)
        d = _nll_grad(logits, lse, t_BC, jnp.full(t_BC.shape, scale))
        dx_BCD = jnp.einsum("BCV,VD->BCD", d, w_VD)
        dw_DV = dw_DV + jnp.einsum("BCD,BCV->DV", x_BCD, d).astype(jnp.float32)
        return (total + nll.sum(), dw_DV), dx_BCD

    init = (jnp.float32(0), jnp.zeros(w_VD.shape[::-1], jnp.float32))
    (total, dw_DV), dxs = jax.lax.scan(body, init, (xs, ts))
    dx_BTD = dxs.transpose(1, 0, 2, 3).reshape(x_BTD.shape)
    return total * scale, (dx_BTD, dw_DV.T.astype(w_VD.dtype))


def _tied_head_loss_bwd(chunk, res, g):
    dx_BTD, dw_VD = res
    return (dx_BTD * g).astype(dx_BTD.dtype), (dw_VD * g).astype(dw_VD.dtype), None


tied_head_loss.defvjp(_tied_head_loss_fwd, _tied_head_loss_bwd)
