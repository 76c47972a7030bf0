"""Mesh construction and strict logical-axis rules."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgpt import checkpoint, model, sharding, train
from tests import helpers
from tests.helpers import assert_trees_close


def test_mesh_fills_the_minus_one():
    assert sharding.resolve_mesh_shape((2, -1, 1), 8) == (2, 4, 1)
    mesh = sharding.make_mesh((-1, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("shape, match", [((3, -1, 1), "does not divide"),
                                          ((-1, -1, 1), "at most one -1"),
                                          ((2, 2), "3 entries"), ((1, 2, 2), "uses 4")])
def test_bad_mesh_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.resolve_mesh_shape(shape, 8)


def test_logical_to_spec_is_strict():
    rules = sharding.RULES["fsdp_tp"]
    assert sharding.logical_to_spec(("batch", "seq"), rules) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None)
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        sharding.logical_to_spec(("embd",), rules)
    with pytest.raises(ValueError, match="'fsdp' used twice"):
        sharding.logical_to_spec(("embed", "batch"), rules)


def test_indivisible_parameter_is_named():
    cfg = model.GPTConfig(vocab_size=97, n_positions=32, n_embd=64, n_layer=1, n_head=8)
    abstract = nnx.state(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    mesh = sharding.make_mesh((1, 1, 8))
    with pytest.raises(ValueError, match=r"\['wte'\]\['embedding'\].*97.*tensor"):
        sharding.tree_shardings(abstract, mesh, sharding.RULES["fsdp_tp"])


# --- sharded training equals one device ------------------------------------------------

SHARDED_CFG = model.GPTConfig(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4)
P = jax.sharding.PartitionSpec
# The layout each rule set must give every parameter, written out by hand from the rules'
# meaning (Megatron: c_attn/c_fc column-split over tensor, c_proj row-split), not computed
# by the code under test. Keys are the parameter's last two path entries.
EXPECTED_SPECS = {
    "dp": {},
    "fsdp": {
        ("wte", "embedding"): P(None, "fsdp"), ("wpe", "embedding"): P(None, "fsdp"),
        ("c_attn", "kernel"): P("fsdp"), ("attn.c_proj", "kernel"): P(None, None, "fsdp"),
        ("attn.c_proj", "bias"): P("fsdp"), ("c_fc", "kernel"): P("fsdp"),
        ("mlp.c_proj", "kernel"): P(None, "fsdp"), ("mlp.c_proj", "bias"): P("fsdp"),
        ("ln", "scale"): P("fsdp"), ("ln", "bias"): P("fsdp"),
    },
    "fsdp_tp": {
        ("wte", "embedding"): P("tensor", "fsdp"), ("wpe", "embedding"): P(None, "fsdp"),
        ("c_attn", "kernel"): P("fsdp", None, "tensor"), ("c_attn", "bias"): P(None, "tensor"),
        ("attn.c_proj", "kernel"): P("tensor", None, "fsdp"), ("attn.c_proj", "bias"): P("fsdp"),
        ("c_fc", "kernel"): P("fsdp", "tensor"), ("c_fc", "bias"): P("tensor"),
        ("mlp.c_proj", "kernel"): P("tensor", "fsdp"), ("mlp.c_proj", "bias"): P("fsdp"),
        ("ln", "scale"): P("fsdp"), ("ln", "bias"): P("fsdp"),
    },
}


def _expected_spec(keys: list[str], rules: str) -> P:
    """The hand-written spec for a param/moment leaf from its path keys (default replicated)."""
    leaf = keys[-1]
    for (owner, name), spec in EXPECTED_SPECS[rules].items():
        if name != leaf:
            continue
        if owner in keys or "." in owner and owner.split(".") == keys[-3:-1] or (
                owner == "ln" and any(k.startswith("ln_") for k in keys)):
            return spec
    return P()


def _keys(path) -> list[str]:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return keys[:-1] if keys[-1] == "value" else keys   # nnx.Variable's own leaf


def _run(cfg, mesh_shape, rules, steps=3, optimizer="adamw"):
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    # eps well above float32 noise: the key bias has an exactly-zero true gradient (softmax is
    # shift-invariant), and Adam would blow its reduction-order noise up to lr-sized steps.
    tx = (optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.1) if optimizer == "adamw"
          else train.make_optimizer(train.OptimConfig(learning_rate=1e-2, warmup_steps=0,
                                                      eps=1e-3, grad_clip=0, optimizer=optimizer),
                                    steps))
    trainer = train.make_trainer(cfg, tx, mesh, sharding.RULES[rules], seed=0)
    state = trainer.init()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        windows = rng.integers(0, cfg.vocab_size, (1, 8, 17), dtype=np.int32)
        batch = train.to_global(windows, mesh, (None, "batch", None), trainer.rules)
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, np.array(losses)


@pytest.fixture(scope="module")
def one_device_run():
    _, state, losses = _run(SHARDED_CFG, (1, 1, 1), "dp")
    return jax.device_get(state.params), losses


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape, rules", [((8, 1, 1), "dp"), ((1, 8, 1), "fsdp"),
                                               ((2, 2, 2), "fsdp_tp"), ((1, 2, 4), "fsdp_tp")])
def test_sharded_steps_equal_one_device(one_device_run, mesh_shape, rules):
    trainer, state, losses = _run(SHARDED_CFG, mesh_shape, rules)
    _check_against(trainer, state, losses, *one_device_run, rules)


@pytest.mark.slow
def test_muon_sharded_steps_equal_one_device():
    """Newton-Schulz on matrices split over fsdp and tensor gives the one-device update.

    Its five matrix-polynomial iterations amplify float32 reduction-order noise: params agree
    to 1e-6 absolute, about 1e-4 of the ~6e-3 that three steps move them."""
    _, ref_state, ref_losses = _run(SHARDED_CFG, (1, 1, 1), "dp", optimizer="muon")
    trainer, state, losses = _run(SHARDED_CFG, (2, 2, 2), "fsdp_tp", optimizer="muon")
    _check_against(trainer, state, losses, jax.device_get(ref_state.params), ref_losses,
                   "fsdp_tp", moments=2, atol=1e-6)


def _check_against(trainer, state, losses, ref_params, ref_losses, rules, moments=3,
                   atol=1e-7):
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(jax.device_get(state.params), ref_params, rtol=1e-5, atol=atol)
    # Every parameter and every optimizer moment lives where the rules put it, after steps.
    checked = 0
    for tree in (state.params, state.opt_state):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            keys = _keys(path)
            spec = _expected_spec(keys, rules) if leaf.ndim else P()
            want = jax.sharding.NamedSharding(trainer.mesh, spec)
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (keys, leaf.sharding.spec)
            checked += 1
    # params + mu + nu (+ counts); Muon keeps one moment for its matrices.
    assert checked > moments * len(jax.tree.leaves(state.params))


@pytest.mark.slow
def test_layer_options_change_nothing_but_speed(one_device_run, tmp_path):
    """remat and scanned layers: same losses, same parameter tree (a checkpoint saved by the
    scanned model restores into the unrolled one)."""
    ref_params, ref_losses = one_device_run
    # Remat alone is also checked per policy at the model level (test_dist_model.py).
    cfg = dataclasses.replace(SHARDED_CFG, remat="dots_saveable", scan_layers=True)
    _, state, losses = _run(cfg, (2, 2, 2), "fsdp_tp")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(jax.device_get(state.params), ref_params, rtol=1e-5, atol=1e-7)
    ckpts = checkpoint.Checkpoints(str(tmp_path), keep=1, async_save=False)
    ckpts.save(state, {}, {})
    unrolled, _, _ = _run(SHARDED_CFG, (2, 2, 2), "fsdp_tp", steps=0)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(unrolled.init), unrolled.state_shardings)
    restored, _, _ = ckpts.restore(abstract, check_meta=lambda step, meta: None)
    ckpts.close()
    assert_trees_close(jax.device_get(restored.params), ref_params, rtol=1e-5, atol=1e-7)
    assert "h" in restored.params and 1 in restored.params["h"]


def test_rule_errors_name_the_parameter_before_compiling():
    cfg = model.GPTConfig(vocab_size=96, n_positions=32, n_embd=48, n_layer=1, n_head=4)
    abstract = nnx.state(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    mesh = sharding.make_mesh((1, 2, 4))
    reused = sharding.RULES["fsdp_tp"] | {"vocab": "fsdp"}     # wte is ('vocab', 'embed')
    with pytest.raises(ValueError, match=r"\['wte'\]\['embedding'\] \(96, 48\).*'fsdp' used"):
        sharding.tree_shardings(abstract, mesh, reused)
    unknown = {k: v for k, v in sharding.RULES["fsdp"].items() if k != "mlp"}
    with pytest.raises(ValueError, match=r"\['mlp'\]\['c_fc'\]\['bias'\] \(192,\).*'mlp'"):
        sharding.tree_shardings(abstract, mesh, unknown)
    with pytest.raises(ValueError, match=r"c_attn'\]\['bias'\] \(3, 4, 12\): dim 12 \(head_dim\) "
                                         r"not divisible by tensor \(8\)"):
        sharding.tree_shardings(abstract, sharding.make_mesh((1, 1, 8)),
                                sharding.RULES["dp"] | {"head_dim": "tensor"})
    with pytest.raises(ValueError, match="missing logical axes \\['mlp'\\]"):
        sharding.check_rules(unknown)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.check_rules(sharding.RULES["dp"] | {"heads": "model"})


def test_a_layout_that_does_not_divide_is_refused_before_the_workdir_is_made(tmp_path):
    """No tokenizer training or data preparation before the mesh is found wanting."""
    config = helpers.tiny_run_config(helpers.small_corpus(tmp_path), mesh__rules="fsdp_tp",
                                     mesh__shape=(1, 1, 8))
    with pytest.raises(ValueError, match=r"c_attn'\]\['bias'\] \(3, 2, 16\): dim 2 "
                                         r"\(heads\) not divisible by tensor \(8\)"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _temp_bytes(cfg, mesh_shape, rules, batch=32):
    trainer = train.make_trainer(cfg, optax.adamw(1e-3), sharding.make_mesh(mesh_shape),
                                 sharding.RULES[rules], 0)
    windows = jax.ShapeDtypeStruct((1, batch, cfg.n_positions + 1), np.int32)
    compiled = trainer.train_step.lower(jax.eval_shape(trainer.init), windows).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_fsdp_keeps_activations_as_data_parallel_does():
    """ZeRO-3 shards the weights, not the batch's activations: its per-device scratch memory
    is data parallel's, not that of activations all-gathered over whole global batches."""
    cfg = model.GPTConfig(vocab_size=1024, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    dp = _temp_bytes(cfg, (8, 1, 1), "dp")   # 10.0 MiB; FSDP's was 32.1 MiB unpinned
    for mesh_shape in ((1, 8, 1), (2, 4, 1)):
        assert _temp_bytes(cfg, mesh_shape, "fsdp") < 1.15 * dp, mesh_shape
