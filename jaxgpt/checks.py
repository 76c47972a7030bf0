"""Start-up checks of a training run: config values, batch divisibility, token ids in range,
and the guard that refuses to resume a checkpoint of an incompatible run."""

import importlib.util
import json
import logging
import os
import shlex

import jax
import ml_collections
import numpy as np

from jaxgpt import checkpoint, choices, data, faults, model, sharding, tasks
from jaxgpt import config as config_schema

log = logging.getLogger(__name__)


def validate_config(config: ml_collections.ConfigDict, cfg: model.GPTConfig, n_devices: int):
    data.DataConfig.from_config(config.data)
    if not 1 <= config.data.block_size <= cfg.n_positions:
        raise ValueError(f"data.block_size {config.data.block_size} must be in "
                         f"[1, model.n_positions={cfg.n_positions}]")
    for name in ("batch_size", "grad_accum", "steps", "log_every"):
        if config.train[name] < 1:
            raise ValueError(f"train.{name} must be >= 1, got {config.train[name]}")
    if config.train.batch_size % config.train.grad_accum:
        raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by "
                         f"train.grad_accum {config.train.grad_accum}")
    choices.check("mesh.rules", config.mesh.rules, sharding.RULES)
    sharding.resolve_mesh_shape(config.mesh.shape, n_devices)
    if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"model.attention='cudnn' trains only on a GPU (this backend is "
                         f"{jax.default_backend()}); use 'dot_product' or 'einsum'")
    _validate_tasks(config.eval)
    if config.init_from and config.data.tokenizer != "gpt2":
        raise ValueError(f"init_from={config.init_from!r} loads GPT-2's embeddings, rows of "
                         f"GPT-2 BPE ids, but data.tokenizer is {config.data.tokenizer!r}: set "
                         f"data.tokenizer=gpt2")
    if config.report.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"report.wandb_project is {config.report.wandb_project!r} but wandb "
                         f"is not installed (pip install wandb)")


def _validate_tasks(ecfg):
    """eval.tasks: known task names, files that exist, and evaluations to score them at."""
    if ecfg.tasks_limit < 0:
        raise ValueError(f"eval.tasks_limit must be >= 0, got {ecfg.tasks_limit}")
    if not ecfg.tasks:
        return
    try:
        spec = tasks.parse(ecfg.tasks)
    except ValueError as e:
        raise ValueError(f"eval.tasks: {e}") from None
    for task, path in spec.items():
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"eval.tasks: the {task} file {path!r} does not exist")
    if not ecfg.every:
        raise ValueError(f"eval.tasks {ecfg.tasks!r} are scored at evaluations, but "
                         f"eval.every is 0")


def check_batch_divisible(micro_batch: int, config, mesh, rules):
    ways = sharding.batch_divisor(mesh, rules)
    if micro_batch % ways:
        raise ValueError(
            f"micro-batch {micro_batch} (train.batch_size {config.train.batch_size} / "
            f"grad_accum {config.train.grad_accum}) is not divisible by the {ways} devices "
            f"the batch is split over (mesh.shape {tuple(mesh.devices.shape)})")
    if config.eval.batch_size % ways:
        raise ValueError(f"eval.batch_size {config.eval.batch_size} is not divisible by "
                         f"the {ways} devices the batch is split over")


# Groups and fields a checkpoint must share with the run resuming it (the rest, e.g.
# train.steps, eval, sample, mesh, may change between segments).
RESUME_FIELDS = ("model.", "data.", "train.seed", "train.batch_size", "train.grad_accum")
# Fields a resume may change freely: the model's speed options, which change no numbers but
# rounding (tests/test_dist_model.py) nor the state's tree; loader speed, or where the data
# lives and how bad records are treated, whose effect on the batches the pipeline
# fingerprint judges (prepared tokens, or a stream's cursors, which count good documents of
# the same files).
RESUME_FREE = ("model.attention", "model.remat", "model.scan_layers", "data.read_threads",
               "data.prefetch", "data.path", "data.prepared", "data.on_bad_record")
NONFINITE_MODES = ("halt", "skip")
SCAN_LIMIT = 1 << 28   # tokens: a full id-range check at start-up reads this much at most


def validate_faults(config: ml_collections.ConfigDict):
    choices.check("train.nonfinite", config.train.nonfinite, NONFINITE_MODES)
    if config.train.max_consecutive_skips < 1:
        raise ValueError(f"train.max_consecutive_skips must be >= 1, got "
                         f"{config.train.max_consecutive_skips}")
    if config.train.watchdog_min_s < 0 or config.train.watchdog_factor < 0:
        raise ValueError("train.watchdog_min_s and train.watchdog_factor must be >= 0")
    for name in ("every", "keep"):
        if config.checkpoint[name] < 1:
            raise ValueError(f"checkpoint.{name} must be >= 1, got {config.checkpoint[name]}")
    if config.checkpoint.restore_step is not None and config.checkpoint.restore_step < 0:
        raise ValueError(f"checkpoint.restore_step must be >= 0, got "
                         f"{config.checkpoint.restore_step}")


def _max_token(windows) -> int:
    """Largest token id under a Windows view (one pass over its memory-mapped shards)."""
    top = -1
    for path, lo, hi in windows.segments:
        if hi > lo:
            top = max(top, int(np.memmap(path, dtype=windows.dtype, mode="r")[lo:hi].max()))
    return top


def check_inputs(config, workdir: str, corpus, tok, cfg: model.GPTConfig):
    """Out-of-range ids are clamped by JAX gathers instead of raising: check them here
    (corpora over SCAN_LIMIT tokens only per batch, in the training loop). The bound is the
    tokenizer's vocabulary: ids in a padded model vocabulary's extra rows are no tokens."""
    for name, windows in (("train", corpus.train), ("validation", corpus.val)):
        top = _max_token(windows) if windows.n_tokens <= SCAN_LIMIT else -1
        if top >= tok.vocab_size:
            raise ValueError(f"{name} data holds token id {top} >= the tokenizer's "
                             f"vocab_size {tok.vocab_size} (token cache "
                             f"{config.data.prepared or os.path.join(workdir, 'data')}, "
                             f"tokenizer {tok.path})")
    if config.sample.max_new_tokens:
        for i, prompt in enumerate(config.sample.prompts):
            n = len(tok.encode(prompt))
            if n + config.sample.max_new_tokens > cfg.n_positions:
                raise ValueError(f"sample.prompts[{i}] is {n} tokens; with "
                                 f"sample.max_new_tokens {config.sample.max_new_tokens} it "
                                 f"exceeds the context model.n_positions {cfg.n_positions}")


def _with_defaults(saved: dict) -> dict:
    """A checkpoint's config with the fields added to the schema since it was written set to
    their defaults, which reproduce what runs did before those fields existed."""
    def fill(saved, defaults):
        out = dict(saved)
        for key, value in defaults.items():
            if key not in out:
                out[key] = value
            elif isinstance(value, dict) and isinstance(out[key], dict) and value:
                out[key] = fill(out[key], value)
        return out
    return fill(saved, config_schema.base_config().to_dict())


def resume_guard(config, meta: dict, *, quiet: bool = False):
    """check_meta for `Checkpoints.restore`: refuse a checkpoint of another model, tokenizer
    or data pipeline unless checkpoint.allow_config_change is set (`quiet`: without logging
    the changes it lets through)."""
    def check(step, saved):
        # Another optimizer keeps state of another structure: nothing to restore it into.
        was = saved.get("config", {}).get("optim", {}).get("optimizer", "adamw")
        now = meta["config"]["optim"]["optimizer"]
        if was != now:
            raise ValueError(f"checkpoint at step {step} holds {was} optimizer state, but "
                             f"optim.optimizer is {now!r}; keep optim.optimizer={was!r} to "
                             f"resume it, or start a new workdir")
        changes = faults.config_changes(_with_defaults(saved.get("config", {})),
                                        meta["config"], RESUME_FIELDS)
        free = [f"{n}: {old!r} -> {new!r}" for n, old, new in changes if n in RESUME_FREE]
        fixed = [(n, old, new) for n, old, new in changes if n not in RESUME_FREE]
        fingerprints = [f"{key}: {saved.get(key)!r} -> {meta[key]!r}"
                        for key in ("tokenizer", "pipeline")
                        if key in meta and _identity(saved.get(key)) != _identity(meta[key])]
        diff = [f"{n}: {old!r} -> {new!r}" for n, old, new in fixed] + fingerprints
        if diff:
            diff += free     # what may explain a changed pipeline
        elif free and not quiet:
            log.info("resuming step %d with changed %s (speed or location only: the same "
                     "batches and state tree)", step, "; ".join(free))
        if diff and not config.checkpoint.allow_config_change:
            # The overrides that give the differing fields their saved values back, where
            # flags can (plain values of fields both configs have) and nothing else differs.
            back = [f"--config.{n}={shlex.quote(str(old))}" for n, old, new in fixed
                    if isinstance(old, (str, int, float, bool))
                    and "<absent>" not in (old, new)]
            settable = back and len(back) == len(fixed) and not fingerprints
            hint = f"resume as it was with {' '.join(back)}, or pass" if settable else "pass"
            raise ValueError(f"checkpoint at step {step} was written by an incompatible run; "
                             f"differing fields: {'; '.join(diff)} ({hint} --config."
                             f"checkpoint.allow_config_change=True to resume anyway)")
        if diff and not quiet:
            log.warning("resuming step %d despite differing fields: %s", step,
                        "; ".join(diff))
    return check


def _identity(value):
    """What must match for a resume: a tokenizer's kind and fingerprint, not where its file
    is (a run directory may move)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "path"}
    return value


def rollback_still_to_do(config, workdir: str) -> int | None:
    """checkpoint.restore_step, unless the newest checkpoint was written after that very
    rollback by this very config (a preempted job requeued with its command), which goes on
    from there instead of rolling back again on every start. Any other change to the
    config (say, a lower learning rate for a second try) rolls back again."""
    step = config.checkpoint.restore_step
    if step is None:
        return None
    try:
        latest, saved = checkpoint.read_meta(workdir, quiet=True)
    except Exception:    # noqa: BLE001 - none, or unreadable: the rollback decides
        return step
    if latest > step and saved.get("config") == json.loads(json.dumps(config.to_dict())):
        log.warning("checkpoint.restore_step %d was applied already by this same config: "
                    "step %d continues from it, so the run resumes there (to roll back to "
                    "step %d again, move the newer steps out of checkpoints/)",
                    step, latest, step)
        return None
    return step


def precheck_resume(config, workdir: str, rollback: int | None) -> None:
    """The config part of the resume guard, against the checkpoint a resume would start
    from (`rollback`: rollback_still_to_do's step, else the newest), before training a tokenizer or preparing data that a refusal would waste (the
    full guard, with the tokenizer and pipeline fingerprints, runs at restore)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    try:
        step, saved = checkpoint.read_meta(workdir, rollback, quiet=True)
    except Exception as e:    # noqa: BLE001 - none or unreadable: the restore says
        if rollback is not None:   # a step asked for by number: absent or damaged is it
            raise ValueError(f"checkpoint.restore_step {rollback}: {e}") from None
        return
    resume_guard(config, {"config": config.to_dict()}, quiet=True)(step, saved)
