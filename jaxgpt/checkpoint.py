"""Orbax checkpoints of the whole run: TrainState, data-iterator state and metadata.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}` plus `integrity.json` (size and
CRC32 of every file, written once orbax has finalized the step). `state` is the TrainState
pytree (params, optimizer moments, step, RNG), restored straight into its shardings;
`data` is the grain iterator position (exact resume); `meta` holds the config, the
pipeline and tokenizer fingerprints, the jaxgpt version and git SHA.

orbax keeps reporting a corrupt newest step as the latest and never falls back, and it
silently declines saves at or below its latest step. `Checkpoints` therefore checks each
step before restoring it, moves bad or rolled-back steps aside (never deletes them) into
`WORKDIR/checkpoints.corrupt/` and `WORKDIR/checkpoints.rolledback/`, and treats a
declined or failed save as an error. It keeps the newest `keep` steps plus the best by
validation loss.
"""

import gc
import json
import logging
import os
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import jaxgpt
from jaxgpt import faults, model

log = logging.getLogger(__name__)

INTEGRITY = "integrity.json"
CORRUPT_DIR = "checkpoints.corrupt"
ROLLED_BACK_DIR = "checkpoints.rolledback"
_TMP_MARK = ".orbax-checkpoint-tmp"
# Files a finalized step always has; checked when it has no integrity.json yet (a kill
# between orbax's finalize and our checksum pass).
_REQUIRED = ("_CHECKPOINT_METADATA", "meta/metadata", "data/metadata", "state/_METADATA")


def provenance() -> dict:
    """jaxgpt version and the git SHA of the source tree (None outside a git checkout)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"jaxgpt_version": jaxgpt.__version__, "git_sha": sha}


def _file_crcs(directory: str) -> dict:
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel == INTEGRITY:
                continue
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            out[rel] = [os.path.getsize(path), crc]
    return out


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _integrity_record(directory: str) -> dict:
    """A step's integrity.json, or {} where it has none we wrote (no file, unreadable, or
    without its per-file records)."""
    try:
        with open(os.path.join(directory, INTEGRITY)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    ours = isinstance(record, dict) and isinstance(record.get("files"), dict)
    return record if ours else {}


def verify_step(directory: str, *, crc: bool = True) -> tuple[str | None, dict | None]:
    """(problem or None, meta) of a finalized step directory, from its files alone: each
    file of its `integrity.json` present at its size (and, with `crc`, its CRC32), else the
    files every step has; then its metadata readable."""
    if not os.listdir(directory):
        return "is an empty directory", None
    record = _integrity_record(directory)
    if record:
        for rel, (size, _) in record["files"].items():
            path = os.path.join(directory, rel)
            if not os.path.isfile(path):
                return f"is missing {rel}", None
            if os.path.getsize(path) != size:
                return f"has {rel} of {os.path.getsize(path)} bytes, not {size}", None
        if crc:
            for rel, (_, value) in _file_crcs(directory).items():
                if rel in record["files"] and record["files"][rel][1] != value:
                    return f"has {rel} failing its CRC32 check", None
    else:
        for rel in _REQUIRED:
            if not os.path.isfile(os.path.join(directory, rel)):
                return f"is missing {rel}", None
    try:
        with open(os.path.join(directory, "meta", "metadata")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return f"has unreadable meta/metadata ({e})", None
    return None, meta


class Checkpoints:
    """The run's checkpoint directory: async saves, verified restores, retention."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.workdir = os.path.abspath(workdir)
        self.root = os.path.join(self.workdir, "checkpoints")
        self.keep, self.async_save = keep, async_save
        self.primary = jax.process_index() == 0
        self._pending = None   # (step, val_loss): saved, not yet finalized and checksummed
        if self.primary:
            self._move_aside_tmp_dirs()
        _sync("jaxgpt_checkpoints_init")
        self.manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=self.async_save)
        return ocp.CheckpointManager(self.root, options=options)

    def _reload(self) -> None:
        self.manager.close()
        _sync("jaxgpt_checkpoints_reload")
        self.manager = self._make_manager()

    def steps(self) -> list[int]:
        """Step directories present (finalized or not), oldest first."""
        if not os.path.isdir(self.root):
            return []
        return sorted(int(n) for n in os.listdir(self.root)
                      if n.isdigit() and os.path.isdir(os.path.join(self.root, n)))

    def _move_aside(self, name: str, into: str, why: str) -> str:
        dest_dir = os.path.join(self.workdir, into)
        os.makedirs(dest_dir, exist_ok=True)
        dest = os.path.join(dest_dir, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.rename(os.path.join(self.root, name), dest)
        log.warning("checkpoint %s %s; moved to %s", name, why, dest)
        return dest

    def _move_aside_tmp_dirs(self) -> None:
        # A save killed before orbax's atomic rename leaves STEP.orbax-checkpoint-tmp*;
        # orbax ignores it, but a later save of the same step would collide with it.
        if os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                if _TMP_MARK in name:
                    self._move_aside(name, CORRUPT_DIR, "is an unfinished save")

    # ------------------------------------------------------------ saving

    def save(self, state, data_state: dict, meta: dict, *, val_loss: float | None = None):
        """Start an async save at `state.step`; orbax declining it is an error, and
        non-finite params or optimizer moments are never written."""
        self.flush()
        step = int(jax.device_get(state.step))
        if not bool(_all_finite((state.params, state.opt_state))):
            raise faults.Halt(f"refusing to checkpoint step {step}: params or optimizer "
                              f"state hold NaN/Inf", faults.EXIT_HALTED)
        meta = dict(meta, step=step, val_loss=val_loss)
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)))
        if not saved:
            raise RuntimeError(f"checkpoint for step {step} was not written (orbax declined "
                               f"it; latest is {self.manager.latest_step()})")
        log.info("saving checkpoint at step %d%s", step, " (async)" * self.async_save)
        self._pending = (step, val_loss)
        if not self.async_save:
            self.flush()

    def flush(self) -> None:
        """Wait for the in-flight save, raise its error if any, checksum it, prune."""
        if self._pending is None:
            return
        step, val_loss = self._pending
        self._pending = None
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
        if self.primary:
            self._write_integrity(step, val_loss)
        _sync("jaxgpt_checkpoint_flush")
        self._prune()   # on every process: orbax's delete is collective
        log.info("checkpoint at step %d complete", step)

    def _write_integrity(self, step: int, val_loss: float | None) -> None:
        directory = os.path.join(self.root, str(step))
        record = {"step": step, "val_loss": val_loss, "files": _file_crcs(directory)}
        tmp = os.path.join(directory, INTEGRITY + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(directory, INTEGRITY))

    def _val_loss(self, step: int):
        """A step's validation loss: from its integrity record, or, where a kill came
        before the record was written, from the metadata saved with it."""
        record = self._integrity(step)
        if record:
            return record.get("val_loss")
        try:
            with open(os.path.join(self.root, str(step), "meta", "metadata")) as f:
                return json.load(f).get("val_loss")
        except (OSError, ValueError, AttributeError):
            return None

    def _prune(self) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep:])
        losses = {s: self._val_loss(s) for s in steps}
        scored = [(v, s) for s, v in losses.items() if isinstance(v, (int, float))]
        if scored:
            keep.add(min(scored)[1])
        for s in steps:
            if s not in keep:
                self.manager.delete(s)

    def _integrity(self, step: int) -> dict:
        return _integrity_record(os.path.join(self.root, str(step)))

    def close(self) -> None:
        self.flush()
        self.manager.close()

    def abandon(self) -> None:
        """On an error: let an in-flight save of an earlier, good step finish, then stop."""
        try:
            self.flush()
        finally:
            self.manager.close()

    # ------------------------------------------------------------ restoring

    def _verify(self, step: int) -> tuple[str | None, dict | None]:
        return verify_step(os.path.join(self.root, str(step)))

    def _choose(self, check_meta, checked: int | None = None) -> int:
        """Newest step that passes `_verify` (bad ones moved aside) and, unless it is
        `checked` already, `check_meta`; -1 if none."""
        for step in reversed(self.steps()):
            problem, meta = self._verify(step)
            if problem is None:
                if step != checked:
                    check_meta(step, meta)
                return step
            self._move_aside(str(step), CORRUPT_DIR, f"{problem}; falling back to an "
                             f"older checkpoint")
        return -1

    def restore(self, abstract_state, *, check_meta, rollback_to: int | None = None):
        """(state, data_state, meta) of the newest good step, or None if there is none.

        `check_meta(step, meta)` runs before any array is read and raises to refuse an
        incompatible checkpoint. `rollback_to` first moves every newer step aside, once that
        step has passed `check_meta` (a refused rollback leaves the steps where they are).
        """
        checked = None
        if rollback_to is not None:
            if self.primary and rollback_to in self.steps():
                problem, meta = self._verify(rollback_to)
                if problem is not None:   # asked for by number: no falling back past it
                    raise ValueError(f"checkpoint.restore_step {rollback_to}: the checkpoint "
                                     f"{problem}; nothing was moved")
                check_meta(rollback_to, meta)
                checked = rollback_to
            self.rollback(rollback_to)
        while True:
            step = self._choose(check_meta, checked) if self.primary else -1
            if jax.process_count() > 1:
                step = int(multihost_utils.broadcast_one_to_all(jnp.int32(step)))
            self._reload()
            if step < 0:
                return None
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            except Exception as e:    # tensorstore raises a bare Exception too
                if self._integrity(step) or jax.process_count() > 1:
                    raise   # checksums match: the files are fine, the request is wrong
                problem = _innermost_line(e)
                _collect_abandoned_reads()
                self._move_aside(str(step), CORRUPT_DIR,
                                 f"failed to restore ({problem}); falling back")
                continue
            if self.primary and not self._integrity(step):
                # A kill before the record was written: it restored, so record it now (its
                # checksums from here on, and its val_loss for keeping the best).
                self._write_integrity(step, out.meta.get("val_loss"))
            return out.state, out.data, out.meta

    def rollback(self, step: int) -> None:
        """Make `step` the latest by moving newer steps aside, so new saves are not
        silently declined by orbax and the later history is kept for inspection."""
        steps = self.steps()
        if step not in steps:
            raise ValueError(f"checkpoint.restore_step {step} is not in {self.root} "
                             f"(steps: {steps or 'none'})")
        if self.primary:
            for s in steps:
                if s > step:
                    self._move_aside(str(s), ROLLED_BACK_DIR, f"is newer than the "
                                     f"restore_step {step}")
        self._reload()


# ---------------------------------------------------------------- read-only access for tools

def _reader(workdir: str) -> ocp.CheckpointManager:
    """A synchronous manager that reads WORKDIR/checkpoints and never creates anything."""
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def read_meta(workdir: str, step: int | None = None, *,
              quiet: bool = False) -> tuple[int, dict]:
    """(step, metadata) of a run's checkpoint without touching its arrays, for tools.

    `step` None means the newest step whose files are all there at their recorded sizes
    (a damaged newer one is passed over with a warning, and left where it is); a given step
    that is absent or damaged is an error naming it.
    """
    return _read_meta(_reader(workdir), step, quiet)


def _read_meta(manager: ocp.CheckpointManager, step: int | None,
               quiet: bool, crc: bool = False) -> tuple[int, dict]:
    root = str(manager.directory)
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {root}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} in {root} (steps: {steps})")
    problems = []
    for s in [step] if step is not None else reversed(steps):
        problem, _ = verify_step(os.path.join(root, str(s)), crc=crc)
        if problem is None:
            if problems and not quiet:
                log.warning("using checkpoint step %d: %s", s, "; ".join(problems))
            out = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return s, _relocated(out.meta, os.path.dirname(root))
        if step is not None:
            raise ValueError(f"checkpoint step {step} in {root} {problem}")
        problems.append(f"step {s} {problem}")
    raise ValueError(f"no readable checkpoint in {root}: {'; '.join(problems)}")


def _relocated(meta: dict, run_dir: str) -> dict:
    """`meta` with its tokenizer found again when the run directory has moved: a recorded
    path that no longer exists, of a file the run directory holds under the same name (its
    own tokenizer.model), is replaced by that file (whose fingerprint the tools check)."""
    spec = meta.get("tokenizer") if isinstance(meta, dict) else None
    path = spec.get("path") if isinstance(spec, dict) else None
    if not isinstance(path, str) or os.path.exists(path):
        return meta
    moved = os.path.join(os.path.abspath(run_dir), os.path.basename(path))
    if os.path.isfile(moved):
        return {**meta, "tokenizer": {**spec, "path": moved}}
    return meta


def load_params(workdir: str, step: int | None = None):
    """(GPTConfig, params nnx.State, step, meta) of a run's checkpoint, for inference tools.

    Only the params subtree is read (not the optimizer moments), onto the default device,
    from a step whose files pass their CRC32 checks: a flipped bit in raw float data would
    decode, into wrong numbers.
    """
    manager = _reader(workdir)
    step, meta = _read_meta(manager, step, quiet=False, crc=True)
    try:
        fields = meta["config"]["model"]
    except (KeyError, TypeError):
        raise ValueError(f"checkpoint step {step} in {manager.directory}: its metadata holds "
                         f"no model config") from None
    try:
        cfg = model.GPTConfig(**fields)
    except TypeError as e:
        raise ValueError(f"checkpoint step {step} in {manager.directory} holds a model config "
                         f"this jaxgpt does not know ({e})") from None
    abstract = model.abstract_params(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)}
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(target, restore_args=jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
                partial_restore=True)))
    except Exception as e:    # noqa: BLE001 - tensorstore raises a bare Exception too
        problem = _innermost_line(e)
    else:
        return cfg, out.state["params"], step, meta
    _collect_abandoned_reads()
    raise ValueError(f"checkpoint step {step} in {manager.directory} could not be read: "
                     f"{problem}")


def _innermost_line(e: BaseException) -> str:
    """The first line of the innermost cause (tensorstore's own message)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def _collect_abandoned_reads() -> None:
    """A failed restore leaves orbax's other array reads un-awaited, each reported by
    Python when collected (a page of tensorstore specs per array, many at exit): from now
    on those reports are dropped (others still go to the previous hook), so the one error
    line is all a tool prints."""
    previous = sys.unraisablehook
    if not getattr(previous, "drops_abandoned_reads", False):
        def hook(unraisable):
            code = getattr(unraisable.object, "cr_code", None)
            read = code is not None and "orbax" in code.co_filename
            closed = (isinstance(unraisable.exc_value, RuntimeError)
                      and "Event loop is closed" in str(unraisable.exc_value))
            if not (read or closed):
                previous(unraisable)
        hook.drops_abandoned_reads = True
        sys.unraisablehook = hook
    gc.collect()
