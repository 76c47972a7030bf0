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


@pytest.mark.parametrize("options", [{"attention": "dot_product"}, {"attention": "cudnn"},
                                     {"remat": "full"},
                                     {"scan_layers": True, "remat": "dots_saveable",
                                      "attention": "dot_product"}], ids=str)
def test_options_give_the_same_logits_and_grads(baseline, options):
    want = baseline
    got = _loss_and_grads(dataclasses.replace(TINY, **options), TOKENS)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert_trees_close(got[2], want[2], rtol=1e-4, atol=1e-6)


def test_dot_product_asks_a_gpu_for_cudnn_and_falls_back_to_xla_where_refused(
        baseline, monkeypatch, caplog):
    # This machine's jax has no cuDNN, so a GPU backend stood in for here sees cuDNN refuse
    # (RuntimeError "cuDNN is not detected"), as a GPU refuses float32 or a head too large.
    asked = []
    real = jax.nn.dot_product_attention

    def recorded(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return real(*args, implementation=implementation, **kwargs)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(model, "gpu_capability", lambda: 9.0)     # an H100
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    monkeypatch.setattr(model, "_CUDNN_REFUSED", [])
    with caplog.at_level("WARNING"):
        got = _loss_and_grads(dataclasses.replace(TINY, attention="dot_product"), TOKENS)
    assert asked == ["cudnn", None] * TINY.n_layer      # each layer: cuDNN first, then XLA
    assert caplog.text.count("cuDNN refused") == 1 and "using XLA's" in caplog.text
    np.testing.assert_allclose(got[1], baseline[1], rtol=1e-5, atol=1e-5)
    # A GPU before Ampere is not asked: cuDNN would fail only when XLA compiles the step.
    monkeypatch.setattr(model, "gpu_capability", lambda: 7.0)    # a V100
    asked.clear()
    _loss_and_grads(dataclasses.replace(TINY, attention="dot_product"), TOKENS)
    assert asked == [None] * TINY.n_layer
    # "cudnn" insists (this machine: no cuDNN; a GPU: float32 is refused).
    with pytest.raises((RuntimeError, NotImplementedError), match="cuDNN|fp16"):
        _loss_and_grads(dataclasses.replace(TINY, attention="cudnn"), TOKENS)


def _padded_and_cached_logits(cfg, tokens, mask):
    graphdef, params = nnx.split(model.GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    @jax.jit
    def run(params):
        gpt = nnx.merge(graphdef, params)
        padded, _ = gpt(tokens, attention_mask=mask)
        _, cache = gpt(tokens[:, :8], cache=model.KVCache.create(cfg, 2, 16))
        decoded, _ = gpt(tokens[:, 8:9], cache=cache)
        return padded, decoded

    return run(params)


def test_fused_attention_with_padding_and_cache_equals_einsum():
    mask = np.arange(12)[None, :] >= np.array([[0], [5]])       # row 1 left-padded
    want = _padded_and_cached_logits(TINY, TOKENS[:, :12], mask)
    got = _padded_and_cached_logits(dataclasses.replace(TINY, attention="dot_product"),
                                    TOKENS[:, :12], mask)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value", [("remat", "some"), ("attention", "flash")])
def test_bad_options_are_named(field, value):
    with pytest.raises(ValueError, match=f"model.{field} must be one of .*{value!r}"):
        dataclasses.replace(TINY, **{field: value})
    for attention in ("dot_product", "cudnn"):
        with pytest.raises(ValueError, match="attn_pdrop must be 0"):
            dataclasses.replace(TINY, attention=attention, attn_pdrop=0.1)


def test_cudnn_attention_is_refused_for_training_off_a_gpu():
    from jaxgpt import checks
    from jaxgpt import config as config_lib
    config = config_lib.base_config()
    config.data.block_size = TINY.n_positions
    cfg = dataclasses.replace(TINY, attention="cudnn")
    with pytest.raises(ValueError, match="attention='cudnn' trains only on a GPU \\(this "
                                         "backend is cpu\\)"):
        checks.validate_config(config, cfg, jax.device_count())


def _matmul_dtypes(cfg, batch: int = 8) -> list[tuple[str, str]]:
    """Operand dtypes of every matmul of one train step as `jax.export` lowers it for CUDA
    (no GPU needed: lowering is not compiling)."""
    import re

    from jaxgpt import sharding, train
    tx = train.make_optimizer(train.OptimConfig(warmup_steps=0), 10)
    trainer = train.make_trainer(cfg, tx, sharding.make_mesh((-1, 1, 1)), sharding.RULES["dp"],
                                 seed=0)
    windows = jax.ShapeDtypeStruct((1, batch, cfg.n_positions + 1), jnp.int32)
    lowered = jax.export.export(trainer.train_step, platforms=["cuda"])(
        jax.eval_shape(trainer.init), windows)
    return re.findall(r"stablehlo\.dot_general [^\n]*? : \(tensor<(?:\d+x)+(\w+)>, "
                      r"tensor<(?:\d+x)+(\w+)>\)", lowered.mlir_module())


def test_a_bfloat16_step_lowered_for_a_gpu_has_only_bfloat16_matmuls():
    # A float32 operand would put that matmul off the GPU's bf16 tensor-core path; the step
    # has 6 per layer and the head's 3 at least, and none may be float32 (attention, fused
    # head + loss and the hand-written backward passes included).
    dtypes = _matmul_dtypes(dataclasses.replace(TINY, dtype="bfloat16"))
    assert len(dtypes) >= 6 * TINY.n_layer + 3
    assert set(dtypes) == {("bf16", "bf16")}, sorted(set(dtypes))
