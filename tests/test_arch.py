"""Newer architecture options: each one against a numpy reference or an invariance.

Every option is checked alone and all together: cached decode = full forward, causality,
8-device fsdp_tp sharding = one device; RoPE/RMSNorm/SwiGLU against numpy; grouped-query
attention against plain attention with the same weights; all but the parallel block together
against PyTorch's Qwen3 (transformers); resume and sampling end to end.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import model, sample, sharding, train
from jaxgpt.convert import hf
from tests import helpers

ALL = {"rotary": True, "rope_theta": 500.0, "rms_norm": True, "swiglu": True,
       "ffn_multiple_of": 16, "bias": False, "tie_embeddings": False, "n_kv_head": 2,
       "qk_norm": True, "parallel_block": True}
OPTIONS = {
    "rotary": {"rotary": True, "rope_theta": 500.0},
    "rms_norm": {"rms_norm": True},
    "swiglu": {"swiglu": True, "ffn_multiple_of": 16},
    "no_bias": {"bias": False},
    "untied": {"tie_embeddings": False},
    "gqa": {"n_kv_head": 2},
    "qk_norm": {"qk_norm": True},
    "parallel": {"parallel_block": True},
    "all": ALL,
}
GPT2_124M = 124_439_808


def _cfg(**options):
    # vocab 96: divisible by the 8 devices of the sharded test, so all tests share compiles.
    tiny = {"vocab_size": 96, "n_positions": 32, "n_embd": 48, "n_layer": 2, "n_head": 4}
    return model.GPTConfig(**(tiny | options))


def _init(cfg, seed):
    """Random parameters from numpy: every leaf (biases, norm scales included) is noisy, so
    a weight the code ignores would change nothing and fail the parity checks. (Built on the
    host: compiling a jitted init with one RNG call per leaf costs seconds per config.)"""
    rng = np.random.default_rng(seed)
    params = nnx.state(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)

    def draw(path, leaf):
        centre = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(centre + 0.05 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def _split(cfg, seed=0):
    return sample.graphdef_of(cfg), _init(cfg, seed)


def _model(cfg, seed=0):
    return nnx.merge(*_split(cfg, seed))


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(params, tokens, cache=None, positions=None, mask=None, *, graphdef):
    """Compiled once per (model, shapes) and shared by the tests below."""
    return nnx.merge(graphdef, params)(tokens, cache=cache, positions=positions,
                                       attention_mask=mask)


@pytest.mark.parametrize("name", OPTIONS)
def test_cached_decode_equals_full_forward(name, key):
    cfg = _cfg(**OPTIONS[name])
    graphdef, params = _split(cfg)
    forward = functools.partial(_forward, params, graphdef=graphdef)
    tokens = jax.random.randint(key, (4, 12), 0, cfg.vocab_size)
    full, _ = forward(tokens)
    cache = model.KVCache.create(cfg, 4, 16)
    assert [k.shape for k in cache.k] == [(4, cfg.kv_heads, 16, 12)] * 2
    logits, cache = forward(tokens[:, :8], cache)    # prefill, then one token at a time
    parts = [logits]
    for t in range(8, 12):
        logits, cache = forward(tokens[:, t:t + 1], cache)
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("name", OPTIONS)
def test_future_tokens_never_change_earlier_logits(name, key):
    cfg = _cfg(**OPTIONS[name])
    graphdef, params = _split(cfg)
    tokens = jax.random.randint(key, (4, 12), 0, cfg.vocab_size)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 5) % cfg.vocab_size)
    a, _ = _forward(params, tokens, graphdef=graphdef)
    b, _ = _forward(params, changed, graphdef=graphdef)
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


@pytest.mark.parametrize("name", OPTIONS)
def test_sharded_equals_unsharded(name, key):
    """8 devices, fsdp_tp on (data 1, fsdp 4, tensor 2): heads, kv_heads, mlp, vocab split."""
    cfg = _cfg(**OPTIONS[name])
    graphdef, params = _split(cfg)
    tokens = jax.random.randint(key, (4, 12), 0, cfg.vocab_size)
    ref, _ = _forward(params, tokens, graphdef=graphdef)
    forward = lambda p, t: nnx.merge(graphdef, p)(t)[0]
    mesh = sharding.make_mesh((1, 4, 2))
    rules = sharding.RULES["fsdp_tp"]
    shardings = sharding.tree_shardings(params, mesh, rules)
    sharded = jax.device_put(params, shardings)
    out = jax.jit(forward, in_shardings=(shardings, sharding.batch_sharding(mesh, rules)))(
        sharded, tokens)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_padding_is_masked_out_with_every_option(key):
    """Left padding with a mask and shifted positions gives the unpadded logits (RoPE uses
    each row's own positions, not cache slots)."""
    cfg = _cfg(**ALL)
    graphdef, params = _split(cfg)
    tokens = jax.random.randint(key, (1, 10), 0, cfg.vocab_size)
    ref, _ = _forward(params, tokens, graphdef=graphdef)
    padded = jnp.concatenate([jnp.full((1, 6), 5), tokens], axis=1)
    mask = jnp.arange(16)[None] >= 6
    pos = jnp.maximum(jnp.arange(16) - 6, 0)[None]
    out, _ = _forward(params, padded, None, pos, mask, graphdef=graphdef)
    np.testing.assert_allclose(out[:, 6:], ref, atol=1e-5)


def _np_rope(x, positions, theta):
    """LLaMA's complex form on the half-split pairs: z_j = x_j + i x_{j+K/2} times
    exp(i pos theta^(-2j/K))."""
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[..., None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_numpy(key):
    x = np.asarray(jax.random.normal(key, (2, 5, 3, 8)))            # [B, T, H, K]
    positions = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 30, 31]])
    tables = model.rope_tables(jnp.asarray(positions), 8, 100.0)
    out = model.apply_rope(jnp.asarray(x), tables)
    np.testing.assert_allclose(out, _np_rope(x, positions[:, :, None], 100.0), atol=1e-5)


def test_rope_scores_depend_only_on_the_offset(key):
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (1, 1, 1, 16))
    k = jax.random.normal(kk, (1, 1, 1, 16))

    def score(m, n):
        rq = model.apply_rope(q, model.rope_tables(jnp.array([[m]]), 16, 10000.0))
        rk = model.apply_rope(k, model.rope_tables(jnp.array([[n]]), 16, 10000.0))
        return float(jnp.sum(rq * rk))

    for offset in (0, 3, 17):
        scores = [score(n + offset, n) for n in (0, 5, 40, 200)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-5)
    assert abs(score(3, 0) - score(0, 0)) > 1e-3   # the offset itself does matter


def test_rms_norm_matches_numpy(key):
    cfg = _cfg(rms_norm=True)
    norm = _model(cfg).ln_f
    x = np.asarray(jax.random.normal(key, (2, 3, 48))) * 3 + 1
    scale = np.asarray(norm.scale[...])
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.layer_norm_epsilon) * scale
    np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    assert set(nnx.state(norm, nnx.Param)) == {"scale"}   # no bias, no centring


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_matches_numpy(bias, key):
    cfg = _cfg(swiglu=True, ffn_multiple_of=16, bias=bias)
    mlp = _model(cfg).h[0].mlp
    x = np.asarray(jax.random.normal(key, (2, 3, 48)))
    p = {name: {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(lin)).items()}
         for name, lin in (("fc", mlp.c_fc), ("gate", mlp.c_gate), ("proj", mlp.c_proj))}
    lin = lambda h, n: h @ p[n]["kernel"] + (p[n]["bias"] if bias else 0)
    gate = lin(x, "gate")
    want = lin(gate / (1 + np.exp(-gate)) * lin(x, "fc"), "proj")
    np.testing.assert_allclose(mlp(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    assert ("bias" in p["fc"]) == bias


@pytest.mark.parametrize("n_embd, multiplier, multiple_of, width", [
    (4096, 1.0, 256, 11008),    # LLaMA-7B
    (5120, 1.0, 256, 13824),    # LLaMA-13B
    (8192, 1.0, 256, 22016),    # LLaMA-65B
    (8192, 1.3, 4096, 28672),   # LLaMA-2-70B
])
def test_swiglu_width_follows_llama(n_embd, multiplier, multiple_of, width):
    cfg = model.GPTConfig(n_embd=n_embd, n_head=32, swiglu=True,
                          ffn_dim_multiplier=multiplier, ffn_multiple_of=multiple_of)
    assert cfg.mlp_width == width


def _gpt2_to_gqa(params, n_kv_head):
    """Rearrange GPT-2's fused c_attn [D, 3, H, K] into c_q [D, H, K] and c_kv
    [D, 2, G, K]; each group's k/v is taken from the first of its R query heads."""
    params = jax.tree.map(lambda x: x, params)
    for block in params["h"].values():
        attn = block["attn"]
        fused = attn.pop("c_attn")
        r = fused["kernel"].shape[2] // n_kv_head
        attn["c_q"] = {"kernel": fused["kernel"][:, 0], "bias": fused["bias"][0]}
        attn["c_kv"] = {"kernel": fused["kernel"][:, 1:, ::r], "bias": fused["bias"][1:, ::r]}
    return params


def _tie_kv_heads(params, n_kv_head):
    """GPT-2 params whose k/v heads repeat within each group of R = H / G query heads."""
    def tie(x, axis):
        h = x.shape[axis]
        first = np.take(x, np.arange(0, h, h // n_kv_head), axis=axis)
        return np.repeat(first, h // n_kv_head, axis=axis)

    params = jax.tree.map(np.array, params)   # writable copies
    for block in params["h"].values():
        c = block["attn"]["c_attn"]
        c["kernel"][:, 1:] = tie(c["kernel"][:, 1:], 2)
        c["bias"][1:] = tie(c["bias"][1:], 1)
    return params


def _state(cfg, pure_params):
    state = nnx.state(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    nnx.replace_by_pure_dict(state, pure_params)
    return state


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gqa_equals_plain_attention_with_the_same_weights(n_kv_head, key):
    """n_kv_head = n_head is plain attention exactly; fewer k/v heads equal plain attention
    whose k/v heads repeat within each group (query head h reads k/v head h // R)."""
    graphdef, params = _split(_cfg())
    params = nnx.to_pure_dict(params)
    if n_kv_head < 4:
        params = _tie_kv_heads(params, n_kv_head)
    gqa_cfg = _cfg(n_kv_head=n_kv_head)
    tokens = jax.random.randint(key, (4, 12), 0, 96)
    want, _ = _forward(_state(_cfg(), params), tokens, graphdef=graphdef)
    got, _ = _forward(_state(gqa_cfg, _gpt2_to_gqa(params, n_kv_head)), tokens,
                      graphdef=sample.graphdef_of(gqa_cfg))
    if n_kv_head == 4:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_options_change_exactly_the_parameters_they_should():
    def names(cfg):
        pure = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
            lambda: model.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param))
        return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)}

    base, mod = names(_cfg()), names(_cfg(**ALL))
    assert "['wpe']['embedding']" in base and "['wpe']['embedding']" not in mod
    assert "['lm_head']" in mod and "['lm_head']" not in base
    assert not any("bias" in n for n in mod)
    assert "['h'][0]['attn']['c_kv']['kernel']" in mod and not any("c_attn" in n for n in mod)
    assert "['h'][0]['attn']['q_norm']['scale']" in mod
    assert not any("ln_2" in n for n in mod) and "['h'][0]['mlp']['c_gate']['kernel']" in mod
    gpt = nnx.eval_shape(lambda: model.GPT(_cfg(**ALL), rngs=nnx.Rngs(0)))
    assert gpt.lm_head.get_metadata()["out_sharding"] == ("embed", "vocab")
    assert gpt.h[0].attn.c_kv.kernel.get_metadata()["out_sharding"][2] == "kv_heads"


def test_modern_124m_matches_the_gpt2_budget():
    """modern-124M has 124,732,416 parameters: GPT-2 small's 124,439,808 + 0.24%."""
    cfg = model.modern_config("small")
    abstract = nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0)))
    n = model.count_params(nnx.state(abstract, nnx.Param))
    assert abs(n / GPT2_124M - 1) < 0.03, n
    assert cfg.rotary and cfg.rms_norm and cfg.swiglu and cfg.qk_norm and not cfg.bias
    assert cfg.kv_heads < cfg.n_head


def test_non_gpt2_options_are_listed():
    assert model.non_gpt2_options(model.gpt2_config("small")) == []
    listed = model.non_gpt2_options(_cfg(**ALL))
    for option in ("rotary=True", "n_kv_head=2", "tie_embeddings=False", "bias=False",
                   "parallel_block=True", "qk_norm=True", "rms_norm=True", "swiglu=True"):
        assert option in listed


@pytest.mark.parametrize("change, match", [
    ({"n_kv_head": 3}, r"n_kv_head \(3\).*n_head \(4\)"),
    ({"n_kv_head": -1}, "n_kv_head"),
    ({"rotary": True, "n_embd": 36}, "even head_dim, got 9"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"ffn_multiple_of": 0}, "ffn_multiple_of"),
    ({"ffn_dim_multiplier": -1.0}, "ffn_dim_multiplier"),
    ({"qk_norm": "yes"}, "qk_norm must be True or False, got 'yes'"),
])
def test_bad_option_names_the_field(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _cfg(**change)


def test_generate_with_every_option_equals_greedy_full_forward(key):
    """The sampler's cached decode reproduces argmax over repeated full forwards."""
    cfg = _cfg(**ALL)
    graphdef, params = _split(cfg)
    prompts = [[3, 14, 15, 92], [6, 5]]
    out = sample.generate(cfg, params, prompts, max_new_tokens=5,
                          method=sample.Sampling(temperature=0.0))
    for prompt, got in zip(prompts, out):
        # Greedy means each new token is the argmax of a cache-free forward over the text so
        # far; one teacher-forced call checks all five.
        seq = jnp.asarray([prompt + got])
        logits, _ = _forward(params, seq, graphdef=graphdef)
        assert np.argmax(logits[0, len(prompt) - 1:-1], axis=-1).tolist() == got


def test_beam_search_with_every_option_equals_a_numpy_two_step_beam(key):
    """Two steps of 4-beam search: the best of the 4 most likely first tokens times every
    second token, scored by cache-free forwards."""
    cfg = _cfg(**ALL)
    graphdef, params = _split(cfg)
    prompt = [3, 14, 15, 92]
    out = sample.generate(cfg, params, [prompt], max_new_tokens=2,
                          method=sample.Beam(num_beams=4))
    logp = lambda seqs: np.asarray(jax.nn.log_softmax(
        _forward(params, jnp.asarray(seqs), graphdef=graphdef)[0][:, -1], axis=-1))
    first = logp([prompt])[0]
    firsts = np.argsort(-first)[:4]
    second = logp([prompt + [int(t)] for t in firsts])            # [4, V]
    total = first[firsts][:, None] + second
    b, u = np.unravel_index(np.argmax(total), total.shape)
    assert out == [[int(firsts[b]), int(u)]]


def test_hf_export_and_import_refuse_non_gpt2_options():
    cfg = _cfg(rotary=True, n_kv_head=2)
    params = _init(cfg, 0)
    with pytest.raises(ValueError, match="no mapping for rotary=True, n_kv_head=2"):
        hf.hf_tensors(cfg, params)
    with pytest.raises(ValueError, match="do not fit config.model with rotary=True"):
        hf.init_params("hf:gpt2", cfg, params)


@pytest.mark.slow
def test_every_option_trains_and_resumes_exactly(tmp_path):
    """train_and_evaluate with all options (GQA over 8 data-parallel devices): a run
    stopped at step 3 and resumed equals the uninterrupted run, bit for bit."""
    corpus = helpers.small_corpus(tmp_path)
    options = {f"model__{k}": v for k, v in dataclasses.asdict(model.GPTConfig(
        n_head=2, n_embd=32, **(ALL | {"n_kv_head": 1}))).items() if k in ALL}
    run = lambda steps, name: train.train_and_evaluate(helpers.tiny_run_config(
        corpus, train__steps=steps, checkpoint__every=3, **options), str(tmp_path / name))
    straight = run(6, "a")
    run(3, "b")
    resumed = run(6, "b")
    assert "lm_head" in straight["state"].params and "wpe" not in straight["state"].params
    assert (tmp_path / "a" / "samples.txt").exists()   # the sampler ran on the trained model
    helpers.assert_trees_close(jax.device_get(straight["state"]),
                               jax.device_get(resumed["state"]), rtol=0, atol=0)


@pytest.mark.parametrize("speed", [{"attention": "dot_product"}, {"remat": "full"},
                                   {"scan_layers": True, "remat": "dots_saveable"}], ids=str)
def test_every_option_with_speed_options_gives_the_same_loss_and_grads(speed, key):
    """The fused attention kernel (with grouped k/v heads), remat and scanned layers change
    no numbers with every architecture option on; the fused kernel also decodes."""
    cfg = _cfg(**ALL)
    fast = dataclasses.replace(cfg, **speed)
    params = _init(cfg, 0)
    windows = jax.random.randint(key, (4, 13), 0, cfg.vocab_size)

    def loss_and_grads(c):
        graphdef = sample.graphdef_of(c)
        return jax.jit(jax.value_and_grad(lambda p: train.loss_fn(p, graphdef, windows)))(params)

    (want, want_g), (got, got_g) = loss_and_grads(cfg), loss_and_grads(fast)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    helpers.assert_trees_close(got_g, want_g, atol=1e-5, rtol=1e-4)
    if "attention" in speed:
        graphdef = sample.graphdef_of(fast)
        full, _ = _forward(params, windows[:, :12], graphdef=graphdef)
        cache = model.KVCache.create(fast, 4, 16)
        first, cache = _forward(params, windows[:, :8], cache, graphdef=graphdef)
        rest, _ = _forward(params, windows[:, 8:12], cache, graphdef=graphdef)
        np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), full, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_modern_options_match_pytorch_qwen3(tie):
    """The newer components together (RoPE, RMSNorm, SwiGLU, no biases, grouped-query
    attention, QK-norm) are Qwen3's decoder: against transformers' Qwen3ForCausalLM with the
    same random weights, logits agree on a full and on a left-padded batch (position ids
    from the mask, as generation passes them)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _cfg(**{k: v for k, v in ALL.items() if k != "parallel_block"} | {"tie_embeddings": tie})
    params = _init(cfg, seed=5)
    D, H, G, K = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim
    hf_config = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=D, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.n_layer, num_attention_heads=H, num_key_value_heads=G,
        head_dim=K, max_position_embeddings=cfg.n_positions, rms_norm_eps=cfg.layer_norm_epsilon,
        tie_word_embeddings=tie, attention_bias=False, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    ref = transformers.Qwen3ForCausalLM(hf_config).eval()
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    t = lambda a: torch.as_tensor(np.array(a))   # a writable copy
    weights = {"model.embed_tokens.weight": t(p["wte"]["embedding"]),
               "model.norm.weight": t(p["ln_f"]["scale"])}
    if not tie:
        weights["lm_head.weight"] = t(p["lm_head"].T)
    for i in range(cfg.n_layer):
        b, pre = p["h"][i], f"model.layers.{i}."
        kv = b["attn"]["c_kv"]["kernel"]                                      # [D, 2, G, K]
        weights |= {
            pre + "self_attn.q_proj.weight": t(b["attn"]["c_q"]["kernel"].reshape(D, H * K).T),
            pre + "self_attn.k_proj.weight": t(kv[:, 0].reshape(D, G * K).T),
            pre + "self_attn.v_proj.weight": t(kv[:, 1].reshape(D, G * K).T),
            pre + "self_attn.o_proj.weight": t(b["attn"]["c_proj"]["kernel"].reshape(H * K, D).T),
            pre + "self_attn.q_norm.weight": t(b["attn"]["q_norm"]["scale"]),
            pre + "self_attn.k_norm.weight": t(b["attn"]["k_norm"]["scale"]),
            pre + "mlp.gate_proj.weight": t(b["mlp"]["c_gate"]["kernel"].T),
            pre + "mlp.up_proj.weight": t(b["mlp"]["c_fc"]["kernel"].T),
            pre + "mlp.down_proj.weight": t(b["mlp"]["c_proj"]["kernel"].T),
            pre + "input_layernorm.weight": t(b["ln_1"]["scale"]),
            pre + "post_attention_layernorm.weight": t(b["ln_2"]["scale"])}
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (tie or not missing)

    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 12))
    mask = np.ones((2, 12), bool)
    mask[1, :5] = False                                                     # left padding
    for m in (np.ones_like(mask), mask):
        positions = np.maximum(np.cumsum(m, axis=1) - 1, 0)
        with torch.no_grad():
            want = ref(input_ids=t(tokens), attention_mask=t(m.astype(np.int64)),
                       position_ids=t(positions)).logits.numpy()
        with jax.default_matmul_precision("highest"):
            got = np.asarray(_forward(params, jnp.asarray(tokens), positions=jnp.asarray(positions),
                                      mask=jnp.asarray(m), graphdef=sample.graphdef_of(cfg))[0])
        np.testing.assert_allclose(got[m], want[m], rtol=0, atol=1e-4 * np.abs(want).max())
