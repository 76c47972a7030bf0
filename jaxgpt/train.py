"""Training: TrainState, make_optimizer, loss, jitted train/eval steps, train_and_evaluate.

Steps are pure functions of (state, batch) compiled once with explicit shardings; the
ConfigDict stops at `train_and_evaluate`, which validates it and passes typed values down.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.experimental import multihost_utils

from jaxgpt import (
    checkpoint,
    checks,
    choices,
    data,
    faults,
    mfu,
    model,
    ops,
    report,
    sample,
    sharding,
    shards,
    stream,
    tasks,
    tokenizer,
)
from jaxgpt import eval as evaluation

log = logging.getLogger(__name__)

Batch = jax.Array  # int32 [A, B, T + 1]: A micro-batches of B windows of T + 1 tokens
SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
MUON_RMS = 0.2   # Muon updates scaled to AdamW's typical RMS, so AdamW's lr and decay carry over
WSD_DECAY_FRACTION = 0.2   # wsd with decay_steps = 0 decays over the last 20% of the steps


@struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array           # uint32 [2]: base dropout key; step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 6e-4   # peak, after warm-up
    min_lr_ratio: float = 0.1     # the schedule ends at learning_rate * min_lr_ratio
    warmup_steps: int = 100
    decay_steps: int = 0          # cosine: its length, 0 = until the last step;
                                  # wsd: the final decay, 0 = the last 20% of the steps
    schedule: str = "cosine"      # "cosine" | "wsd" (warm-up, stable, linear decay)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1     # on weight matrices and embeddings (not biases, norms)
    grad_clip: float = 1.0        # global-norm clip; 0 disables
    optimizer: str = "adamw"      # "adamw" | "muon" (hidden matrices; AdamW for the rest)
    muon_momentum: float = 0.95   # Muon's (Nesterov) momentum; AdamW's part uses b1, b2

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("optim.warmup_steps and optim.decay_steps must be >= 0")
        choices.check("optim.schedule", self.schedule, SCHEDULES)
        choices.check("optim.optimizer", self.optimizer, OPTIMIZERS)
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then to peak * min_lr_ratio: "cosine" decays along a
    cosine; "wsd" holds the peak and decays linearly over the last `decay_steps` steps."""
    floor = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay = cfg.decay_steps or max(round(WSD_DECAY_FRACTION * total_steps), 1)
        stable = total_steps - cfg.warmup_steps - decay
        if stable < 0:
            raise ValueError(f"optim.schedule='wsd': warmup_steps {cfg.warmup_steps} + decay "
                             f"steps {decay} exceed train.steps {total_steps}")
        return optax.join_schedules([
            optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
            optax.constant_schedule(cfg.learning_rate),
            optax.linear_schedule(cfg.learning_rate, floor, decay)],
            boundaries=[cfg.warmup_steps, cfg.warmup_steps + stable])
    decay = cfg.decay_steps or max(total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(decay, cfg.warmup_steps + 1),
        end_value=floor)


def muon_dimensions(params):
    """Each hidden weight matrix of the blocks as Muon sees it, from its logical axis names:
    the `embed` axis is the input side when it comes first and the output side when last, the
    other named axes the opposite side, and unnamed axes (q/k/v of a fused kernel) are
    orthogonalized separately. None (AdamW) for embeddings, norms and biases."""
    def one(path, var):
        names = var.get_metadata().get("out_sharding") or ()
        is_kernel = getattr(path[-1], "key", None) == "kernel"
        if not is_kernel or names.count("embed") != 1 or "embed" not in (names[0], names[-1]):
            return None
        named = [i for i, n in enumerate(names) if n not in (None, "embed")]
        embed = (names.index("embed"),)
        return (optax.contrib.MuonDimensionNumbers(embed, tuple(named)) if names[0] == "embed"
                else optax.contrib.MuonDimensionNumbers(tuple(named), embed))
    return jax.tree_util.tree_map_with_path(one, params,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


# Weight decay's params (GPT-2/3 practice: the weight matrices and embeddings, not biases or
# norm scales), by name: by rank, the fused q/k/v bias [3, H, K] would count as a matrix.
DECAYED = ("kernel", "embedding", "lm_head")


def decay_mask(params):
    """True for each param AdamW's weight decay applies to (DECAYED), False elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, var: getattr(path[-1], "key", None) in DECAYED, params,
        is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (GPT-2/3 practice) with decay on weight matrices and embeddings only (DECAYED),
    after global-norm clipping.

    "muon": Muon (momentum orthogonalized by Newton-Schulz; Jordan et al. 2024) on the
    blocks' weight matrices, with updates scaled to AdamW's RMS (Liu et al. 2025) so the same
    learning rate and weight decay apply; AdamW without decay on embeddings, norms, biases.
    """
    schedule = make_schedule(cfg, total_steps)
    if cfg.optimizer == "muon":
        tx = optax.contrib.muon(
            schedule, beta=cfg.muon_momentum, eps=cfg.eps, weight_decay=cfg.weight_decay,
            adam_b1=cfg.b1, adam_b2=cfg.b2, adam_weight_decay=0.0,
            muon_weight_dimension_numbers=muon_dimensions, consistent_rms=MUON_RMS)
    else:
        tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx


def cross_entropy(logits, targets, mask=None):
    """Mean token NLL in float32; logits [B, T, V], targets int [B, T], mask [B, T]."""
    nll = ops.token_nll(logits, targets)
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def loss_fn(params, graphdef, windows, dropout_key=None):
    """Next-token loss of one micro-batch of windows [B, T + 1]."""
    # The Rngs object is built inside the differentiated function: nnx refuses to advance
    # an Rngs created at an outer trace level.
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    return _mean_nll(nnx.merge(graphdef, params), windows, rngs)


def _mean_nll(gpt: model.GPT, windows, rngs=None):
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if not gpt.cfg.tie_embeddings:
        return cross_entropy(gpt(inputs, rngs=rngs)[0], targets)
    hidden, w, chunk = _tied_head_inputs(gpt, inputs, targets, rngs)
    return ops.tied_head_loss(hidden, w, targets, chunk)


def _tied_head_inputs(gpt: model.GPT, inputs, targets, rngs=None):
    """(final hidden states, the tied head's weight, loss chunk) for ops' fused head and
    loss, which never store the [B, T, V] logits."""
    hidden, _ = gpt(inputs, rngs=rngs, head=False)
    w = gpt.wte.embedding[...].astype(gpt.cfg.compute_dtype)
    return hidden, w, ops.loss_chunk(*targets.shape, gpt.cfg.vocab_size)


def train_step(state: TrainState, batch: Batch, *, graphdef, tx, skip_nonfinite=False,
               inject_nan=(-1, 0)):
    """One optimizer step over A micro-batches (gradients averaged by a lax.scan).

    With `skip_nonfinite`, a step whose loss or gradient norm is NaN/Inf leaves params and
    optimizer state unchanged (a select, so the step stays one compiled program).
    `inject_nan=(first_step, count)` poisons those steps' loss and gradients (tests only).
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(loss_fn)

    def micro(carry, xs):
        loss_sum, grad_sum = carry
        i, windows = xs
        loss, grads = grad_fn(state.params, graphdef, windows, jax.random.fold_in(step_key, i))
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    n_micro = batch.shape[0]
    (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(n_micro), batch))
    loss, grads = loss / n_micro, jax.tree.map(lambda g: g / n_micro, grads)
    if inject_nan[1]:
        done = state.step + 1
        poison = jnp.where((done >= inject_nan[0]) & (done < inject_nan[0] + inject_nan[1]),
                           jnp.float32(jnp.nan), jnp.float32(1))
        loss = loss * poison
        grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if skip_nonfinite:
        keep_old = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep_old, params, state.params)
        opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, windows, *, graphdef, n_valid_vocab=None):
    """Summed token NLL and token count of validation windows [B, T + 1] (no dropout). Rows
    of -1 are padding (filling a last, partial batch) and count for nothing.

    `n_valid_vocab`: the tokenizer's size; the softmax then ranges over ids below it only,
    leaving out a padded vocabulary's extra rows (the training loss keeps them: they only
    learn to be unlikely), so the perplexity is that of the unpadded (exported) model."""
    real = windows[:, :1] >= 0                                  # [B, 1]
    windows = jnp.where(real, windows, 0)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    weights = jnp.broadcast_to(real, targets.shape).astype(jnp.float32)
    gpt = nnx.merge(graphdef, params)
    if gpt.cfg.tie_embeddings:
        hidden, w, _ = _tied_head_inputs(gpt, inputs, targets)
        w = w[:n_valid_vocab]                          # the tokenizer's rows only (None: all)
        nll_sum = ops.tied_head_nll_sum(hidden, w, targets, weights,
                                        ops.loss_chunk(*targets.shape, w.shape[0]))
    else:
        nll_sum = (ops.token_nll(gpt(inputs)[0][..., :n_valid_vocab], targets)
                   * weights).sum()
    return {"nll_sum": nll_sum, "tokens": weights.sum()}


def init_state(cfg: model.GPTConfig, tx, seed: int) -> TrainState:
    key_params, key_dropout = jax.random.split(jax.random.key(seed))
    gpt = model.GPT(cfg, rngs=nnx.Rngs(params=key_params))
    _, params = nnx.split(gpt, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(key_dropout))


@dataclasses.dataclass
class Trainer:
    """Compiled, sharded step functions and the abstract state they work on."""

    cfg: model.GPTConfig
    mesh: jax.sharding.Mesh
    rules: dict
    graphdef: nnx.GraphDef
    state_shardings: TrainState
    init: callable
    train_step: callable
    eval_step: callable
    logprob_step: callable   # eval.target_logprobs_step with greedy hits, replicated out
    n_valid_vocab: int | None = None   # ids eval_step / logprob_step score over (None: all)


def make_trainer(cfg: model.GPTConfig, tx, mesh, rules, seed: int, *,
                 skip_nonfinite: bool = False, inject_nan=(-1, 0),
                 n_valid_vocab: int | None = None, state_shardings=None) -> Trainer:
    """jax.eval_shape(init_state) -> shardings from logical names -> jitted functions.

    `n_valid_vocab`: the tokenizer's size, when the model's vocab_size is padded beyond it:
    eval_step and logprob_step score over those ids only (train_step's loss is unchanged)."""
    if n_valid_vocab is not None and n_valid_vocab >= cfg.vocab_size:
        n_valid_vocab = None
    state_sh = state_shardings or state_layout(cfg, tx, mesh, rules, seed)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))))
    batch_sh = jax.sharding.NamedSharding(
        mesh, sharding.logical_to_spec((None, "batch", None), rules))
    windows_sh = sharding.batch_sharding(mesh, rules)

    def on_mesh(fn, **kwargs):   # traced with the model's activations pinned to the rules
        def traced(*args):
            with sharding.activations(mesh, rules):
                return fn(*args, **kwargs)
        traced.__name__ = traced.__qualname__ = fn.__name__   # as jit and profiles name it
        return traced

    init = jax.jit(functools.partial(init_state, cfg, tx, seed), out_shardings=state_sh)
    step = jax.jit(on_mesh(train_step, graphdef=graphdef, tx=tx,
                           skip_nonfinite=skip_nonfinite, inject_nan=inject_nan),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=0)
    evaluate = jax.jit(on_mesh(eval_step, graphdef=graphdef, n_valid_vocab=n_valid_vocab),
                       in_shardings=(state_sh.params, windows_sh))
    logprobs = jax.jit(on_mesh(evaluation.target_logprobs_step, graphdef=graphdef,
                               greedy=True, n_valid_vocab=n_valid_vocab),
                       in_shardings=(state_sh.params, windows_sh),
                       out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return Trainer(cfg, mesh, rules, graphdef, state_sh, init, step, evaluate, logprobs,
                   n_valid_vocab)


def state_layout(cfg: model.GPTConfig, tx, mesh, rules, seed: int):
    """The train state's shardings from jax.eval_shape of its init; a leaf its mesh axes do
    not divide is an error naming it (before anything compiles)."""
    abstract = jax.eval_shape(functools.partial(init_state, cfg, tx, seed))
    return sharding.tree_shardings(abstract, mesh, rules)


def to_global(x: np.ndarray, mesh, spec_names, rules) -> jax.Array:
    """This process's share of the rows (sharding.batch_share) -> a global array sharded
    over the mesh's batch axes."""
    sh = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(spec_names, rules))
    shape = list(x.shape)
    shape[spec_names.index("batch")] *= sharding.batch_share(mesh, rules)[1]
    return jax.make_array_from_process_local_data(sh, x, tuple(shape))


def fed_by_share(trainer: Trainer, step, params, batch: int):
    """step(params, global batch) as a function of a host batch of `batch` rows that every
    process reads alike: each process feeds its share of the rows."""
    index, count = sharding.batch_share(trainer.mesh, trainer.rules)
    rows = batch // count
    lo = index * rows
    return lambda b: step(params, to_global(b[lo:lo + rows], trainer.mesh, ("batch", None),
                                            trainer.rules))


def compile_eval_step(trainer: Trainer, params, batch: int, block_size: int) -> float:
    """Compile trainer.eval_step for [batch, block_size + 1] windows ahead of the first
    evaluation (jit reuses the executable), so an evaluation batch that cannot compile fails
    before training, not after eval.every steps, and the first evaluation's time, which the
    ETA counts for every evaluation still to come, is not its compilation's. Seconds taken."""
    start = time.monotonic()
    windows = jax.ShapeDtypeStruct((batch, block_size + 1), jnp.int32,
                                   sharding=sharding.batch_sharding(trainer.mesh, trainer.rules))
    trainer.eval_step.lower(params, windows).compile()
    return time.monotonic() - start


def evaluate(trainer: Trainer, params, windows, batch: int, max_batches: int):
    """Token-weighted validation loss over up to `max_batches` batches per source (0 = all);
    `windows` is one [W, T + 1] array or {source name: windows} (see eval.evaluate_windows)."""
    return evaluation.evaluate_windows(fed_by_share(trainer, trainer.eval_step, params, batch),
                                       windows, batch=batch, max_batches=max_batches)


def _tokenizer_location(path: str) -> str:
    """Absolute path for local tokenizer files; hub names (`gpt2`, `hf:gpt2`) stay as given."""
    return os.path.abspath(path) if os.path.exists(path) else path


def _make_tokenizer(dcfg: data.DataConfig, workdir: str, cfg: model.GPTConfig):
    """The run's tokenizer; a SentencePiece model trained here is saved by the caller only
    once the corpus has been read without error, so bad input leaves the workdir as it was."""
    if dcfg.tokenizer == "gpt2":
        path = dcfg.tokenizer_path or "gpt2"   # files, or the HF hub's copy
        tok = tokenizer.load("gpt2", path)
    else:
        path = dcfg.tokenizer_path or os.path.join(workdir, "tokenizer.model")
        if dcfg.tokenizer_path:     # checked to exist; any vocabulary the model covers
            tok = tokenizer.load("sentencepiece", path)
        elif os.path.exists(path):  # this run's own: trained for model.vocab_size exactly
            tok = tokenizer.load_or_train_sentencepiece(path, [], cfg.vocab_size)
        else:
            log.info("training a %d-piece SentencePiece tokenizer -> %s", cfg.vocab_size,
                     path)
            tok = tokenizer.SentencePiece(tokenizer.train_sentencepiece(
                shards.tokenizer_training_texts(dcfg), cfg.vocab_size), path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {path} has {tok.vocab_size} tokens, more than "
                         f"model.vocab_size {cfg.vocab_size}")
    return tok


def _sample_text(config, trainer: Trainer, params, tok, step: int) -> list[str]:
    prompts = list(config.sample.prompts)
    ids = [tok.encode(p) or [tok.eot_id] for p in prompts]
    method = sample.Sampling(temperature=config.sample.temperature, top_k=config.sample.top_k)
    out = sample.generate(trainer.cfg, params, ids, max_new_tokens=config.sample.max_new_tokens,
                          method=method, seed=(config.train.seed + step) % 2**32, eot_id=tok.eot_id,
                          n_valid_vocab=tok.vocab_size)
    return [tok.decode(o) for o in out]


def _restore_or_init(config, trainer, ckpts, meta, train_iter, rollback: int | None):
    """(state, the restored checkpoint's metadata or None for a fresh start); `rollback`:
    the step to roll back to first (checks.rollback_still_to_do)."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(trainer.init), trainer.state_shardings)
    out = ckpts.restore(abstract, check_meta=checks.resume_guard(config, meta),
                        rollback_to=rollback)
    if out is None:
        return _init_from(config.init_from, trainer, trainer.init()), None
    state, data_state, saved_meta = out
    # Test-only mutation controls: prove the resume tests catch a broken restore.
    broken = os.environ.get("JAXGPT_TEST_BREAK_RESTORE", "")
    if saved_meta.get("pipeline") != meta["pipeline"]:
        log.warning("data pipeline changed: the iterator starts from its beginning")
    elif broken != "data":
        train_iter.set_state(data_state)
    if broken == "rng":
        fresh = jax.random.fold_in(jax.random.key(config.train.seed), int(state.step))
        state = state.replace(rng=jax.random.key_data(fresh))
    if broken == "opt":
        state = state.replace(opt_state=trainer.init().opt_state)
    log.info("resumed from step %d in %s", int(state.step), ckpts.workdir)
    return state, saved_meta


SCHEDULE_FIELDS = ("learning_rate", "min_lr_ratio", "warmup_steps", "decay_steps", "schedule")


def _say_schedule_change(config, saved: dict, step: int) -> None:
    """A resume under another train.steps or optimizer settings recomputes the learning-rate
    schedule (the README's "ask for more steps" stretches the decay): say what changed and
    the learning rate of the next step under the saved and the new schedule."""
    old_steps = saved.get("train", {}).get("steps", config.train.steps)
    now_optim = config.optim.to_dict()
    old_optim = {**now_optim, **saved.get("optim", {})}
    optim_changed = [f"optim.{k} {old_optim[k]!r} -> {now_optim[k]!r}"
                     for k in SCHEDULE_FIELDS if old_optim[k] != now_optim[k]]
    changed = [f"train.steps {old_steps} -> {config.train.steps}"] * (
        old_steps != config.train.steps) + optim_changed
    if not changed:
        return
    new_schedule = make_schedule(OptimConfig(**now_optim), config.train.steps)
    try:
        old_schedule = make_schedule(OptimConfig(**old_optim), old_steps)
    except (TypeError, ValueError):     # settings this version no longer knows
        old_schedule = None
    if old_schedule is not None and not optim_changed:
        # A schedule of fixed length (optim.decay_steps) may not change with train.steps:
        # compared over every step still to come.
        ahead = np.arange(step, max(old_steps, config.train.steps) + 1)
        if np.array_equal(np.asarray(old_schedule(ahead)), np.asarray(new_schedule(ahead))):
            return
    now = float(new_schedule(step))
    was = "unknown" if old_schedule is None else f"{float(old_schedule(step)):.3e}"
    log.warning("resuming step %d with %s: the learning-rate schedule is recomputed; step %d "
                "runs at lr %.3e (%s under the saved settings)", step, "; ".join(changed),
                step + 1, now, was)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train per `config` in `workdir`, resuming from its latest good checkpoint if any.

    Everything that can be checked is checked before the workdir is touched, so bad input
    leaves an existing run intact. Returns the last metrics and eval records, and
    `preempted` (the step saved on SIGTERM/SIGINT, else None).
    """
    cfg = model.GPTConfig(**config.model)
    optim = OptimConfig(**config.optim)
    schedule = make_schedule(optim, config.train.steps)   # one that doesn't fit fails here
    checks.validate_config(config, cfg, jax.device_count())
    checks.validate_faults(config)
    faults.assert_same_config_everywhere(config.to_dict())
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.RULES[config.mesh.rules]
    micro_batch = config.train.batch_size // config.train.grad_accum
    checks.check_batch_divisible(micro_batch, config, mesh, rules)
    share, shares = sharding.batch_share(mesh, rules)
    tx = make_optimizer(optim, config.train.steps)
    state_sh = state_layout(cfg, tx, mesh, rules, config.train.seed)
    dcfg = data.DataConfig.from_config(config.data)
    # A missing path (or, streaming, a missing validation split) fails here, before the
    # workdir is touched.
    (stream.check_inputs if dcfg.streaming else shards.find_inputs)(dcfg)
    benchmarks = tasks.load_spec(config.eval.tasks, config.eval.tasks_limit)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise FileExistsError(f"workdir {workdir} exists and is not a directory")
    if (dcfg.tokenizer == "sentencepiece" and dcfg.tokenizer_path
            and not os.path.isfile(dcfg.tokenizer_path)):
        raise FileNotFoundError(f"data.tokenizer_path {dcfg.tokenizer_path!r} does not exist "
                                f"(unset it to train one into the workdir, or train one "
                                f"with `python -m jaxgpt.tokenizer train`)")

    os.makedirs(workdir, exist_ok=True)
    lock = faults.WorkdirLock(workdir)
    if jax.process_index() == 0:
        lock.acquire()
    try:
        rollback = checks.rollback_still_to_do(config, workdir)
        checks.precheck_resume(config, workdir, rollback)
        # Process 0 trains/caches the tokenizer and tokens first; the others then read them.
        if jax.process_index() != 0:
            multihost_utils.sync_global_devices("jaxgpt: workdir prepared")
        tok = _make_tokenizer(dcfg, workdir, cfg)
        corpus = data.load_corpus(dcfg, tok, cache_dir=os.path.join(workdir, "data"),
                                  check_stamps=jax.process_index() == 0)
        if isinstance(tok, tokenizer.SentencePiece) and not os.path.exists(tok.path):
            tok.save(tok.path)
        if jax.process_index() == 0 and jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxgpt: workdir prepared")
        checks.check_inputs(config, workdir, corpus, tok, cfg)
        total = config.train.steps
        trainer = make_trainer(
            cfg, tx, mesh, rules, config.train.seed,
            skip_nonfinite=config.train.nonfinite == "skip",
            inject_nan=(config.train.inject_nan_at_step, config.train.inject_nan_steps),
            n_valid_vocab=tok.vocab_size, state_shardings=state_sh)
        train_iter, pipeline = data.train_iterator(
            corpus, dcfg, tok, global_batch=config.train.batch_size, seed=config.train.seed,
            process_index=share, process_count=shares)
        meta = {"config": config.to_dict(), "data": corpus.fingerprint,
                "tokenizer": {"kind": config.data.tokenizer, "path": _tokenizer_location(tok.path),
                              "fingerprint": tok.fingerprint},
                "pipeline": hashlib.sha256(json.dumps(pipeline).encode()).hexdigest()[:16],
                **checkpoint.provenance()}
        ckpts = checkpoint.Checkpoints(workdir, keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
        state, saved = _restore_or_init(config, trainer, ckpts, meta, train_iter, rollback)
        saved = saved or {}
        if jax.process_index() == 0:
            # Records of steps after the restored one belong to an abandoned continuation
            # (a crash, a fallback, a rollback): kept aside, so the curves run forward.
            dropped = faults.truncate_records(
                os.path.join(workdir, "metrics.jsonl"), int(state.step),
                aside=os.path.join(workdir, "metrics.abandoned.jsonl"))
            if dropped:
                log.info("metrics.jsonl: %d record(s) after step %d moved to "
                         "metrics.abandoned.jsonl", dropped, int(state.step))
        if int(state.step) >= total:
            faults.Ledger(workdir, int(state.step))   # truncated to the restored step too
            log.warning("the run is at step %d already, not before train.steps %d: nothing "
                        "to train (raise --config.train.steps to go on)", int(state.step),
                        total)
            ckpts.close()
            return {"train": {}, "eval": {}, "state": state, "preempted": None,
                    "skipped_steps": saved.get("skips", (0, 0))[1]}
        if saved and jax.process_index() == 0:
            _say_schedule_change(config, saved.get("config", {}), int(state.step))
        # Tokens and documents per source and split, and bad records skipped while preparing.
        report.MetricsWriter(workdir, enabled=jax.process_index() == 0).write(
            {"step": int(state.step), "data": corpus.stats})
        n_params = model.count_params(state.params)
        log.info("model: %s parameters; %s train windows of %d tokens; mesh %s",
                 f"{n_params:,}", "streamed" if dcfg.streaming else len(corpus.train),
                 config.data.block_size, dict(mesh.shape))
        bench = tasks.DuringTraining(benchmarks, tok, cfg.n_positions,
                                     config.eval.batch_size) if benchmarks else None
        return _train_loop(config, workdir, trainer, state, train_iter, corpus, tok, ckpts,
                           meta, schedule=schedule, bench=bench,
                           skips=saved.get("skips", (0, 0)))
    finally:
        lock.release()


def _init_from(source: str | None, trainer: Trainer, state: TrainState) -> TrainState:
    """Fresh params replaced by HF GPT-2 weights when `config.init_from` names some."""
    if source is None:
        return state
    from jaxgpt.convert import hf  # needs torch/transformers (jaxgpt[hf])

    params = hf.init_params(source, trainer.cfg, state.params)
    log.info("initialized params from %s", source)
    # Adam moments are zeros whatever the params are, so only the params change.
    return state.replace(params=jax.device_put(params, trainer.state_shardings.params))


def _occurrences(done: int, total: int, every: int) -> int:
    """How many of steps done+1..total do an every-`every`-steps task (evaluation, save),
    which also runs at the last step."""
    if not every:
        return 0
    return total // every - done // every + (total % every != 0 and done < total)


def _flush(pending: list, ledger, guard, watchdog) -> dict:
    """Pull pending steps' metrics to the host, judge non-finite ones, extend the ledger.
    Returns the newest step's host metrics. Waits for the steps one by one, telling the
    watchdog as each finishes: the queue can hold a whole log interval of them."""
    for step, _, m in pending:
        jax.block_until_ready(m)
        watchdog.beat(step)
    host = jax.device_get([m for _, _, m in pending])
    hashes = faults.global_digests([d for _, d, _ in pending])
    records = []
    try:
        for (step, _, _), m, h in zip(pending, host, hashes):
            skipped = guard.check(step, m)
            records.append({"step": step, "batch": h, "loss": float(m["loss"]),
                             "skipped": skipped})
    finally:
        ledger.write(records)
        pending.clear()
    return host[-1]


def _train_loop(config, workdir, trainer, state, train_iter, corpus, tok, ckpts, meta,
                *, schedule, bench=None, skips=(0, 0)) -> dict:
    """`skips`: (non-finite steps skipped in a row, in all) up to the restored step."""
    writer = report.MetricsWriter(workdir, enabled=jax.process_index() == 0,
                                  tensorboard=config.report.tensorboard,
                                  wandb_project=config.report.wandb_project,
                                  config=config.to_dict())
    total, accum = config.train.steps, config.train.grad_accum
    start = int(state.step)
    tokens_per_step = config.train.batch_size * config.data.block_size
    # MFU's numerator and denominator, from the model shape and the devices' peak FLOP/s.
    flops_per_token = mfu.flops_per_token(trainer.cfg, config.data.block_size)
    peak = mfu.peak_flops(list(trainer.mesh.devices.flat))
    last_log, last_eval, preempted = {}, {}, None
    t_last, step_last = time.time(), start
    # Seconds the loop waited for a batch while the accelerator had finished every step
    # dispatched (time in next() that overlaps queued steps is no input stall).
    waited, interval = 0.0, time.monotonic()
    # Seconds of evaluations and checkpoint saves since the last log line, left out of its
    # rates; the latest of each, for the ETA's share of those still to come.
    paused, took = 0.0, {"eval": 0.0, "save": 0.0}
    ledger = faults.Ledger(workdir, start)
    guard = faults.NonFiniteGuard(config.train.nonfinite, config.train.max_consecutive_skips)
    guard.consecutive, guard.skipped = skips   # a resume goes on counting
    stop = faults.StopRequest()
    watchdog = faults.Watchdog(config.train.watchdog_min_s, config.train.watchdog_factor)
    pending = []   # (step, batch digest, device metrics) not yet checked on the host
    if config.eval.every:
        log.info("evaluation step compiled in %.1f s", compile_eval_step(
            trainer, state.params, config.eval.batch_size, config.data.block_size))
    try:
        for step in range(start, total):
            if step + 1 == config.train.inject_hang_at_step:   # tests only: a stuck host
                threading.Event().wait()
            t_wait = time.monotonic()
            local = next(train_iter)                                # [B_local, T + 1]
            if not pending or jax.tree.leaves(pending[-1][2])[0].is_ready():
                waited += time.monotonic() - t_wait
            if int(local.max()) >= tok.vocab_size:
                raise ValueError(f"batch of step {step + 1} holds token id {int(local.max())}"
                                 f" >= the tokenizer's vocab_size {tok.vocab_size}")
            digest = faults.batch_digest(local)
            local = local.reshape(accum, -1, local.shape[-1])       # [A, B_local / A, T + 1]
            batch = to_global(local, trainer.mesh, (None, "batch", None), trainer.rules)
            state, metrics = trainer.train_step(state, batch)
            done = step + 1
            pending.append((done, digest, metrics))
            # Dispatch returns before a step runs, so beats come as steps finish, not as
            # they are queued; the first beat (the first step, compiled, done) arms it.
            for d, _, m in reversed(pending):   # the newest finished step
                if jax.tree.leaves(m)[0].is_ready():
                    watchdog.beat(d)
                    break
            stopping = stop.should_stop(done)
            is_log = done % config.train.log_every == 0 or done == total or done == start + 1
            is_eval = bool(config.eval.every) and (done % config.eval.every == 0 or done == total)
            is_save = done % config.checkpoint.every == 0 or done == total or stopping
            if is_log or is_eval or is_save or len(pending) >= 1024:
                metrics = _flush(pending, ledger, guard, watchdog)
            if is_log:
                now = time.time()
                rate = (done - step_last) / max(now - t_last - paused, 1e-9)
                # This line comes before its own step's evaluation and save: from done on.
                still = (_occurrences(done - 1, total, config.eval.every) * took["eval"]
                         + _occurrences(done - 1, total, config.checkpoint.every)
                         * took["save"])
                last_log = {
                    "step": done, "total_steps": total, "loss": float(metrics["loss"]),
                    "grad_norm": float(metrics["grad_norm"]), "lr": float(schedule(done - 1)),
                    "tokens_per_s": rate * tokens_per_step,
                    "mfu": rate * tokens_per_step * flops_per_token / peak if peak else None,
                    "samples_per_s": rate * config.train.batch_size,
                    "epoch": data.epochs_done(train_iter, corpus, done * config.train.batch_size),
                    # The first step after a (re)start includes compiling: no ETA from it.
                    "eta_s": None if done == start + 1 else (total - done) / rate + still,
                    "time": now,
                    "skipped_steps": guard.skipped,
                    "data_wait": None if done == start + 1 else
                    waited / max(time.monotonic() - interval - paused, 1e-9),
                    **data.stream_stats(train_iter)}
                writer.write(last_log)
                log.info(report.progress_line(last_log))
                t_last, step_last, waited, interval = now, done, 0.0, time.monotonic()
                paused = 0.0
            t_pause = time.monotonic()
            if is_eval:
                # Several sources (a SlimPajama mixture): also a loss and perplexity per source.
                val = corpus.val_by_source if len(corpus.val_by_source) > 1 else corpus.val
                with watchdog.phase("evaluation"):
                    last_eval = {"step": done, **evaluate(
                        trainer, state.params, val, config.eval.batch_size,
                        config.eval.batches)}
                    if bench:
                        last_eval |= bench(trainer.cfg, state.params, fed_by_share(
                            trainer, trainer.logprob_step, state.params,
                            config.eval.batch_size))
                writer.write(last_eval)
                log.info(report.eval_line(last_eval))
                took["eval"] = time.monotonic() - t_pause
            if is_save:
                t_save = time.monotonic()
                with watchdog.phase("checkpoint save"):
                    best = last_eval.get("val_loss") if last_eval.get("step") == done else None
                    ckpts.save(state, train_iter.get_state(),
                               dict(meta, skips=(guard.consecutive, guard.skipped)),
                               val_loss=best)
                took["save"] = time.monotonic() - t_save
            paused += time.monotonic() - t_pause
            if stopping:
                preempted = done
                break
        with watchdog.phase("final checkpoint save"):
            ckpts.close()
    except BaseException:
        watchdog.stop()
        ckpts.abandon()
        raise
    finally:
        watchdog.stop()
        stop.restore_handlers()
    if preempted is not None:
        log.warning("stopped by %s after step %d; checkpoint saved in %s; run the same "
                    "command to resume from step %d", stop.signal_name, preempted,
                    ckpts.root, preempted)
    elif config.sample.prompts and config.sample.max_new_tokens:
        completions = _sample_text(config, trainer, state.params, tok, int(state.step))
        block = report.samples_block(int(state.step), list(config.sample.prompts),
                                     completions)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "samples.txt"), "a") as f:
                f.write(block + "\n")
            log.info(block)
            writer.write_text("samples", block, int(state.step))
    writer.close()
    return {"train": last_log, "eval": last_eval, "state": state, "preempted": preempted,
            "skipped_steps": guard.skipped}
