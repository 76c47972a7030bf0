"""Mesh construction and strict logical-axis rules."""

import jax
import pytest
from flax import nnx

from jaxgpt import model, sharding


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
