"""Orbax checkpoints of the whole run: TrainState, data-iterator state and metadata.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. `state` is the TrainState pytree
(params, optimizer moments, step, RNG), restored straight into its shardings; `data` is the
grain iterator position (exact resume); `meta` holds the config and tokenizer fingerprint.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt import model


def make_manager(workdir: str, *, keep: int, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save(manager: ocp.CheckpointManager, state, data_state: dict, meta: dict) -> None:
    """Save at `state.step`; a save orbax declines (step already present) is an error."""
    step = int(jax.device_get(state.step))
    saved = manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))
    if not saved:
        raise RuntimeError(f"checkpoint for step {step} was not written (orbax declined it; "
                           f"latest is {manager.latest_step()})")
    manager.wait_until_finished()
    logging.info("saved checkpoint at step %d", step)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    return manager.latest_step()


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restore (state, data_state, meta) at `step` (default: the latest) into the shardings
    carried by `abstract_state` (a tree of jax.ShapeDtypeStruct with .sharding)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out.state, out.data, out.meta


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """The metadata of a checkpoint without touching its arrays (for tools like sampling)."""
    manager = make_manager(workdir, keep=1, create=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    out = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return step, out.meta


def load_params(workdir: str, step: int | None = None):
    """(GPTConfig, params nnx.State, step, meta) of a run's checkpoint, for inference tools.

    Only the params subtree is read (not the optimizer moments), onto the default device.
    """
    step, meta = read_meta(workdir, step)
    cfg = model.GPTConfig(**meta["config"]["model"])
    abstract = nnx.state(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    manager = make_manager(workdir, keep=1, create=False)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)}
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
            partial_restore=True)))
    return cfg, out.state["params"], step, meta
