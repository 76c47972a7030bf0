"""Training: optimizer, schedule, steps, grad accumulation, overfitting, resume."""


import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import checkpoint, data, model, report, sharding, tokenizer, train
from tests import helpers


def _trainer(cfg, tx, mesh_shape=(1, 1, 1), rules="dp"):
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    return train.make_trainer(cfg, tx, mesh, sharding.RULES[rules], seed=0)


def _batch(trainer, windows, accum=1):
    local = np.asarray(windows).reshape(accum, -1, windows.shape[-1])
    return train.to_global(local, trainer.mesh, (None, "batch", None), trainer.rules)


def test_schedule_is_linear_warmup_then_cosine_to_floor():
    cfg = train.OptimConfig(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=10)
    schedule = train.make_schedule(cfg, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(5), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
    # Closed form of cosine decay from the peak to the floor over the remaining 100 steps.
    for t in (35, 60, 85):
        expect = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * (t - 10) / 100))
        np.testing.assert_allclose(schedule(t), expect, rtol=1e-5)
    np.testing.assert_allclose(schedule(110), 1e-4, rtol=1e-5)


def test_wsd_schedule_warms_up_holds_the_peak_then_decays_linearly():
    cfg = train.OptimConfig(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=10,
                            schedule="wsd")
    schedule = train.make_schedule(cfg, total_steps=110)   # decay: the last 22 steps
    np.testing.assert_allclose([schedule(t) for t in (0, 5, 10, 50, 88)],
                               [0.0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    for t in (99, 110):
        np.testing.assert_allclose(schedule(t), 1e-3 - (1e-3 - 1e-4) * (t - 88) / 22,
                                   rtol=1e-5)
    fixed = train.make_schedule(train.OptimConfig(
        learning_rate=1.0, min_lr_ratio=0.0, warmup_steps=0, decay_steps=4, schedule="wsd"), 10)
    np.testing.assert_allclose([fixed(t) for t in range(11)],
                               [1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0], atol=1e-7)
    with pytest.raises(ValueError, match="warmup_steps 10 \\+ decay steps 5 exceed train.steps 12"):
        train.make_schedule(train.OptimConfig(warmup_steps=10, decay_steps=5,
                                              schedule="wsd"), 12)
    with pytest.raises(ValueError, match="optim.schedule must be one of cosine|wsd"):
        train.OptimConfig(schedule="linear")


def test_weight_decay_only_on_matrices(tiny_cfg):
    """Decay exactly where GPT-2 practice (nanoGPT) puts it: HF GPT-2's >= 2-D tensors, its
    weight matrices and embeddings. jaxgpt's own ranks differ (the q/k/v bias is [3, H, K]),
    so the reference is HF's layout, through the converter's name table."""
    from jaxgpt.convert import hf
    cfg = train.OptimConfig(learning_rate=1.0, warmup_steps=0, weight_decay=0.5, grad_clip=0)
    tx = train.make_optimizer(cfg, total_steps=10)
    state = train.init_state(tiny_cfg, tx, seed=0)
    hf_rank = {tuple(e.path): len(e.hf_shape) for e in hf.table(tiny_cfg)}
    # Biases start at 0 and norm scales at 1, where decay would go unseen: all random.
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.params))))
    state = state.replace(params=jax.tree.map(
        lambda p: jax.random.normal(next(keys), p.shape), state.params))
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    # Step 1 has lr = peak; with zero gradients only decoupled weight decay moves params.
    updates, _ = tx.update(zero_grads, state.opt_state, state.params)
    decayed = 0
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates),
                            jax.tree.leaves(state.params)):
        name = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path[:-1])
        if hf_rank[name] >= 2:
            decayed += 1
            np.testing.assert_allclose(u, -0.5 * p, rtol=1e-6, err_msg=str(name))
        else:
            assert float(jnp.abs(u).max()) == 0, name
    assert decayed == 2 + 4 * tiny_cfg.n_layer   # wte, wpe and 4 kernels per block


def _muon_update(tiny_cfg, grads_fn, weight_decay):
    cfg = train.OptimConfig(learning_rate=1.0, warmup_steps=0, weight_decay=weight_decay,
                            grad_clip=0, optimizer="muon")
    tx = train.make_optimizer(cfg, total_steps=10)
    state = train.init_state(tiny_cfg, tx, seed=0)
    updates, _ = tx.update(grads_fn(state.params), state.opt_state, state.params)
    named = lambda tree: {jax.tree_util.keystr(k): v for k, v in
                          jax.tree_util.tree_leaves_with_path(tree)}
    return named(updates), named(state.params)


def test_muon_decays_only_its_matrices(tiny_cfg):
    updates, params = _muon_update(tiny_cfg, lambda p: jax.tree.map(jnp.zeros_like, p), 0.5)
    for name, u in updates.items():
        hidden = "kernel" in name    # the blocks' weight matrices; AdamW (no decay) elsewhere
        np.testing.assert_allclose(u, -0.5 * params[name] if hidden else 0 * u, rtol=1e-6,
                                   err_msg=name)


def test_muon_steps_are_orthogonal_per_matrix_and_per_q_k_v(tiny_cfg):
    """Each update is an orthogonalized gradient scaled to RMS 0.2: singular values near
    0.2 * sqrt(max(fan_in, fan_out)), within Newton-Schulz's band (the smallest of a square
    random matrix stay below it). The fused qkv kernel [D, 3, H, K] is three [D, H*K]
    matrices, each orthogonalized on its own: as one [D, 3HK] matrix, its blocks would reach
    about 1.5 on this scale."""
    rng = np.random.default_rng(0)
    random = lambda p: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                                          jnp.float32), p)
    updates, _ = _muon_update(tiny_cfg, random, 0.0)
    D, H, K = tiny_cfg.n_embd, tiny_cfg.n_head, tiny_cfg.n_embd // tiny_cfg.n_head
    matrices = {}
    for name, u in updates.items():
        u = np.asarray(u)
        if "c_attn" in name and "kernel" in name:
            matrices.update({f"{name}[{j}]": u[:, j].reshape(D, H * K) for j in range(3)})
        elif "attn" in name and "c_proj" in name and "kernel" in name:
            matrices[name] = u.reshape(H * K, D)
        elif "kernel" in name:
            matrices[name] = u
    assert len(matrices) == tiny_cfg.n_layer * 6
    for name, m in matrices.items():
        sv = np.linalg.svd(m, compute_uv=False) / (0.2 * np.sqrt(max(m.shape)))
        assert np.median(sv) > 0.6 and sv.max() < 1.3, (name, np.median(sv), sv.max())


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expect = -np.take_along_axis(logp, targets[..., None], -1).mean()
    np.testing.assert_allclose(train.cross_entropy(logits, targets), expect, rtol=1e-6)


def test_cross_entropy_gradient_equals_autodiff_of_log_softmax():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 4, 13)).astype(np.float32) * 3)
    targets = jnp.asarray(rng.integers(0, 13, size=(3, 4)))
    mask = jnp.asarray(rng.random((3, 4)) > 0.3)

    def reference(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return (nll * mask).sum() / mask.sum()

    want, want_g = jax.value_and_grad(reference)(logits)
    got, got_g = jax.value_and_grad(lambda x: train.cross_entropy(x, targets, mask))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-7)


def test_overfitting_one_batch_halves_the_loss(tiny_cfg, key):
    tx = train.make_optimizer(train.OptimConfig(learning_rate=3e-3, warmup_steps=5), 60)
    trainer = _trainer(tiny_cfg, tx)
    windows = np.asarray(jax.random.randint(key, (8, 17), 0, tiny_cfg.vocab_size))
    batch = _batch(trainer, windows)
    state = trainer.init()
    losses = []
    for _ in range(60):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_grad_accumulation_equals_one_big_batch(tiny_cfg, key):
    # Plain SGD, so the params move by exactly the (averaged) gradient; Adam would amplify
    # float rounding in near-zero gradients into sign flips.
    tx = optax.sgd(1.0)
    trainer = _trainer(tiny_cfg, tx)
    windows = np.asarray(jax.random.randint(key, (8, 17), 0, tiny_cfg.vocab_size))
    one, m1 = trainer.train_step(trainer.init(), _batch(trainer, windows, accum=1))
    four, m4 = trainer.train_step(trainer.init(), _batch(trainer, windows, accum=4))
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    helpers.assert_trees_close(one.params, four.params, rtol=1e-4, atol=1e-6)


def test_bfloat16_training_keeps_fp32_params_and_loss(key):
    cfg = model.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                          dtype="bfloat16")
    tx = train.make_optimizer(train.OptimConfig(learning_rate=1e-3), 10)
    trainer = _trainer(cfg, tx)
    windows = np.asarray(jax.random.randint(key, (8, 17), 0, 97))
    state, metrics = trainer.train_step(trainer.init(), _batch(trainer, windows))
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_resume_continues_at_step_k_with_saved_params(tmp_path):
    corpus = helpers.small_corpus(tmp_path)
    workdir = str(tmp_path / "run")
    config = helpers.tiny_run_config(corpus, train__steps=4, checkpoint__every=2)
    first = train.train_and_evaluate(config, workdir)
    assert int(first["state"].step) == 4
    saved = jax.device_get(first["state"].params)
    # A rerun asking for more steps resumes at 4; a zero-LR check would hide restore bugs,
    # so compare the restored params before any new step by asking for 4 steps again.
    again = train.train_and_evaluate(helpers.tiny_run_config(corpus, train__steps=4,
                                                             checkpoint__every=2), workdir)
    assert int(again["state"].step) == 4
    helpers.assert_trees_close(saved, jax.device_get(again["state"].params), rtol=0, atol=0)
    cfg, params, step, meta = checkpoint.load_params(workdir)
    assert step == 4 and cfg == model.GPTConfig(**config.model)
    helpers.assert_trees_close(saved, jax.device_get(params), rtol=0, atol=0)
    tok = tokenizer.from_meta(meta)
    assert tok.decode(tok.encode("def f(x):\n")) == "def f(x):\n"
    more = train.train_and_evaluate(helpers.tiny_run_config(corpus, train__steps=6,
                                                            checkpoint__every=2), workdir)
    assert int(more["state"].step) == 6
    records = [l for l in pathlib.Path(f"{workdir}/metrics.jsonl").read_text().splitlines()
               if '"loss"' in l]
    steps = [int(l.split('"step": ')[1].split(",")[0]) for l in records]
    assert steps[-1] == 6 and 5 in steps and steps.count(1) == 1   # never restarted at 0


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, optimizer):
    corpus = helpers.small_corpus(tmp_path)
    config = lambda steps: helpers.tiny_run_config(corpus, train__steps=steps,
                                                   checkpoint__every=3, optim__optimizer=optimizer)
    straight = train.train_and_evaluate(config(6), str(tmp_path / "a"))
    train.train_and_evaluate(config(3), str(tmp_path / "b"))
    resumed = train.train_and_evaluate(config(6), str(tmp_path / "b"))
    helpers.assert_trees_close(jax.device_get(straight["state"]),
                               jax.device_get(resumed["state"]), rtol=0, atol=0)


class _WandbStandIn:
    """Records what jaxgpt hands to the `wandb` API (init, run.log, run.finish)."""

    def __init__(self):
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logs.append((step, data))

    def finish(self):
        self.finished += 1


def test_metrics_reach_weights_and_biases_with_their_steps(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    from jaxgpt import checks
    from jaxgpt import config as config_lib
    config = config_lib.base_config()
    config.report.wandb_project = "jaxgpt-test"
    monkeypatch.setitem(sys.modules, "wandb", None)         # not installed: refused up front
    with pytest.raises(ValueError, match="wandb_project is 'jaxgpt-test' but wandb is not"):
        checks.validate_config(config, model.GPTConfig(**config.model), 1)
    stand_in = _WandbStandIn()
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = stand_in.init
    monkeypatch.setitem(sys.modules, "wandb", module)
    checks.validate_config(config, model.GPTConfig(**config.model), 1)
    (tmp_path / "run").mkdir()
    writer = report.MetricsWriter(str(tmp_path / "run"), wandb_project="jaxgpt-test",
                                  config={"train": {"steps": 9}})
    writer.write({"step": 5, "total_steps": 9, "loss": 2.5, "lr": 1e-3, "eta_s": None,
                  "time": 1.0})
    writer.write({"step": 9, "val_loss": 2.25, "val_ppl": 9.49})
    writer.write_text("samples", "step 9\nhello", 9)
    writer.close()
    assert stand_in.inits == [{"project": "jaxgpt-test", "dir": str(tmp_path / "run"),
                               "config": {"train": {"steps": 9}}, "name": "run"}]
    assert stand_in.logs == [(5, {"train/loss": 2.5, "train/lr": 1e-3}),
                             (9, {"eval/val_loss": 2.25, "eval/val_ppl": 9.49}),
                             (9, {"samples": "step 9\nhello"})]
    assert stand_in.finished == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 9]


_TRAIN_ITERATOR = data.train_iterator    # before any test wraps it


def _run_with_input_delay(tmp_path, monkeypatch, delay: float, **changes) -> list[float]:
    """data_wait of a tiny run whose batches each arrive `delay` seconds late (steps >= 8:
    after compiling)."""
    real = _TRAIN_ITERATOR

    class Slow:
        def __init__(self, it):
            self.it = it

        def __next__(self):
            time.sleep(delay)
            return next(self.it)

        def get_state(self):
            return self.it.get_state()

    def slow_iterator(*args, **kwargs):
        it, pipeline = real(*args, **kwargs)
        return Slow(it), pipeline

    monkeypatch.setattr(data, "train_iterator", slow_iterator)
    corpus = helpers.small_corpus(tmp_path)
    workdir = tmp_path / f"run-{delay}"
    train.train_and_evaluate(helpers.tiny_run_config(
        corpus, eval__every=0, sample__max_new_tokens=0, checkpoint__every=100,
        train__steps=12, train__log_every=4, **changes), str(workdir))
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["data_wait"] for r in records if "loss" in r and r["step"] >= 8]


def test_data_wait_is_the_time_the_accelerator_idled_for_input(tmp_path, monkeypatch, caplog):
    # Steps of milliseconds, batches 0.25 s apart: the accelerator waits most of the time.
    with caplog.at_level(logging.INFO):
        waits = _run_with_input_delay(tmp_path, monkeypatch, 0.25)
    assert waits and all(0.7 < w <= 1 for w in waits), waits
    assert "waiting for data" in caplog.text
    # Steps of ~0.3 s, batches 0.03 s apart: the loop still waits in next(), but while the
    # dispatched steps run, so the accelerator idles for input only after the log line's
    # sync (one batch in 4 steps).
    waits = _run_with_input_delay(tmp_path, monkeypatch, 0.03, model__n_embd=384,
                                  model__n_layer=4, model__n_head=4, train__batch_size=32)
    assert waits and all(w < 0.1 for w in waits), waits


@pytest.mark.parametrize("tie", [True, False])
def test_a_partial_last_eval_batch_is_scored_and_its_padding_is_not(tie):
    """Validation covers every window: the last, partial batch is filled with rows of -1
    that count for nothing. Reference: the model's own log-softmax, in numpy."""
    from flax import nnx
    cfg = model.GPTConfig(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                          tie_embeddings=tie)
    gpt = model.GPT(cfg, rngs=nnx.Rngs(params=jax.random.key(3)))
    graphdef, params = nnx.split(gpt, nnx.Param)
    windows = np.random.default_rng(0).integers(0, 97, (7, 9)).astype(np.int32)
    batches = list(data.iter_val_batches(windows, 4))
    assert [b.shape for b in batches] == [(4, 9), (4, 9)]
    np.testing.assert_array_equal(batches[1][3], -1)
    step = jax.jit(lambda p, w: train.eval_step(p, w, graphdef=graphdef))
    out = [step(params, b) for b in batches]
    logits = np.asarray(gpt(windows[:, :-1])[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1)[..., 0]
    assert [float(o["tokens"]) for o in out] == [32.0, 24.0]
    np.testing.assert_allclose([float(o["nll_sum"]) for o in out],
                               [nll[:4].sum(), nll[4:].sum()], rtol=2e-5)
    assert len(list(data.iter_val_batches(windows, 4, max_batches=1))) == 1


def test_the_eval_step_compiled_before_training_is_the_one_evaluations_run(tiny_cfg):
    """compile_eval_step's executable is reused by every evaluation: none compiles again."""
    trainer = _trainer(tiny_cfg, optax.adamw(1e-3), mesh_shape=(2, 1, 1))
    params = trainer.init().params
    compiled = []

    def listen(event, duration, fun_name="", **_):
        if event == "/jax/core/compile/backend_compile_duration" and "eval_step" in fun_name:
            compiled.append(fun_name)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        assert train.compile_eval_step(trainer, params, batch=4, block_size=8) > 0
        assert len(compiled) == 1
        windows = np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, (7, 9))
        out = train.evaluate(trainer, params, windows.astype(np.int32), batch=4, max_batches=0)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert out["val_tokens"] == 7 * 8 and len(compiled) == 1, compiled


def test_a_resume_names_a_schedule_change_even_where_the_next_rate_is_the_same(caplog):
    from configs import default
    config = default.get_config()
    config.optim.warmup_steps, config.train.steps = 100, 2000
    saved = {"train": {"steps": 1000}, "optim": config.optim.to_dict()}
    with caplog.at_level(logging.WARNING, logger="jaxgpt.train"):
        # In the warm-up both schedules give step 51 the same rate; the decay differs.
        train._say_schedule_change(config, saved, 50)
        assert "train.steps 1000 -> 2000: the learning-rate schedule is recomputed" in \
            caplog.text
        caplog.clear()
        # A decay of fixed length: train.steps changes nothing still to come.
        config.optim.decay_steps = 500
        train._say_schedule_change(config, {**saved, "optim": config.optim.to_dict()}, 50)
        assert caplog.text == ""
