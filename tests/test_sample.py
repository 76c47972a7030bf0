"""Sampler tests: cached decode = full forward, HF generate parity (greedy, beams, penalties),
numpy references for HF's logits processors, sampling frequencies, excluded ids never drawn,
annealing closed form, compile reuse per bucket, the scan loop on a fake model, bad input,
the CLI."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import model, sample, sample_cli
from tests.helpers import REPO

EOT = 0   # an id the tiny random models emit now and then, so rows and beams finish


def _random_params(cfg, seed=0, std=0.3):
    """Weights large enough that logits are far from uniform (clear argmax / beam order)."""
    params = nnx.state(model.GPT(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


def _to_hf(cfg, params):
    """A torch GPT2LMHeadModel holding the same weights (test-local copy of the HF mapping:
    c_attn [D,3,H,K] -> [D,3D], attn.c_proj [H,K,D] -> [D,D], LayerNorm scale -> weight)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=EOT, eos_token_id=EOT)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    p = nnx.to_pure_dict(params)
    d = cfg.n_embd
    sd = {"transformer.wte.weight": p["wte"]["embedding"],
          "transformer.wpe.weight": p["wpe"]["embedding"],
          "transformer.ln_f.weight": p["ln_f"]["scale"], "transformer.ln_f.bias": p["ln_f"]["bias"],
          "lm_head.weight": p["wte"]["embedding"]}
    for i in range(cfg.n_layer):
        h, pre = p["h"][i], f"transformer.h.{i}."
        sd |= {pre + "ln_1.weight": h["ln_1"]["scale"], pre + "ln_1.bias": h["ln_1"]["bias"],
               pre + "ln_2.weight": h["ln_2"]["scale"], pre + "ln_2.bias": h["ln_2"]["bias"],
               pre + "attn.c_attn.weight": np.reshape(h["attn"]["c_attn"]["kernel"], (d, 3 * d)),
               pre + "attn.c_attn.bias": np.reshape(h["attn"]["c_attn"]["bias"], (3 * d,)),
               pre + "attn.c_proj.weight": np.reshape(h["attn"]["c_proj"]["kernel"], (d, d)),
               pre + "attn.c_proj.bias": h["attn"]["c_proj"]["bias"],
               pre + "mlp.c_fc.weight": h["mlp"]["c_fc"]["kernel"],
               pre + "mlp.c_fc.bias": h["mlp"]["c_fc"]["bias"],
               pre + "mlp.c_proj.weight": h["mlp"]["c_proj"]["kernel"],
               pre + "mlp.c_proj.bias": h["mlp"]["c_proj"]["bias"]}
    sd = {k: torch.tensor(np.asarray(v)) for k, v in sd.items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("attn.bias" in m or "masked_bias" in m for m in missing), missing
    return hf


PROMPTS = [[5, 17, 42], [8, 3, 91, 22, 60, 7, 33], [64]]


@pytest.fixture(scope="module")
def hf_pair():
    cfg = model.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    params = _random_params(cfg)
    return cfg, params, _to_hf(cfg, params)


def _hf_generate(hf, prompt, n, **kw):
    import torch
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                          dtype=torch.long), max_new_tokens=n, pad_token_id=EOT,
                          eos_token_id=EOT, use_cache=True, **kw)
    rows = out[:, len(prompt):].tolist()
    return [r[:r.index(EOT)] if EOT in r else r for r in rows]


# --- the decode loop is exact ----------------------------------------------------------------

def test_prefill_and_cached_decode_match_full_forward(hf_pair):
    cfg, params, _ = hf_pair
    graphdef = sample.graphdef_of(cfg)
    tokens, mask = sample.pad_prompts(cfg, PROMPTS, 8)
    cont = np.array([[11, 12, 13, 14, 15, 16, 17, 18]] * len(PROMPTS), np.int32)
    logits, cache, _, pos = sample._prefill_jit(params, jnp.asarray(tokens), jnp.asarray(mask),
                                                graphdef=graphdef, cache_len=24)

    @jax.jit
    def step(params, token_B1, pos_B1, cache):
        out, cache = nnx.merge(graphdef, params)(token_B1, positions=pos_B1, cache=cache)
        return out[:, -1], cache

    @jax.jit
    def full(params, tokens_BT):
        return nnx.merge(graphdef, params)(tokens_BT)[0]

    got = [logits]
    for t in range(cont.shape[1]):
        out, cache = step(params, jnp.asarray(cont[:, t:t + 1]), (pos + t)[:, None], cache)
        got.append(out)
    got = np.stack(got, 1)    # [B, 9, V]: after the prompt, then after each fed token
    for i, p in enumerate(PROMPTS):
        want = full(params, jnp.asarray([p + cont[i].tolist()]))
        np.testing.assert_allclose(got[i], np.asarray(want[0, len(p) - 1:]), atol=1e-5, rtol=0)


def _fake_forward(vocab):
    """A model whose next token is always `last token + 1` (mod vocab)."""
    def forward(token_B, pos_B, cache):
        cache = dataclasses.replace(
            cache, valid=jax.lax.dynamic_update_slice(
                cache.valid, jnp.ones((token_B.shape[0], 1), bool), (0, cache.index)),
            index=cache.index + 1)
        return 10.0 * jax.nn.one_hot((token_B + 1) % vocab, vocab), cache
    return forward


def _fake_start(cfg, prompts, n):
    tokens, mask = sample.pad_prompts(cfg, prompts, n)
    B, T = tokens.shape
    cache = model.KVCache.create(cfg, B, T + n)
    cache = dataclasses.replace(cache, valid=cache.valid.at[:, :T].set(mask),
                                index=jnp.asarray(T, jnp.int32))
    last = jnp.asarray(tokens[:, -1])
    hist = jnp.zeros((B, T + n), jnp.int32).at[:, :T].set(tokens)
    return 10.0 * jax.nn.one_hot((last + 1) % cfg.vocab_size, cfg.vocab_size), cache, hist


def test_scan_loop_on_fake_model_gives_exact_sequence(tiny_cfg):
    logits, cache, hist = _fake_start(tiny_cfg, [[3, 4], [90], [40, 41, 42]], 10)
    never = jnp.zeros(tiny_cfg.vocab_size, bool).at[45].set(True)   # banned: 44 -> 46 skipped
    out = sample.decode_loop(_fake_forward(tiny_cfg.vocab_size), logits, cache, hist,
                             jnp.zeros(3, jnp.int32), jax.random.key(0), never,
                             method=sample.Greedy(), penalties=sample.Penalties(), n_steps=10,
                             eot_id=93)
    assert np.asarray(out).tolist() == [
        [5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [91, 92, 93, 93, 93, 93, 93, 93, 93, 93],    # EOS ends the row; it pads with EOS
        [43, 44, 0, 1, 2, 3, 4, 5, 6, 7]]            # 45 banned: the argmax is then id 0


# --- parity with HF generate on the same weights ------------------------------------------

@pytest.mark.parametrize("kw", [
    {},
    {"repetition_penalty": 1.8},
    {"no_repeat_ngram_size": 2},
    {"repetition_penalty": 0.7, "no_repeat_ngram_size": 3},
], ids=["greedy", "rep1.8", "ngram2", "rep0.7+ngram3"])
def test_greedy_matches_hf(hf_pair, kw):
    cfg, params, hf = hf_pair
    pen = sample.Penalties(**kw)
    ours = sample.generate(cfg, params, PROMPTS, max_new_tokens=12, method=sample.Greedy(),
                           penalties=pen, eot_id=EOT)
    theirs = [_hf_generate(hf, p, 12, do_sample=False, **kw)[0] for p in PROMPTS]
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("beams,lp,early,nret", [
    (2, 1.0, False, 1), (3, 0.0, True, 2), (4, 2.0, False, 3), (4, -1.0, True, 1),
    (3, 1.5, "never", 3)])
def test_beam_search_matches_hf(hf_pair, beams, lp, early, nret):
    cfg, params, hf = hf_pair
    method = sample.Beam(num_beams=beams, length_penalty=lp, early_stopping=early,
                         num_return_sequences=nret)
    ours = sample.generate(cfg, params, PROMPTS, max_new_tokens=10, method=method, eot_id=EOT)
    theirs = []
    for p in PROMPTS:
        theirs += _hf_generate(hf, p, 10, do_sample=False, num_beams=beams, length_penalty=lp,
                               early_stopping=early, num_return_sequences=nret)
    assert ours == theirs


# --- numpy references for HF's logits processors --------------------------------------------

def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_top_k(x, k):
    kth = np.sort(x, -1)[:, -k][:, None]
    return np.where(x < kth, -np.inf, x)


def _np_top_p(x, p):
    out = x.copy()
    for r in range(x.shape[0]):
        order = np.argsort(x[r])                       # ascending, as HF
        cum = np.cumsum(_np_softmax(x[r][order]))
        remove = cum <= 1 - p
        remove[-1] = False
        out[r, order[remove]] = -np.inf
    return out


def _np_min_p(x, p):
    probs = _np_softmax(x)
    return np.where(probs < p * probs.max(-1, keepdims=True), -np.inf, x)


def _np_repetition(x, seqs, penalty):
    out = x.copy()
    for r, seq in enumerate(seqs):
        for t in set(seq):
            out[r, t] = out[r, t] * penalty if out[r, t] < 0 else out[r, t] / penalty
    return out


def _np_no_repeat(x, seqs, n):
    out = x.copy()
    for r, seq in enumerate(seqs):
        if len(seq) + 1 < n:
            continue
        grams = {}
        for g in zip(*[seq[i:] for i in range(n)]):
            grams.setdefault(tuple(g[:-1]), []).append(g[-1])
        for t in grams.get(tuple(seq[len(seq) + 1 - n:]), []):
            out[r, t] = -np.inf
    return out


def test_processors_match_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 97)).astype(np.float32) * 3
    for k in (1, 5, 96):
        np.testing.assert_array_equal(sample.top_k_filter(jnp.asarray(x), k), _np_top_k(x, k))
    for p in (0.05, 0.5, 0.9, 1.0):
        np.testing.assert_array_equal(sample.top_p_filter(jnp.asarray(x), p), _np_top_p(x, p))
    for p in (0.0, 0.1, 0.5, 1.0):
        np.testing.assert_array_equal(sample.min_p_filter(jnp.asarray(x), p), _np_min_p(x, p))
    # Histories in cache layout: left padding, then the row; slot `cur` is next.
    seqs = [[3, 3, 4, 3, 4], [1, 2, 1, 2, 1, 2, 1], [7], [5, 6, 5, 6, 5, 6, 5, 6, 5, 6]]
    S, cur = 12, 10
    hist = np.zeros((6, S), np.int32)
    valid = np.zeros((6, S), bool)
    for r, s in enumerate(seqs):
        hist[r, cur - len(s):cur], valid[r, cur - len(s):cur] = s, True
    seqs += [[], []]
    for pen in (1.3, 0.6):
        np.testing.assert_allclose(
            sample.repetition_penalty(jnp.asarray(x), jnp.asarray(hist), jnp.asarray(valid), pen),
            _np_repetition(x, seqs, pen), rtol=1e-6)
    for n in (1, 2, 3, 4):
        np.testing.assert_array_equal(
            sample.no_repeat_ngram(jnp.asarray(x), jnp.asarray(hist), jnp.asarray(valid),
                                   jnp.asarray(cur), n), _np_no_repeat(x, seqs, n))


def test_processors_match_transformers_logits_processors():
    """The same filters and penalties against transformers' own logits processors, row by
    row on each row's history (ours read it from the cache's slots, left padding masked)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 97)).astype(np.float32) * 3
    seqs = [[3, 3, 4, 3, 4], [1, 2, 1, 2, 1, 2, 1], [7], [5, 6, 5, 6, 5, 6, 5, 6, 5, 6]]
    S, cur = 12, 10
    hist, valid = np.zeros((4, S), np.int32), np.zeros((4, S), bool)
    for r, q in enumerate(seqs):
        hist[r, cur - len(q):cur], valid[r, cur - len(q):cur] = q, True

    def theirs(processor):
        return np.concatenate([processor(torch.tensor([q]), torch.tensor(x[r:r + 1])).numpy()
                               for r, q in enumerate(seqs)])
    for k in (1, 5, 96):
        np.testing.assert_array_equal(sample.top_k_filter(jnp.asarray(x), k),
                                      theirs(transformers.TopKLogitsWarper(k)))
    for p in (0.05, 0.5, 0.9):
        np.testing.assert_array_equal(sample.top_p_filter(jnp.asarray(x), p),
                                      theirs(transformers.TopPLogitsWarper(p)))
    for p in (0.01, 0.1, 0.5):
        np.testing.assert_array_equal(sample.min_p_filter(jnp.asarray(x), p),
                                      theirs(transformers.MinPLogitsWarper(p)))
    for pen in (1.3, 0.6):
        np.testing.assert_allclose(
            sample.repetition_penalty(jnp.asarray(x), jnp.asarray(hist), jnp.asarray(valid), pen),
            theirs(transformers.RepetitionPenaltyLogitsProcessor(pen)), rtol=1e-6)
    for n in (1, 2, 3, 4):
        np.testing.assert_array_equal(
            sample.no_repeat_ngram(jnp.asarray(x), jnp.asarray(hist), jnp.asarray(valid),
                                   jnp.asarray(cur), n),
            theirs(transformers.NoRepeatNGramLogitsProcessor(n)))


def test_no_repeat_ngram_longer_than_the_cache_bans_nothing_as_transformers(hf_pair):
    """No n-gram longer than the cache's slots exists yet, so HF bans nothing; ours built
    windows of negative width and failed inside JAX."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    x = np.random.default_rng(2).normal(size=(1, 97)).astype(np.float32)
    seq, S = [5, 6, 5, 6, 5, 6, 5, 6, 5, 6], 12
    hist, valid = np.zeros((1, S), np.int32), np.zeros((1, S), bool)
    hist[0, :len(seq)], valid[0, :len(seq)] = seq, True
    for n in (S, S + 1, S + 2, 40):
        theirs = transformers.NoRepeatNGramLogitsProcessor(n)(torch.tensor([seq]),
                                                              torch.tensor(x)).numpy()
        np.testing.assert_array_equal(
            sample.no_repeat_ngram(jnp.asarray(x), jnp.asarray(hist), jnp.asarray(valid),
                                   jnp.asarray(len(seq)), n), theirs, err_msg=f"n={n}")
    cfg, params, hf = hf_pair     # the cache: a 16-token prompt bucket + 4 new tokens
    pen = sample.Penalties(no_repeat_ngram_size=40)
    ours = sample.generate(cfg, params, PROMPTS, max_new_tokens=4, method=sample.Greedy(),
                           penalties=pen, eot_id=EOT)
    assert ours == [_hf_generate(hf, p, 4, do_sample=False, no_repeat_ngram_size=40)[0]
                    for p in PROMPTS]


def test_argmax_equals_numpy_with_ties_infinities_and_nan():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(7, 50257)).astype(np.float32)   # many tied maxima
    x[1, [10, 20]] = np.inf
    x[2] = np.finfo(np.float32).min
    x[3, [9, 40000]] = np.nan                # NaN wins, first one first (numpy, jnp)
    x[4, 123] = np.nan
    x[4, 5] = np.inf
    got = np.asarray(sample.argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got[3] == 9 and got[4] == 123


@pytest.mark.parametrize("method,expected", [
    (sample.Sampling(), lambda p: p),
    (sample.Sampling(temperature=2.0, top_k=4), lambda p: _np_softmax(_np_top_k(
        np.log(p)[None] / 2.0, 4))[0]),
])
def test_sampling_frequencies_match_distribution(method, expected):
    scipy_stats = pytest.importorskip("scipy.stats")
    p = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (64, 8))
    keys = jax.random.split(jax.random.key(3), 500)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: method(logits, k)))(keys)).ravel()
    want = expected(p)
    counts = np.bincount(draws, minlength=8)
    assert counts[want == 0].sum() == 0
    nz = want > 0
    chi2 = (((counts[nz] - draws.size * want[nz]) ** 2) / (draws.size * want[nz])).sum()
    assert chi2 < scipy_stats.chi2.ppf(0.999, nz.sum() - 1), (counts, want)


@pytest.mark.parametrize("case", ["banned", "top_p"])
def test_excluded_tokens_are_never_drawn_at_gpt2_vocab_size(case):
    """XLA:CPU's cumsum is a blocked scan whose rounding can step the CDF up at a -inf
    token: the bare inverse-CDF draw then picked excluded ids ~4e-5 of the time here, 2 to 9
    times in 128k draws for every seed tried. The excluded set comes from numpy."""
    V = 50257
    x = np.random.default_rng(0).normal(size=(1, V)).astype(np.float32) * 2
    if case == "banned":     # every even id banned, the odd ones equally likely
        method, x = sample.Sampling(), np.where(np.arange(V) % 2 == 0, -np.inf, np.zeros_like(x))
        excluded = np.arange(V) % 2 == 0
    else:                    # top-p keeps ~12k of the 50k ids
        method, excluded = sample.Sampling(top_p=0.9), np.isinf(_np_top_p(x, 0.9)[0])
    logits = jnp.broadcast_to(jnp.asarray(x, jnp.float32), (256, V))
    keys = jax.random.split(jax.random.key(0), 500)
    draws = np.asarray(jax.jit(lambda x, keys: jax.lax.map(lambda k: method(x, k), keys))(
        logits, keys))
    assert 0 < excluded.sum() < V - 10_000
    assert not excluded[draws].any(), np.unique(draws[excluded[draws]])


@pytest.mark.parametrize("schedule", ["constant", "linear", "exponential"])
def test_annealed_temperature_is_closed_form_inside_the_scan(tiny_cfg, schedule):
    t0, t1, n = 2.0, 0.25, 9
    closed = {"constant": lambda t: t0, "linear": lambda t: t0 + (t1 - t0) * t / (n - 1),
              "exponential": lambda t: t0 * (t1 / t0) ** (t / (n - 1))}[schedule]
    method = sample.Sampling(temperature=t0, schedule=schedule,
                             final_temperature=None if schedule == "constant" else t1)
    for t in range(n):
        np.testing.assert_allclose(sample.temperature_at(t, n, t0, t1, schedule), closed(t),
                                   rtol=1e-6)
    # The loop's draw at step t equals a draw at the closed-form temperature with its key.
    V = tiny_cfg.vocab_size
    fixed = jnp.asarray(np.random.default_rng(1).normal(size=(4, V)), jnp.float32)

    def forward(token_B, pos_B, cache):
        return fixed, dataclasses.replace(cache, index=cache.index + 1)
    cache = model.KVCache.create(tiny_cfg, 4, n + 1)
    key = jax.random.key(7)
    out = sample.decode_loop(forward, fixed, cache, jnp.zeros((4, n + 1), jnp.int32),
                             jnp.zeros(4, jnp.int32), key, jnp.zeros(V, bool), method=method,
                             penalties=sample.Penalties(), n_steps=n, eot_id=None)
    # Inverse-CDF draw in numpy at the closed-form temperature, from the step's uniform.
    want = []
    for t in range(n):
        u = np.asarray(jax.random.uniform(jax.random.fold_in(key, t), (4, 1)))
        cdf = np.cumsum(_np_softmax(np.asarray(fixed, np.float64) / closed(t)), -1)
        want.append([np.searchsorted(cdf[r], u[r, 0] * cdf[r, -1], side="right")
                     for r in range(4)])
    np.testing.assert_array_equal(np.asarray(out), np.array(want).T)


def test_compiles_once_per_bucket():
    cfg = model.GPTConfig(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    params = _random_params(cfg, seed=5)
    run = {"max_new_tokens": 4, "method": sample.Greedy(), "eot_id": EOT}
    before = sample.COMPILES["count"]
    sample.generate(cfg, params, [[1, 2, 3]], **run)
    first = sample.COMPILES["count"]
    assert first == before + 2      # prefill + decode
    for prompt in ([4] * 7, [5] * 12, [6] * 16, [], [1] * 9):
        sample.generate(cfg, params, [prompt], **run)
    assert sample.COMPILES["count"] == first    # all in the 16-token bucket
    sample.generate(cfg, params, [[7] * 17], **run)
    assert sample.COMPILES["count"] == first + 2   # the 32-token bucket


def test_mixed_batch_rows_equal_single_prompt_runs(hf_pair):
    cfg, params, _ = hf_pair
    method = sample.Sampling(temperature=0.9, top_p=0.95)
    batch = sample.generate(cfg, params, PROMPTS, max_new_tokens=6, method=sample.Greedy())
    single = [sample.generate(cfg, params, [p], max_new_tokens=6, method=sample.Greedy())[0]
              for p in PROMPTS]
    assert batch == single
    a = sample.generate(cfg, params, PROMPTS, max_new_tokens=6, method=method, seed=4)
    assert a == sample.generate(cfg, params, PROMPTS, max_new_tokens=6, method=method, seed=4)


def test_stream_gets_every_step_in_order_and_never_recompiles(hf_pair):
    cfg, params, _ = hf_pair
    run = {"max_new_tokens": 6, "method": sample.Sampling(temperature=0.8, top_k=20), "seed": 2}
    first, second = [], []
    out = sample.generate(cfg, params, [[5, 6], [7]], stream=first.append, **run)
    count = sample.COMPILES["count"]
    assert np.stack([np.asarray(t) for t in first], 1).tolist() == out
    sample.generate(cfg, params, [[5, 6], [7]], stream=second.append, **run)
    assert sample.COMPILES["count"] == count    # a new sink is not a new program
    assert [np.asarray(t).tolist() for t in second] == [np.asarray(t).tolist() for t in first]


def test_padded_vocab_rows_are_never_sampled(hf_pair):
    cfg, params, _ = hf_pair
    out = sample.generate(cfg, params, PROMPTS * 4, max_new_tokens=10, n_valid_vocab=40,
                          method=sample.Sampling(temperature=5.0))
    assert max(max(r) for r in out) < 40


# --- bad input --------------------------------------------------------------------------------

def test_bad_method_values_are_errors():
    with pytest.raises(ValueError, match="top_p .* got 0"):
        sample.Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="top_p .* got 1.5"):
        sample.Sampling(top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -0.5"):
        sample.Sampling(temperature=-0.5)
    with pytest.raises(ValueError, match="num_beams must be >= 1, got 0"):
        sample.Beam(num_beams=0)
    with pytest.raises(ValueError, match="greedy"):
        sample.Sampling(temperature=0.0, top_k=5)


@pytest.mark.parametrize("make,message", [
    (lambda: sample.Sampling(temperature=float("nan")), "temperature must be finite, got nan"),
    (lambda: sample.Sampling(temperature=float("inf")), "temperature must be finite, got inf"),
    (lambda: sample.Sampling(schedule="linear", final_temperature=float("nan")),
     "final_temperature must be finite, got nan"),
    (lambda: sample.Beam(length_penalty=float("nan")), "length_penalty must be finite, got nan"),
    (lambda: sample.Penalties(repetition_penalty=float("inf")),
     "repetition_penalty must be finite, got inf")],
    ids=["temperature-nan", "temperature-inf", "final-nan", "length-nan", "repetition-inf"])
def test_non_finite_method_values_are_errors(make, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        make()


def test_seed_outside_32_bits_is_an_error(hf_pair):
    """jax.random.key keeps a seed's low 32 bits, so 2**32 + 1 would sample as 1."""
    cfg, params, _ = hf_pair
    for seed in (-1, 2**32, 2**32 + 1, 2**64):
        with pytest.raises(ValueError, match=rf"^seed must be in \[0, 2\*\*32\), got {seed}$"):
            sample.generate(cfg, params, [[1]], max_new_tokens=2, seed=seed)
    assert len(sample.generate(cfg, params, [[1]], max_new_tokens=2, seed=2**32 - 1)[0]) == 2


def test_prompt_bounds(hf_pair):
    cfg, params, _ = hf_pair
    assert (sample.generate(cfg, params, [[]], max_new_tokens=3, method=sample.Greedy(),
                            eot_id=96)
            == sample.generate(cfg, params, [[96]], max_new_tokens=3, method=sample.Greedy(),
                               eot_id=96))
    long = list(range(1, 31))
    with pytest.raises(ValueError, match="prompt 1 has 30 tokens"):
        sample.generate(cfg, params, [[1], long], max_new_tokens=4, method=sample.Greedy())
    kept = sample.generate(cfg, params, [long], max_new_tokens=4, method=sample.Greedy(),
                           truncate=True)
    assert kept == sample.generate(cfg, params, [long[-28:]], max_new_tokens=4,
                                   method=sample.Greedy())


class _Chars:
    """A character tokenizer over the tiny vocabulary (end-of-text is 0)."""
    vocab_size, eot_id = 97, 0

    def encode(self, text):
        return [ord(c) % 96 + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 31) for i in ids)


def test_cli_streams_and_rejects_bad_files(tmp_path, hf_pair, capsys):
    cfg, params, _ = hf_pair
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"hello\nwor\xffld\n")
    with pytest.raises(ValueError, match=r"prompts.txt line 2: not UTF-8"):
        sample_cli.read_prompts(str(bad))

    Chars = _Chars
    args = sample_cli.parse_args(["--hf=unused", "--prompt=ab", "--max_new_tokens=5",
                              "--temperature=0"])
    sample_cli.run_cli(args, cfg, params, Chars())
    out = capsys.readouterr().out
    assert "tokens/s" in out and "compile" in out
    want = sample.generate(cfg, params, [Chars().encode("ab")], max_new_tokens=5,
                           method=sample.Greedy(), eot_id=0)[0]
    assert out.startswith("ab" + Chars().decode(want) + "\n")   # the prompt, then its tokens
    too_long = sample_cli.parse_args(["--hf=unused", "--prompt=" + "x" * 30,
                                      "--max_new_tokens=4"])
    with pytest.raises(ValueError, match="prompt 0 has 30 tokens"):
        sample_cli.run_cli(too_long, cfg, params, Chars())
    assert capsys.readouterr().out == ""     # a refused prompt is not echoed
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.sample", f"--checkpoint={tmp_path}",
                           f"--prompts_file={bad}"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode != 0 and "line 2: not UTF-8" in proc.stderr


@pytest.fixture
def cli(tiny_cfg, monkeypatch, capsys):
    """main(*flags) on a tiny random model: (exit code, stdout, stderr lines, models loaded)."""
    params = _random_params(tiny_cfg)
    loaded = []

    def load_model(args):
        loaded.append(args.hf)
        return tiny_cfg, params, _Chars()
    monkeypatch.setattr(sample_cli, "load_model", load_model)

    def run(*flags):
        code = sample_cli.main(["--hf=tiny", *flags])
        got = capsys.readouterr()
        return code, got.out, got.err.splitlines(), loaded
    return run


@pytest.mark.parametrize("flags,message", [
    (["--temperature=0", "--final_temperature=0.3"],
     "--temperature=0 is greedy: --final_temperature would be ignored"),
    (["--temperature=0", "--schedule=linear", "--final_temperature=0.3"],
     "--temperature=0 is greedy: --schedule/--final_temperature would be ignored"),
    (["--schedule=linear"],
     "--schedule=linear needs --final_temperature (the temperature it anneals to)"),
    (["--final_temperature=0.3"],
     ("--final_temperature needs --schedule=linear or --schedule=exponential (with the "
      "constant schedule it would be ignored)")),
    (["--ban=1,abc"],
     "--ban: 'abc' is not a token id (give comma-separated integers, e.g. --ban=198,50256)"),
    (["--ban=-3"], "--ban: token id -3 is negative"),
    (["--batch_size=0"], "--batch_size must be >= 1, got 0"),
    (["--num_beams=2", "--final_temperature=0.3"],
     ("beam search is deterministic here: it cannot combine with "
      "--temperature/--top_k/--top_p/--min_p/--schedule/--final_temperature"))])
def test_cli_flags_that_would_be_ignored_or_are_malformed_are_one_line_errors(cli, flags,
                                                                             message):
    code, out, err, loaded = cli("--prompt=ab", *flags)
    assert (code, out, err, loaded) == (1, "", [f"error: {message}"], [])


@pytest.mark.parametrize("flags,message", [
    (["--temperature=nan"], "temperature must be finite, got nan"),
    (["--schedule=linear", "--final_temperature=nan"], "final_temperature must be finite, got nan"),
    (["--temperature=inf", "--ban=5"], "temperature must be finite, got inf"),
    (["--num_beams=3", "--length_penalty=nan"], "length_penalty must be finite, got nan"),
    (["--seed=-1"], "--seed must be in [0, 4294967296), got -1"),
    (["--seed=4294967297"], "--seed must be in [0, 4294967296), got 4294967297"),
    (["--seed=18446744073709551616"],
     "--seed must be in [0, 4294967296), got 18446744073709551616"),
    (["--prompt=cd", "--prompt=ef", "--batch_size=2", "--seed=4294967295"],
     "--seed must be in [0, 4294967294), got 4294967295 (the batch from prompt 2 uses seed + 2)")],
    ids=["temperature-nan", "final-nan", "temperature-inf", "length-nan", "seed-negative",
         "seed-2**32+1", "seed-2**64", "seed+batch"])
def test_cli_non_finite_values_and_seeds_beyond_32_bits_are_one_line_errors(cli, flags, message):
    code, out, err, loaded = cli("--prompt=ab", *flags)
    assert (code, out, err, loaded) == (1, "", [f"error: {message}"], [])


def test_sampling_schedule_messages_say_what_is_missing():
    with pytest.raises(ValueError, match="schedule 'linear' needs a final_temperature"):
        sample.Sampling(schedule="linear")
    with pytest.raises(ValueError, match="final_temperature=0.3 needs a linear or exponential "
                                         "schedule; the constant one would ignore it"):
        sample.Sampling(final_temperature=0.3)


def test_cli_too_long_prompt_names_its_place_and_the_truncate_flag(cli, tiny_cfg):
    tail = "context of 32 allows 28 (--truncate keeps the last 28)"
    code, out, err, _ = cli("--prompt=ab", "--prompt=cd", "--prompt=" + "x" * 30,
                            "--max_new_tokens=4", "--temperature=0")
    assert (code, out) == (1, "")     # checked before the first prompt is decoded
    assert err == [f"error: prompt 2 has 30 tokens; with --max_new_tokens=4 the model's {tail}"]
    code, out, _, _ = cli("--prompt=" + "x" * 30, "--max_new_tokens=4", "--temperature=0",
                          "--truncate")
    assert code == 0 and out.startswith("x" * 30)
    with pytest.raises(ValueError, match=r"allows 28 \(truncate=True keeps the last 28\)"):
        sample.pad_prompts(tiny_cfg, [[1] * 30], 4)


def test_prompts_file_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"ab\n\n  \r\ncd\r\n\t\nef")
    assert sample_cli.read_prompts(str(path)) == ["ab", "cd", "ef"]
    path.write_bytes(b"\n \n")
    with pytest.raises(ValueError, match="prompts.txt: no prompts \\(blank lines are skipped"):
        sample_cli.read_prompts(str(path))


def test_cli_every_prompt_has_its_header_whatever_the_batching(cli, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("ab\n\ncd\nef\n\ngh\n")
    outputs = {}
    for batch in (3, 1):
        code, out, _, _ = cli(f"--prompts_file={path}", f"--batch_size={batch}",
                              "--max_new_tokens=3", "--temperature=0")
        assert code == 0
        lines = [line for line in out.splitlines() if not line.startswith("[")]   # no stats
        assert lines[0::2] == [f"--- prompt {i}" for i in range(4)], out
        outputs[batch] = lines
    assert outputs[3] == outputs[1]
    assert [line[:2] for line in outputs[1][1::2]] == ["ab", "cd", "ef", "gh"]
