"""Sampling: a jitted prefill over left-padded prompts, then a lax.scan decode with a KV cache.

Prompts of different lengths share one batch: each is left-padded to the batch's prompt
bucket, padding slots are masked out of attention, and every row keeps its own positions.
Methods (Greedy, Sampling, Beam) and Penalties follow HuggingFace `generate` semantics and
order: penalties -> temperature -> top-k -> top-p -> min-p -> sample.
"""

import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import choices, model

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear", "exponential")
IMPOSSIBLE = -1.0e9   # HF's additive "never choose" score in beam search (finite on purpose)


# --- Penalties: pure logits -> logits functions -------------------------------------------

def repetition_penalty(logits_BV, hist_BS, valid_BS, penalty: float):
    """HF's repetition penalty: every token already in the row (prompt included) has its
    logit divided by `penalty` when positive and multiplied by it when negative."""
    B, V = logits_BV.shape
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], hist_BS.shape)
    seen_BV = jnp.zeros((B, V), jnp.int32).at[rows, hist_BS].max(valid_BS.astype(jnp.int32)) > 0
    penalized = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    return jnp.where(seen_BV, penalized, logits_BV)


def no_repeat_ngram(logits_BV, hist_BS, valid_BS, cur, n: int):
    """HF's no-repeat n-gram blocking: a token that would complete an n-gram already present
    in the row gets -inf. `cur` is the next slot; slots < cur hold the row (where valid)."""
    B, S = hist_BS.shape
    W = S - n + 1                                              # window start positions
    if W < 1:     # no n-gram fits in the cache, so none can repeat: HF bans nothing then
        return logits_BV
    win_BWn = jnp.stack([hist_BS[:, i:i + W] for i in range(n)], axis=-1)
    ok_BW = jnp.stack([valid_BS[:, i:i + W] for i in range(n)], axis=-1).all(-1)
    if n > 1:
        # The last n-1 tokens of the row; a row shorter than that has no full window anyway.
        last_Bn = jax.lax.dynamic_slice(hist_BS, (0, jnp.maximum(cur - (n - 1), 0)), (B, n - 1))
        ok_BW = ok_BW & (win_BWn[:, :, :-1] == last_Bn[:, None, :]).all(-1)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, W))
    banned_BV = jnp.zeros(logits_BV.shape, jnp.int32).at[rows, win_BWn[:, :, -1]].max(
        ok_BW.astype(jnp.int32)) > 0
    return jnp.where(banned_BV, -jnp.inf, logits_BV)


def _check_finite(**values):
    """NaN or inf in a method's number gives NaN logits or scores silently, not an error."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")


def ban(logits_BV, ids_B_or_V):
    """-inf for the boolean vocab mask `ids_B_or_V` [V] (banned ids, padded vocab rows)."""
    return jnp.where(ids_B_or_V[None], -jnp.inf, logits_BV)


@dataclasses.dataclass(frozen=True)
class Penalties:
    """Logits processors applied before the sampling method, in HF's order."""

    repetition_penalty: float = 1.0   # 1 = off; > 1 discourages repeats
    no_repeat_ngram_size: int = 0     # 0 = off
    banned_ids: tuple[int, ...] = ()  # never generated

    def __post_init__(self):
        _check_finite(repetition_penalty=self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")

    def __call__(self, logits_BV, hist_BS, valid_BS, cur):
        if self.repetition_penalty != 1.0:
            logits_BV = repetition_penalty(logits_BV, hist_BS, valid_BS, self.repetition_penalty)
        if self.no_repeat_ngram_size:
            logits_BV = no_repeat_ngram(logits_BV, hist_BS, valid_BS, cur,
                                        self.no_repeat_ngram_size)
        return logits_BV


# --- Warpers and sampling methods -----------------------------------------------------------

# XLA's CPU sort and top_k cost ~100 ms over a 50k vocabulary, so thresholds are found by
# bisection over the float bits instead: 32 masked reductions, exact, ~1 ms.

def _order_key(logits_BV):
    """uint32 keys ordered like the float32 logits (negative floats have their bits flipped)."""
    bits = jax.lax.bitcast_convert_type(logits_BV.astype(jnp.float32), jnp.int32)
    bits = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(0x80000000)


def _bisect(key_BV, above):
    """The largest key t with above(t) True [B], given above(0) True and above monotone
    (True for small t, False past some point)."""
    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = above(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    B = key_BV.shape[0]
    hi = jnp.full((B,), 0xFFFFFFFF, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros((B,), jnp.uint32), hi))
    return lo[:, None]


def top_k_filter(logits_BV, k: int):
    """Keep the k largest logits (ties with the k-th kept), as HF's TopKLogitsWarper."""
    key = _order_key(logits_BV)
    kth = _bisect(key, lambda t: (key >= t[:, None]).sum(-1) >= min(k, key.shape[-1]))
    return jnp.where(key < kth, -jnp.inf, logits_BV)


def top_p_filter(logits_BV, p: float):
    """HF's TopPLogitsWarper: in ascending order, drop tokens whose cumulative probability
    is <= 1 - p; the most likely token always stays. The kept tokens are those at or above
    the smallest logit x with P(logit <= x) > 1 - p."""
    key = _order_key(logits_BV)
    probs = jax.nn.softmax(logits_BV, axis=-1)
    # Largest t whose mass strictly below it is <= 1 - p: that is the smallest kept key.
    below = _bisect(key, lambda t: jnp.where(key < t[:, None], probs, 0).sum(-1) <= 1 - p)
    keep_from = jnp.minimum(below, key.max(-1, keepdims=True))
    return jnp.where(key < keep_from, -jnp.inf, logits_BV)


def min_p_filter(logits_BV, p: float):
    """HF's MinPLogitsWarper: drop tokens less likely than p times the top token."""
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    floor_B1 = p * probs_BV.max(-1, keepdims=True)
    return jnp.where(probs_BV < floor_B1, -jnp.inf, logits_BV)


def temperature_at(step, n_steps: int, t0: float, t1: float, schedule: str):
    """The temperature at decode step `step` of `n_steps`: T0 at step 0, T1 at the last."""
    frac = jnp.asarray(step, jnp.float32) / max(n_steps - 1, 1)
    if schedule == "constant":
        return jnp.full((), t0, jnp.float32)
    if schedule == "linear":
        return t0 + (t1 - t0) * frac
    return t0 * (t1 / t0) ** frac       # exponential (validated: t0, t1 > 0)


def draw(key, logits_BV):
    """One token per row from softmax(logits): inverse CDF with one uniform per row (a
    Gumbel draw needs V random numbers per row and costs ~10x more on CPU). A token with
    probability 0 (logit -inf: banned, filtered out, padded vocab) is never returned."""
    B, V = logits_BV.shape
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    cdf_BV = jnp.cumsum(probs_BV, axis=-1)
    u_B1 = jax.random.uniform(key, (B, 1)) * cdf_BV[:, -1:]
    token_B = jnp.minimum((cdf_BV <= u_B1).sum(-1), V - 1)
    # XLA:CPU's cumsum is a blocked scan, not sequential: its rounding can step the cdf up
    # at a zero-probability token (~3e-5 of the draws at V=50257), and u * total can round
    # up to the total. Such a draw takes the next allowed token, or the last allowed one if
    # none follows; other draws are unchanged. (Branch-free: a lax.cond would cost a GPU a
    # device-to-host read of its predicate every step.)
    ok_BV = probs_BV > 0
    ids_1V = jnp.arange(V)[None]
    next_B = jnp.where(ok_BV & (ids_1V >= token_B[:, None]), ids_1V, V).min(-1)
    last_B = jnp.where(ok_BV, ids_1V, 0).max(-1)    # 0 for a row with nothing allowed
    hit_B = jnp.take_along_axis(ok_BV, token_B[:, None], axis=-1)[:, 0]
    token_B = jnp.where(hit_B, token_B, jnp.where(next_B < V, next_B, last_B))
    return token_B.astype(jnp.int32)


def argmax(logits_BV):
    """jnp.argmax over the last axis (first maximum; first NaN if any), as a max then a min
    over matching indices: two vectorized reductions, ~3x faster on CPU than XLA's
    single-pass (value, index) reduction at GPT-2's vocabulary size."""
    V = logits_BV.shape[-1]
    ids_V = jnp.arange(V, dtype=jnp.int32)
    # NaNs rank before maxima (the max reduction need not propagate NaN), others after both.
    rank = jnp.where(jnp.isnan(logits_BV), ids_V,
                     jnp.where(logits_BV == logits_BV.max(-1, keepdims=True), V + ids_V, 2 * V))
    return rank.min(-1) % V


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token (HF `do_sample=False`, `num_beams=1`)."""

    def __call__(self, logits_BV, key, step=0, n_steps=1):
        return argmax(logits_BV)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Temperature (optionally annealed T0 -> T1 over the decode steps), top-k, top-p,
    min-p, then a categorical draw. Temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0                        # 0 = whole vocabulary
    top_p: float = 1.0                    # 1 = off
    min_p: float = 0.0                    # 0 = off
    schedule: str = "constant"            # constant | linear | exponential
    final_temperature: float | None = None   # T1 for linear/exponential schedules

    def __post_init__(self):
        _check_finite(temperature=self.temperature, final_temperature=self.final_temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        choices.check("schedule", self.schedule, SCHEDULES)
        annealed = self.schedule != "constant"
        if annealed and self.final_temperature is None:
            raise ValueError(f"schedule {self.schedule!r} needs a final_temperature to anneal to")
        if not annealed and self.final_temperature is not None:
            raise ValueError(f"final_temperature={self.final_temperature} needs a linear or "
                             f"exponential schedule; the constant one would ignore it")
        if annealed and (self.temperature <= 0 or self.final_temperature <= 0):
            raise ValueError(f"an annealed temperature must stay > 0, got {self.temperature} -> "
                             f"{self.final_temperature}")
        if self.temperature == 0 and (self.top_k or self.top_p < 1 or self.min_p):
            raise ValueError("temperature 0 is greedy: top_k/top_p/min_p would be ignored")

    def warp(self, logits_BV, step=0, n_steps=1):
        """The filtered logits the draw samples from (HF's warper order)."""
        t = temperature_at(step, n_steps, self.temperature, self.final_temperature or 0.0,
                           self.schedule)
        logits_BV = logits_BV / t
        if self.top_k:
            logits_BV = top_k_filter(logits_BV, self.top_k)
        if self.top_p < 1:
            logits_BV = top_p_filter(logits_BV, self.top_p)
        if self.min_p:
            logits_BV = min_p_filter(logits_BV, self.min_p)
        return logits_BV

    def __call__(self, logits_BV, key, step=0, n_steps=1):
        if self.temperature == 0:
            return Greedy()(logits_BV, key)
        return draw(key, self.warp(logits_BV, step, n_steps))


@dataclasses.dataclass(frozen=True)
class Beam:
    """Deterministic beam search with HF's scoring (length_penalty, early_stopping in
    True | False | "never"); returns the best `num_return_sequences` per prompt."""

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def __post_init__(self):
        _check_finite(length_penalty=self.length_penalty)
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], "
                             f"got {self.num_return_sequences}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', "
                             f"got {self.early_stopping!r}")


# --- The decode loops -----------------------------------------------------------------------

def _prefill(params, tokens_BT, mask_BT, *, graphdef, cache_len):
    """Run the prompts into a fresh cache of `cache_len` slots.

    Returns the last logits [B, V], the cache, the token history aligned with the cache
    slots [B, S], and each row's next position [B].
    """
    gpt = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    cache = model.KVCache.create(gpt.cfg, B, cache_len)
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    logits, cache = gpt(tokens_BT, positions=positions_BT, attention_mask=mask_BT, cache=cache)
    hist_BS = jnp.zeros((B, cache_len), jnp.int32).at[:, :T].set(tokens_BT)
    return logits[:, -1], cache, hist_BS, positions_BT[:, -1] + 1


def _process(logits_BV, hist_BS, cache, penalties, never_V):
    # Penalties first (HF order); padded vocab rows and banned ids can never win.
    return ban(penalties(logits_BV, hist_BS, cache.valid, cache.index), never_V)


def decode_loop(forward, logits_BV, cache, hist_BS, pos_B, key, never_V, *, method, penalties,
                n_steps: int, eot_id: int | None, stream: bool = False):
    """lax.scan over new tokens with carry (logits, cache, history, positions, done).

    forward(token_B, pos_B, cache) -> (logits [B, V], cache) is the model (or a fake in
    tests); never_V marks ids that are never produced (banned ids, padded vocab rows);
    with `stream`, each step's tokens go to the current sink as they are produced.
    Returns the new tokens [B, n_steps]; rows that produced `eot_id` pad with it after.
    """
    def step(carry, t):
        logits_BV, cache, hist_BS, pos_B, done_B = carry
        logits_BV = _process(logits_BV, hist_BS, cache, penalties, never_V)
        token_B = method(logits_BV, jax.random.fold_in(key, t), t, n_steps)
        if eot_id is not None:
            token_B = jnp.where(done_B, eot_id, token_B)   # finished rows pad with EOS, as HF
            done_B = done_B | (token_B == eot_id)
        if stream:
            jax.debug.callback(_emit, token_B, ordered=True)
        hist_BS = jax.lax.dynamic_update_slice(hist_BS, token_B[:, None], (0, cache.index))
        logits_BV, cache = forward(token_B, pos_B, cache)
        return (logits_BV, cache, hist_BS, pos_B + 1, done_B), token_B

    done_B = jnp.zeros(pos_B.shape, bool)
    _, out_NB = jax.lax.scan(step, (logits_BV, cache, hist_BS, pos_B, done_B),
                             jnp.arange(n_steps))
    return out_NB.T


# The streaming sink of the running `generate` call. The compiled loop calls the fixed
# function `_emit`, so a new sink per call does not recompile.
_SINK: list = [None]


def _emit(tokens_B):
    if _SINK[0] is not None:
        _SINK[0](tokens_B)


def _model_forward(graphdef, params):
    gpt = nnx.merge(graphdef, params)

    def forward(token_B, pos_B, cache):
        logits, cache = gpt(token_B[:, None], positions=pos_B[:, None], cache=cache)
        return logits[:, -1], cache
    return forward


def _decode(params, logits_BV, cache, hist_BS, pos_B, key, never_V, pad_V, *, graphdef, method,
            penalties, n_steps, eot_id, stream):
    del pad_V   # only beam search normalizes over the real vocabulary separately
    return decode_loop(_model_forward(graphdef, params), logits_BV, cache, hist_BS, pos_B, key,
                       never_V, method=method, penalties=penalties, n_steps=n_steps,
                       eot_id=eot_id, stream=stream)


def _gather_beams(x, idx_BM):
    """x [B, N, ...] -> x[b, idx[b, m], ...] of shape [B, M, ...]."""
    idx = idx_BM.reshape(idx_BM.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _beam_decode(params, logits_BV, cache, hist_BS, pos_B, key, never_V, pad_V, *, graphdef,
                 method, penalties, n_steps, eot_id, stream):
    """HF's vectorized beam search (generation/utils.py `_beam_search`) as a lax.scan.

    Rows are batch-major beams (b * N + n). Running past the point where HF stops changes
    nothing: once a prompt cannot improve, its finished set is frozen by the same -1e9 terms.
    """
    del key, stream
    forward = _model_forward(graphdef, params)
    N, lp, early = method.num_beams, method.length_penalty, method.early_stopping
    BN, V = logits_BV.shape
    B = BN // N
    K2 = 2 * N   # HF keeps max(2, 1 + n_eos) * num_beams candidates: enough to continue
    fill = eot_id if eot_id is not None else 0
    top_n_mask = jnp.arange(K2) < N

    def step(carry, t):
        (logits_BV, cache, hist_BS, pos_B, run_seq, run_score, fin_seq, fin_score, fin_done,
         improvable) = carry
        # log-softmax in float32 over the real vocabulary (padded rows excluded); banned ids
        # are removed after normalizing, as HF applies its processors to log-probabilities.
        logp_BV = jax.nn.log_softmax(ban(logits_BV, pad_V), axis=-1)
        logp_BV = _process(logp_BV, hist_BS, cache, penalties, never_V)
        acc = (logp_BV.reshape(B, N, V) + run_score[:, :, None]).reshape(B, N * V)
        top_lp, top_idx = jax.lax.top_k(acc, K2)
        top_beam, top_tok = top_idx // V, (top_idx % V).astype(jnp.int32)
        top_seq = _gather_beams(run_seq, top_beam).at[:, :, t].set(top_tok)
        hits = jnp.full(top_tok.shape, t == n_steps - 1)
        if eot_id is not None:
            hits = hits | (top_tok == eot_id)
        # Running beams for the next step: the best N that did not just finish.
        run_lp = top_lp + hits.astype(jnp.float32) * IMPOSSIBLE
        nxt = jax.lax.top_k(run_lp, N)[1]
        run_seq, run_score = _gather_beams(top_seq, nxt), _gather_beams(run_lp, nxt)
        src_beam = _gather_beams(top_beam, nxt)
        # Finished set: merge newly finished top-N candidates, keep the best N.
        did = hits & top_n_mask[None]
        score = top_lp / ((t + 1.0) ** lp)
        full = fin_done.all(-1, keepdims=True) & (early is True)
        score = score + full.astype(jnp.float32) * IMPOSSIBLE
        score = score + (~improvable).astype(jnp.float32)[:, None] * IMPOSSIBLE
        score = score + (~did).astype(jnp.float32) * IMPOSSIBLE
        m_seq = jnp.concatenate([fin_seq, top_seq], 1)
        m_score = jnp.concatenate([fin_score, score], 1)
        m_done = jnp.concatenate([fin_done, did], 1)
        keep = jax.lax.top_k(m_score, N)[1]
        fin_seq, fin_score, fin_done = (_gather_beams(m_seq, keep), _gather_beams(m_score, keep),
                                        _gather_beams(m_done, keep))
        # Can a running beam still beat the worst finished one? (HF's stopping heuristic.)
        best_len = (n_steps if early == "never" and lp > 0 else t + 1.0)
        best_run = run_score[:, 0] / (best_len ** lp)
        worst_fin = jnp.where(fin_done, fin_score.min(-1, keepdims=True), IMPOSSIBLE)
        improvable = improvable & (best_run[:, None] > worst_fin).any(-1)
        # Reorder the cache and history to the surviving beams, then feed their tokens.
        flat = (jnp.arange(B)[:, None] * N + src_beam).reshape(BN)
        cache = dataclasses.replace(cache, k=tuple(k[flat] for k in cache.k),
                                    v=tuple(v[flat] for v in cache.v), valid=cache.valid[flat])
        hist_BS = hist_BS[flat]
        token_B = run_seq[:, :, t].reshape(BN)
        hist_BS = jax.lax.dynamic_update_slice(hist_BS, token_B[:, None], (0, cache.index))
        logits_BV, cache = forward(token_B, pos_B, cache)
        return (logits_BV, cache, hist_BS, pos_B + 1, run_seq, run_score, fin_seq, fin_score,
                fin_done, improvable), None

    run_seq = jnp.full((B, N, n_steps), fill, jnp.int32)
    # Only the first beam is live at the start, so the beams do not all pick the same token.
    run_score = jnp.zeros((B, N)).at[:, 1:].set(IMPOSSIBLE)
    carry = (logits_BV, cache, hist_BS, pos_B, run_seq, run_score, run_seq,
             jnp.full((B, N), IMPOSSIBLE), jnp.zeros((B, N), bool), jnp.ones((B,), bool))
    carry, _ = jax.lax.scan(step, carry, jnp.arange(n_steps))
    fin_seq = carry[6]
    return fin_seq[:, :method.num_return_sequences].reshape(-1, n_steps)


_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "cache_len"))
_STATICS = ("graphdef", "method", "penalties", "n_steps", "eot_id", "stream")
_decode_jit = jax.jit(_decode, static_argnames=_STATICS)
_beam_jit = jax.jit(_beam_decode, static_argnames=_STATICS)

_EXECUTABLES: dict = {}
COMPILES = {"count": 0}   # compilations so far (tests check bucket reuse with it)


def _run(jitted, args: tuple, statics: dict, stats: dict | None):
    """Call `jitted`, compiling ahead of time once per (shapes, shardings, statics) bucket."""
    sig = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(args))
    key = (id(jitted), sig, jax.tree.structure(args), tuple(sorted(statics.items())))
    if key not in _EXECUTABLES:
        if len(_EXECUTABLES) >= 32:     # bound memory in long-lived processes: drop the oldest
            _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
        t0 = time.perf_counter()
        _EXECUTABLES[key] = jitted.lower(*args, **statics).compile()
        COMPILES["count"] += 1
        if stats is not None:
            stats["compile_s"] = stats.get("compile_s", 0.0) + time.perf_counter() - t0
    return _EXECUTABLES[key](*args)


@functools.lru_cache(maxsize=8)
def graphdef_of(cfg: model.GPTConfig) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))))


def bucket(n: int, minimum: int = 16) -> int:
    """The prompt bucket: the next power of two >= n (at least `minimum`)."""
    return max(minimum, 1 << (n - 1).bit_length())


def pad_prompts(cfg: model.GPTConfig, prompts: list[list[int]], max_new_tokens: int, *,
                eot_id: int | None = None, truncate: bool = False):
    """Left-pad prompts to their bucket: (tokens [B, T], mask [B, T]) as numpy.

    An empty prompt starts from `eot_id`; a prompt that leaves no room for
    `max_new_tokens` in the context is an error, or left-truncated when `truncate`.
    """
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    room = cfg.n_positions - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"context n_positions={cfg.n_positions}")
    rows = []
    for i, p in enumerate(prompts):
        p = [int(x) for x in p]
        if not p:
            if eot_id is None:
                raise ValueError(f"prompt {i} is empty and no eot_id was given to start from")
            p = [eot_id]
        bad = [x for x in p if not 0 <= x < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside [0, {cfg.vocab_size})")
        if len(p) > room:
            if not truncate:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens "
                                 f"{max_new_tokens} the context n_positions={cfg.n_positions} "
                                 f"allows {room} (truncate=True keeps the last {room})")
            log.warning("prompt %d: %d tokens, keeping the last %d", i, len(p), room)
            p = p[-room:]
        rows.append(p)
    longest = max(len(p) for p in rows)
    T = bucket(longest)
    if T + max_new_tokens > cfg.n_positions:   # the bucket would overflow the context
        T = longest
    tokens = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, p in enumerate(rows):
        tokens[i, T - len(p):] = p
        mask[i, T - len(p):] = True
    return tokens, mask


def generate(cfg: model.GPTConfig, params, prompts: list[list[int]], *, max_new_tokens: int,
             method=Sampling(), penalties: Penalties = Penalties(), seed: int = 0,
             eot_id: int | None = None, n_valid_vocab: int | None = None,
             truncate: bool = False, stream: Callable | None = None,
             stats: dict | None = None) -> list[list[int]]:
    """New tokens for each prompt, cut before the first `eot_id` (if given).

    Beam search returns `num_return_sequences` rows per prompt, best first, prompt-major.
    `stream(tokens_B)` is called from inside the decode loop with each step's tokens.
    `stats`, if given, receives compile_s, prefill_s and decode_s.
    """
    if isinstance(method, Beam) and stream is not None:
        raise ValueError("beam search cannot stream: its best sequence is known only at the end")
    if not isinstance(method, (Greedy, Sampling, Beam)):
        raise TypeError(f"unsupported sampling method {method!r}")
    if not 0 <= seed < 2**32:     # jax.random.key keeps the low 32 bits: seeds would alias
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    tokens, mask = pad_prompts(cfg, prompts, max_new_tokens, eot_id=eot_id, truncate=truncate)
    n_valid = n_valid_vocab or cfg.vocab_size
    pad = np.arange(cfg.vocab_size) >= n_valid
    never = pad.copy()
    for i in penalties.banned_ids:
        if not 0 <= i < cfg.vocab_size:
            raise ValueError(f"banned token id {i} outside [0, {cfg.vocab_size})")
        never[i] = True
    graphdef = graphdef_of(cfg)
    _B, T = tokens.shape
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    logits, cache, hist, pos = _run(_prefill_jit, (params, jnp.asarray(tokens), jnp.asarray(mask)),
                                    {"graphdef": graphdef, "cache_len": T + max_new_tokens}, stats)
    jax.block_until_ready(logits)
    stats["prefill_s"] = time.perf_counter() - t0 - stats.get("compile_s", 0.0)
    decode = _decode_jit
    if isinstance(method, Beam):
        decode = _beam_jit
        n = method.num_beams   # every prompt starts as N identical beams
        logits, hist, pos = (jnp.repeat(x, n, axis=0) for x in (logits, hist, pos))
        cache = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0) if x.ndim else x, cache)
    compile_before = stats.get("compile_s", 0.0)
    t1 = time.perf_counter()
    _SINK[0] = stream
    try:
        out = _run(decode, (params, logits, cache, hist, pos, jax.random.key(seed),
                            jnp.asarray(never), jnp.asarray(pad)),
                   {"graphdef": graphdef, "method": method, "penalties": penalties,
                    "n_steps": max_new_tokens, "eot_id": eot_id, "stream": stream is not None},
                   stats)
        out = np.asarray(out)
        jax.effects_barrier()    # every streamed step has reached the sink
    finally:
        _SINK[0] = None
    stats["decode_s"] = time.perf_counter() - t1 - (stats.get("compile_s", 0.0) - compile_before)
    rows = out.tolist()
    if eot_id is not None:
        rows = [r[:r.index(eot_id)] if eot_id in r else r for r in rows]
    return rows


if __name__ == "__main__":    # python -m jaxgpt.sample: the command line (jaxgpt/sample_cli.py)
    from jaxgpt import config, sample_cli
    config.use_compilation_cache()
    sys.exit(sample_cli.main())
