"""Fault tolerance: verified checkpoints, exact resume, guards, preemption, NaN, watchdog,
bad input. Subprocess tests (kill -9, SIGTERM, watchdog, CLI errors) are marked slow."""

import dataclasses
import glob
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import checkpoint, checks, faults, sharding, train
from tests import helpers

sys.path.insert(0, os.path.join(helpers.REPO, "bench"))
import faults as bench

# ---------------------------------------------------------------- Checkpoints, no training


def _state(cfg, step: int, tx=None):
    return train.init_state(cfg, tx or optax.adam(1e-3), seed=step).replace(step=jnp.int32(step))


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        state)


def _saved(tmp_path, cfg, steps, val_losses=None, keep=5):
    ckpts = checkpoint.Checkpoints(str(tmp_path), keep=keep)
    for i, s in enumerate(steps):
        ckpts.save(_state(cfg, s), {"pos": s}, {"config": {"model": dataclasses.asdict(cfg)}},
                   val_loss=val_losses[i] if val_losses else None)
    ckpts.close()
    return os.path.join(str(tmp_path), "checkpoints")


def _biggest_file(directory):
    files = [p for p in glob.glob(f"{directory}/**/*", recursive=True) if os.path.isfile(p)]
    return max(files, key=os.path.getsize)


def _truncate(root):
    path = _biggest_file(f"{root}/2/state")
    os.truncate(path, os.path.getsize(path) // 2)


def _scramble_arrays(root):
    """Step 2's biggest array file garbled at the same size, under an integrity.json that
    is not ours (so nothing vouches for the files): only the restore can tell."""
    path = _biggest_file(f"{root}/2/state/ocdbt.process_0/d")
    raw = bytearray(pathlib.Path(path).read_bytes())
    raw[:64] = bytes(b ^ 0xFF for b in raw[:64])
    pathlib.Path(path).write_bytes(bytes(raw))
    pathlib.Path(f"{root}/2/{checkpoint.INTEGRITY}").write_text('{"val_loss": 1.0}')


def _flip(root):
    path = _biggest_file(f"{root}/2/state")
    raw = bytearray(pathlib.Path(path).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    pathlib.Path(path).write_bytes(bytes(raw))


CORRUPTIONS = {
    "truncated file": (_truncate, 2, "bytes, not"),
    "flipped bytes": (_flip, 2, "CRC32"),
    "missing metadata": (lambda r: os.remove(f"{r}/2/_CHECKPOINT_METADATA"), 2,
                         "missing _CHECKPOINT_METADATA"),
    "unchecksummed, bad meta": (lambda r: (os.remove(f"{r}/2/{checkpoint.INTEGRITY}"),
                                           pathlib.Path(f"{r}/2/meta/metadata").write_text("{")),
                                2, "unreadable meta/metadata"),
    "unvouched, undecodable arrays": (_scramble_arrays, 2, "failed to restore"),
    "empty dir": (lambda r: os.makedirs(f"{r}/3"), 3, "empty directory"),
    "leftover tmp dir": (lambda r: os.makedirs(f"{r}/3.orbax-checkpoint-tmp-17/state"), 3,
                         "unfinished save"),
}


@pytest.mark.parametrize("mode", CORRUPTIONS)
def test_corrupt_newest_checkpoint_falls_back(tmp_path, tiny_cfg, caplog, mode):
    corrupt, bad_step, cause = CORRUPTIONS[mode]
    root = _saved(tmp_path, tiny_cfg, [1, 2])
    corrupt(root)
    ckpts = checkpoint.Checkpoints(str(tmp_path), keep=5)
    with caplog.at_level(logging.WARNING):
        state, data_state, _meta = ckpts.restore(_abstract(_state(tiny_cfg, 0)),
                                                 check_meta=lambda s, m: None)
    ckpts.close()
    expect = 1 if bad_step == 2 else 2
    assert int(state.step) == expect and data_state == {"pos": expect}
    helpers.assert_trees_close(jax.device_get(state.params),
                               jax.device_get(_state(tiny_cfg, expect).params), rtol=0, atol=0)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"checkpoint {bad_step}" in warning and cause in warning, warning
    moved = os.listdir(tmp_path / checkpoint.CORRUPT_DIR)   # moved aside, not deleted
    assert len(moved) == 1 and moved[0].startswith(f"{bad_step}")


def test_tools_read_the_newest_intact_checkpoint_and_name_a_damaged_one(tmp_path, tiny_cfg,
                                                                          caplog):
    root = _saved(tmp_path, tiny_cfg, [1, 2])
    _truncate(root)
    with caplog.at_level(logging.WARNING):
        cfg, params, step, _ = checkpoint.load_params(str(tmp_path))
    assert step == 1 and cfg == tiny_cfg
    helpers.assert_trees_close(jax.device_get(params),
                               jax.device_get(_state(tiny_cfg, 1).params), rtol=0, atol=0)
    assert re.search(r"using checkpoint step 1: step 2 has state/\S+ of \d+ bytes, not \d+",
                     caplog.text), caplog.text
    assert sorted(os.listdir(root)) == ["1", "2"]    # a reader moves nothing
    with pytest.raises(ValueError, match=r"checkpoint step 2 in \S+ has state/\S+ of \d+ bytes"):
        checkpoint.load_params(str(tmp_path), 2)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 5 in .*\[1, 2\]"):
        checkpoint.load_params(str(tmp_path), 5)
    os.remove(pathlib.Path(root, "1", checkpoint.INTEGRITY))    # the edit below is ours
    meta = pathlib.Path(root, "1", "meta", "metadata")
    saved = json.loads(meta.read_text())
    saved["config"]["model"]["future_field"] = 1
    meta.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"step 1 in \S+ holds a model config this jaxgpt does "
                                         r"not know \(.*future_field"):
        checkpoint.load_params(str(tmp_path), 1)


def test_an_integrity_record_not_ours_falls_back_to_the_files_every_step_has(tmp_path,
                                                                            tiny_cfg):
    root = _saved(tmp_path, tiny_cfg, [1])
    for record in ("[1]", '{"val_loss": 1.0}'):
        pathlib.Path(f"{root}/1/{checkpoint.INTEGRITY}").write_text(record)
        assert checkpoint.verify_step(f"{root}/1")[0] is None
    os.remove(f"{root}/1/state/_METADATA")
    assert checkpoint.verify_step(f"{root}/1")[0] == "is missing state/_METADATA"


def test_tools_refuse_a_checkpoint_failing_its_checksums(tmp_path, tiny_cfg, caplog):
    root = _saved(tmp_path, tiny_cfg, [1, 2])
    _flip(root)        # one byte of raw float data: it would decode, into a wrong number
    with caplog.at_level(logging.WARNING):
        assert checkpoint.load_params(str(tmp_path))[2] == 1
    assert re.search(r"using checkpoint step 1: step 2 has state/\S+ failing its CRC32 check",
                     caplog.text), caplog.text
    with pytest.raises(ValueError, match=r"checkpoint step 2 in \S+ has state/\S+ failing "
                                         r"its CRC32 check"):
        checkpoint.load_params(str(tmp_path), 2)


def test_tools_name_a_checkpoint_whose_arrays_cannot_be_decoded(tmp_path, tiny_cfg):
    root = _saved(tmp_path, tiny_cfg, [1])
    path = _biggest_file(f"{root}/1/state/ocdbt.process_0/d")    # its size stays the same
    raw = bytearray(pathlib.Path(path).read_bytes())
    raw[:64] = bytes(b ^ 0xFF for b in raw[:64])
    pathlib.Path(path).write_bytes(bytes(raw))
    os.remove(f"{root}/1/{checkpoint.INTEGRITY}")    # unvouched: only the read can tell
    with pytest.raises(ValueError, match=r"checkpoint step 1 in \S+ could not be read: \w"):
        checkpoint.load_params(str(tmp_path))
    # The command line says so in one line, without orbax's abandoned reads (a page of
    # tensorstore specs per array) reported after it.
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.sample", f"--checkpoint={tmp_path}",
                           "--prompt=a"], cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 1
    assert re.fullmatch(r"error: checkpoint step 1 in \S+ could not be read: [^\n]+\n",
                        proc.stderr), proc.stderr[-3000:]


def test_keeps_newest_plus_best_and_never_saves_nonfinite(tmp_path, tiny_cfg):
    root = _saved(tmp_path, tiny_cfg, [1, 2, 3, 4, 5], [3.0, 1.0, 2.0, 4.0, 5.0], keep=2)
    assert sorted(os.listdir(root)) == ["2", "4", "5"]
    ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
    bad = _state(tiny_cfg, 6)
    bad = bad.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan),
                                          bad.params))
    with pytest.raises(faults.Halt, match="refusing to checkpoint step 6"):
        ckpts.save(bad, {}, {})
    ckpts.close()
    assert sorted(os.listdir(root)) == ["2", "4", "5"]


def test_a_step_killed_before_its_integrity_record_keeps_its_val_loss(tmp_path, tiny_cfg):
    """The record is written at the next save point: a kill before it must not make the
    run's best checkpoint look unscored, and pruning delete it."""
    ckpts = checkpoint.Checkpoints(str(tmp_path), keep=1)
    ckpts.save(_state(tiny_cfg, 3), {"pos": 3}, {}, val_loss=1.0)
    ckpts.manager.wait_until_finished()
    ckpts._pending = None                    # killed: the save finished, no record written
    ckpts.manager.close()
    root = tmp_path / "checkpoints"
    assert not (root / "3" / checkpoint.INTEGRITY).exists()
    ckpts = checkpoint.Checkpoints(str(tmp_path), keep=1)
    restored = ckpts.restore(_abstract(_state(tiny_cfg, 3)), check_meta=lambda s, m: None)
    assert int(restored[0].step) == 3
    record = json.loads((root / "3" / checkpoint.INTEGRITY).read_text())
    assert record["val_loss"] == 1.0 and record["files"]   # recorded, with its checksums
    ckpts.save(_state(tiny_cfg, 6), {"pos": 6}, {}, val_loss=2.0)
    ckpts.close()
    assert sorted(os.listdir(root)) == ["3", "6"]           # the newest, and the best


def test_resume_refuses_another_optimizers_state_even_when_changes_are_allowed():
    from jaxgpt import checks
    from jaxgpt import config as config_lib
    config = config_lib.base_config()
    saved = {"config": config.to_dict(), "tokenizer": "t", "pipeline": "p"}
    config.optim.optimizer = "muon"
    config.checkpoint.allow_config_change = True
    meta = {**saved, "config": config.to_dict()}
    with pytest.raises(ValueError, match="step 7 holds adamw optimizer state, but "
                                         "optim.optimizer is 'muon'"):
        checks.resume_guard(config, meta)(7, saved)
    del saved["config"]["optim"]["optimizer"]          # written before the option existed
    with pytest.raises(ValueError, match="holds adamw optimizer state"):
        checks.resume_guard(config, meta)(7, saved)
    config.optim.optimizer = "adamw"
    checks.resume_guard(config, {**saved, "config": config.to_dict()})(7, saved)


def test_workdir_lock(tmp_path):
    first = faults.WorkdirLock(str(tmp_path))
    first.acquire()
    with pytest.raises(faults.Halt, match=r"workdir locked by pid \d+ on host \S+") as e:
        faults.WorkdirLock(str(tmp_path)).acquire()
    assert e.value.exit_code == faults.EXIT_LOCKED
    first.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "LOCK").write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}"}}')
    taker = faults.WorkdirLock(str(tmp_path))
    taker.acquire()                       # stale: its pid is gone on this host
    assert str(os.getpid()) in (tmp_path / "LOCK").read_text()
    taker.release()
    assert not (tmp_path / "LOCK").exists()
    # This pid, taken by a process started earlier (a restarted container's trainer, often
    # pid 1): a previous life's lock. The same pid started at the same time (another pid
    # namespace on this host, or not knowing) is refused.
    host, started = os.uname().nodename, faults._started()
    (tmp_path / "LOCK").write_text(json.dumps({"pid": os.getpid(), "host": host,
                                               "started": started}))
    with pytest.raises(faults.Halt, match=f"workdir locked by pid {os.getpid()}"):
        faults.WorkdirLock(str(tmp_path)).acquire()
    (tmp_path / "LOCK").write_text(json.dumps({"pid": os.getpid(), "host": host,
                                               "started": started - 1}))
    faults.WorkdirLock(str(tmp_path)).acquire()
    # Empty (a kill between creating and writing it): refused while fresh, taken when old.
    (tmp_path / "LOCK").write_text("")
    with pytest.raises(faults.Halt, match="LOCK is empty: a trainer is taking it"):
        faults.WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - 60
    os.utime(tmp_path / "LOCK", (old, old))
    faults.WorkdirLock(str(tmp_path)).acquire()
    assert str(os.getpid()) in (tmp_path / "LOCK").read_text()


# ---------------------------------------------------------------- in-process training runs


@pytest.fixture(scope="module")
def shared_tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return bench.prepare(str(root))   # (corpus, tokenizer path) shared by every run


def _config(shared_tok, **changes):
    corpus, tok = shared_tok
    base = {"model__resid_pdrop": 0.1, "data__tokenizer_path": tok, "sample__max_new_tokens": 0,
            "checkpoint__every": 2, "checkpoint__keep": 3, "eval__every": 0}
    return helpers.tiny_run_config(corpus, **{**base, **changes})


def _host(state):
    return jax.device_get((state.params, state.opt_state, state.rng))


def _bits_equal(a, b) -> bool:
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_exact_resume_and_mutation_controls(tmp_path, shared_tok, monkeypatch):
    straight = train.train_and_evaluate(_config(shared_tok), str(tmp_path / "straight"))
    train.train_and_evaluate(_config(shared_tok, train__steps=3), str(tmp_path / "seg"))
    ledger = faults.read_ledger(str(tmp_path / "straight"))
    assert [r["step"] for r in ledger] == [1, 2, 3, 4, 5, 6]
    caught = {}
    for mutation in ("", "data", "rng", "opt"):
        workdir = str(tmp_path / f"resume-{mutation or 'ok'}")
        shutil.copytree(tmp_path / "seg", workdir)
        monkeypatch.setenv("JAXGPT_TEST_BREAK_RESTORE", mutation)
        resumed = train.train_and_evaluate(_config(shared_tok), workdir)
        same = (_bits_equal(_host(straight["state"]), _host(resumed["state"]))
                and faults.read_ledger(workdir) == ledger)
        if not mutation:
            assert same, "a clean resume must be bit-identical to the straight run"
        else:
            caught[mutation] = not same
    assert caught == {"data": True, "rng": True, "opt": True}


@pytest.mark.slow
def test_nonfinite_halt_skip_and_consecutive_skips(tmp_path, shared_tok):
    with pytest.raises(faults.Halt, match="non-finite loss nan at step 4"):
        train.train_and_evaluate(_config(shared_tok, train__inject_nan_at_step=4),
                                 str(tmp_path / "halt"))
    assert os.listdir(tmp_path / "halt" / "checkpoints") == ["2"]   # none at or after 4
    out = train.train_and_evaluate(
        _config(shared_tok, train__inject_nan_at_step=3, train__nonfinite="skip",
                checkpoint__every=1, checkpoint__keep=6), str(tmp_path / "skip"))
    assert out["skipped_steps"] == 1
    assert [r["skipped"] for r in faults.read_ledger(str(tmp_path / "skip"))] == \
        [False, False, True, False, False, False]
    p2, p3, p4 = (checkpoint.load_params(str(tmp_path / "skip"), s)[1] for s in (2, 3, 4))
    assert _bits_equal(p2, p3) and not _bits_equal(p3, p4)   # step 3's update was dropped
    with pytest.raises(faults.Halt, match="2 consecutive non-finite steps up to step 3"):
        train.train_and_evaluate(
            _config(shared_tok, train__inject_nan_at_step=2, train__inject_nan_steps=9,
                    train__nonfinite="skip", train__max_consecutive_skips=2),
            str(tmp_path / "skip2"))
    # Skips in a row are counted across a resume: 2 before the stop at step 3, 1 after.
    skip3 = {"train__inject_nan_at_step": 2, "train__inject_nan_steps": 9,
             "train__nonfinite": "skip", "train__max_consecutive_skips": 3,
             "checkpoint__every": 1}
    out = train.train_and_evaluate(_config(shared_tok, train__steps=3, **skip3),
                                   str(tmp_path / "skip3"))
    assert out["skipped_steps"] == 2
    with pytest.raises(faults.Halt, match="3 consecutive non-finite steps up to step 4"):
        train.train_and_evaluate(_config(shared_tok, **skip3), str(tmp_path / "skip3"))


@pytest.mark.slow
def test_rollback_guards_and_lock_in_a_run(tmp_path, shared_tok, caplog):
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(_config(shared_tok), workdir)
    assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["2", "4", "6"]
    # Rollback: newer steps are moved aside and the replay saves 4 and 6 again (orbax
    # alone would decline them) and ends bit-identical.
    again = train.train_and_evaluate(_config(shared_tok, checkpoint__restore_step=2), workdir)
    assert _bits_equal(_host(first["state"]), _host(again["state"]))
    assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["2", "4", "6"]
    assert sorted(n.split("-")[0] for n in os.listdir(f"{workdir}/checkpoints.rolledback")) \
        == ["4", "6"]
    # The same command again (a preempted job requeued): the rollback was done, and the
    # steps after it are its own continuation, not rolled back on every start.
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(_config(shared_tok, checkpoint__restore_step=2), workdir)
    assert "checkpoint.restore_step 2 was applied already by this same config: step 6 " \
        "continues" in caplog.text
    assert len(os.listdir(f"{workdir}/checkpoints.rolledback")) == 2
    caplog.clear()
    # A second try with another setting (a lower learning rate) does roll back again.
    train.train_and_evaluate(_config(shared_tok, checkpoint__restore_step=2,
                                     optim__learning_rate=1e-4), workdir)
    assert len(os.listdir(f"{workdir}/checkpoints.rolledback")) == 4
    # A damaged step asked for by number is an error, not a fall back past it.
    damaged = _biggest_file(f"{workdir}/checkpoints/4")
    intact = pathlib.Path(damaged).read_bytes()
    pathlib.Path(damaged).write_bytes(bytes([intact[0] ^ 1]) + intact[1:])
    with pytest.raises(ValueError, match=r"checkpoint.restore_step 4: .* failing its CRC32"):
        train.train_and_evaluate(_config(shared_tok, checkpoint__restore_step=4), workdir)
    assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["2", "4", "6"]
    pathlib.Path(damaged).write_bytes(intact)
    before = helpers.tree_hash(workdir)
    with pytest.raises(ValueError, match=r"model.n_layer: 2 -> 3"):
        train.train_and_evaluate(_config(shared_tok, model__n_layer=3), workdir)
    with pytest.raises(ValueError, match=r"train.seed: 0 -> 1"):
        train.train_and_evaluate(_config(shared_tok, train__seed=1), workdir)
    # Refused before other token shards are prepared into the workdir (checked below).
    with pytest.raises(ValueError, match=r"data.max_documents: 0 -> 5"):
        train.train_and_evaluate(_config(shared_tok, data__max_documents=5), workdir)
    (tmp_path / "run" / "LOCK").write_text(f'{{"pid": {os.getppid()}, "host": '
                                           f'"{os.uname().nodename}"}}')
    with pytest.raises(faults.Halt, match=f"workdir locked by pid {os.getppid()} on host"):
        train.train_and_evaluate(_config(shared_tok), workdir)
    os.remove(tmp_path / "run" / "LOCK")
    assert helpers.tree_hash(workdir) == before
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(_config(shared_tok, train__seed=1, train__steps=7,
                                         checkpoint__allow_config_change=True), workdir)
    assert "despite differing fields: train.seed" in caplog.text


# ---------------------------------------------------------------- bad input


def _bad_inputs(tmp_path, shared_tok):
    non_utf8 = tmp_path / "latin1.txt"
    non_utf8.write_bytes(b"fine line\ncaf\xe9\n")
    a_file = tmp_path / "plain_file"
    a_file.write_text("not a directory")
    return [  # (changes, workdir or None for the run's, text the error must contain)
        ({"train__batch_size": 0}, None, "train.batch_size"),
        ({"data__path": str(tmp_path / "missing.txt")}, None, "missing.txt"),
        ({"data__block_size": 1000}, None, "data.block_size"),
        ({"data__path": str(non_utf8)}, None, "latin1.txt:2"),
        ({"data__val_fraction": 1.5}, None, "data.val_fraction"),
        ({"model__n_layer": 3}, None, "model.n_layer"),
        ({"train__seed": 3}, None, "train.seed"),
        ({"sample__prompts": ("x " * 80,), "sample__max_new_tokens": 8}, None,
         "sample.prompts[0]"),
        ({"checkpoint__restore_step": 5}, None, "checkpoint.restore_step 5"),
        ({"checkpoint__keep": 0}, None, "checkpoint.keep"),
        ({"train__nonfinite": "explode"}, None, "train.nonfinite"),
        ({"mesh__rules": "bogus"}, None, "mesh.rules"),
        ({}, str(a_file), "not a directory"),
    ]


def _contents(target: str) -> str:
    return helpers.tree_hash(target) if os.path.isdir(target) else pathlib.Path(
        target).read_text()


@pytest.mark.slow
def test_bad_inputs_are_rejected_and_change_nothing(tmp_path, shared_tok):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config(shared_tok, train__steps=2), workdir)

    def corrupt_cache():   # an id the model cannot embed (JAX would clamp it silently)
        shard = min(glob.glob(f"{workdir}/data/*/train/**/*.bin", recursive=True))
        tokens = np.memmap(shard, dtype=np.uint16, mode="r+")
        tokens[5] = 999
        tokens.flush()

    cases = _bad_inputs(tmp_path, shared_tok)
    cases.append(({}, None, "token id 999 >= the tokenizer's vocab_size 384"))
    for i, (changes, target, expect) in enumerate(cases):
        if i == len(cases) - 1:
            corrupt_cache()
        target = target or workdir
        before = _contents(target)
        t0 = time.time()
        with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as e:
            train.train_and_evaluate(_config(shared_tok, **changes), target)
        assert time.time() - t0 < 10, changes
        assert expect in str(e.value), (changes, str(e.value))
        after = _contents(target)
        assert after == before, f"{changes} changed {target}"


@pytest.mark.slow
def test_ids_past_the_tokenizer_in_a_padded_vocabulary_are_refused(tmp_path, shared_tok):
    """A tokenizer file of 384 pieces serves a model of 512 rows (padded, as GPT-2's 50257
    in 50304); an id in the padding is no token and stops the run (JAX would embed it)."""
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config(shared_tok, model__vocab_size=512, train__steps=1),
                             workdir)
    shard = min(glob.glob(f"{workdir}/data/*/train/**/*.bin", recursive=True))
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+")
    tokens[5] = 400
    tokens.flush()
    before = helpers.tree_hash(workdir)
    with pytest.raises(ValueError, match="train data holds token id 400 >= the tokenizer's "
                                         "vocab_size 384"):
        train.train_and_evaluate(_config(shared_tok, model__vocab_size=512, train__steps=2),
                                 workdir)
    assert helpers.tree_hash(workdir) == before


@pytest.mark.slow
def test_cli_bad_input_exits_nonzero_naming_it(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("existing run")
    before = helpers.tree_hash(workdir)
    cases = [(["--config=configs/default.py", "--config.train.bogus=1"], "bogus"),
             (["--config=configs/nope.py"], "nope.py"),
             (["--config=configs/default.py", "--config.train.batch_size=0"],
              "train.batch_size")]
    procs = [(subprocess.Popen([sys.executable, "-m", "jaxgpt.main", *args,
                                f"--workdir={workdir}"], cwd=helpers.REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT), expect)
             for args, expect in cases]
    for proc, expect in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and expect in out, out[-2000:]
    assert helpers.tree_hash(workdir) == before


# ---------------------------------------------------------------- subprocess faults


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_tok):
    """An uninterrupted 12-step CLI run: what every interrupted run must reproduce."""
    root = os.path.dirname(shared_tok[0])
    workdir = os.path.join(root, "reference")
    bench.run_to_end(bench.run_args(workdir, *shared_tok, steps=12))
    return workdir


@pytest.mark.slow
def test_chaos_kill9_resume_is_bit_identical(reference, shared_tok):
    root = os.path.dirname(shared_tok[0])
    out = bench.chaos(root, kills=3, steps=12, seed=1, reference=reference)
    assert out["identical"], out["why"]
    assert out["survived"] == 3 and max(out["resumes"]) > 0, out   # a restore happened


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_identically(reference, shared_tok, tmp_path):
    workdir = str(tmp_path / "term")
    args = bench.run_args(workdir, *shared_tok, steps=12)
    proc = subprocess.Popen(args, cwd=helpers.REPO, stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "step 3/12" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest[-2000:]
    step = int(rest.split("preempted: checkpoint at step ")[1].split()[0])
    assert 3 <= step < 12 and str(step) in os.listdir(f"{workdir}/checkpoints")
    bench.run_to_end(args)
    same, why = bench.identical(reference, workdir)
    assert same, why


@pytest.mark.slow
def test_watchdog_exits_a_stuck_trainer(tmp_path, shared_tok):
    args = bench.run_args(str(tmp_path / "hang"), *shared_tok, steps=12)
    args += ["--config.train.inject_hang_at_step=4", "--config.train.watchdog_min_s=2"]
    t0 = time.time()
    out = subprocess.run(args, cwd=helpers.REPO, capture_output=True, text=True, timeout=180,
                         check=False)
    assert out.returncode == faults.EXIT_STALLED, out.stderr[-2000:]
    assert "stalled after step 3:" in out.stdout + out.stderr
    assert time.time() - t0 < 120


def test_watchdog_counts_finished_steps_not_dispatched_ones(tmp_path, shared_tok):
    """Dispatch returns before a step runs, so a log interval's steps queue up and the host
    then waits for all of them at once (~4 s here): progress is each step finishing (~0.1
    s apart), not a 4 s silence after 40 steps dispatched in no time."""
    args = bench.run_args(str(tmp_path / "run"), *shared_tok, steps=40)
    args += ["--config.model.n_layer=4", "--config.model.n_embd=256", "--config.model.n_head=4",
             "--config.model.resid_pdrop=0", "--config.data.block_size=64",
             "--config.train.batch_size=16", "--config.train.log_every=40",
             "--config.eval.every=0", "--config.checkpoint.every=1000",
             "--config.train.watchdog_min_s=2", "--config.train.watchdog_factor=10"]
    out = subprocess.run(args, cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "stalled" not in out.stdout + out.stderr


def test_watchdog_arms_at_the_first_finished_step_and_a_repeated_step_is_no_progress():
    stalls = []
    dog = faults.Watchdog(0.2, 3.0, poll_s=0.01, on_stall=stalls.append)
    try:
        time.sleep(0.5)           # the first step (compiling, then running) is not timed
        dog.beat(1)
        for _ in range(40):       # the same step seen finished again and again
            time.sleep(0.02)
            dog.beat(1)
        assert len(stalls) == 1 and stalls[0].startswith("watchdog: stalled after step 1:")
    finally:
        dog.stop()


def test_watchdog_times_phases_against_their_own_earlier_runs():
    stalls = []
    dog = faults.Watchdog(0.2, 3.0, poll_s=0.01, on_stall=stalls.append)
    dog.start()
    try:
        for step in range(1, 4):                 # steps of ~0.01 s: a step limit of 0.2 s
            time.sleep(0.01)
            dog.beat(step)
        with dog.phase("evaluation"):            # the first run (compiling) is not timed
            time.sleep(0.4)
        with dog.phase("checkpoint save"):       # nor the first run of another phase
            time.sleep(0.3)
        with dog.phase("evaluation"):            # within max(0.2, 3 x 0.4 s)
            time.sleep(0.6)
        assert stalls == []
        dog.beat(4)
        with dog.phase("checkpoint save"):       # past max(0.2, 3 x 0.3 s)
            time.sleep(1.6)
        assert len(stalls) == 1, stalls
        assert re.match(r"watchdog: stalled in checkpoint save after step 4: no progress for "
                        r"[0-9.]+ s \(limit 0\.9 s\)", stalls[0]), stalls[0]
    finally:
        dog.stop()
    late = []
    dog = faults.Watchdog(0.2, 3.0, poll_s=0.01, on_stall=late.append)
    dog.start()
    try:
        dog.beat(1)
        time.sleep(1.0)                          # no step for longer than the 0.2 s floor
        assert len(late) == 1 and late[0].startswith("watchdog: stalled after step 1:")
    finally:
        dog.stop()


# ---------------------------------------------------------------- two local processes


def _launch(workdir, shared_tok, steps, extra=((), ())):
    """Two jax.distributed CPU processes running jaxgpt.main; extra[i]: rank i's flags."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = bench.run_args(workdir, *shared_tok, steps=steps)[3:]
    return [subprocess.Popen([sys.executable, "tests/process_main.py", str(i), "2", str(port),
                              "--", *args, *extra[i]], cwd=helpers.REPO, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i in range(2)]


def _finish(procs, timeout=180):
    outs = []
    for p in procs:
        outs.append(p.stderr.read())
        p.wait(timeout=timeout)
    return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_two_processes_sigterm_to_one_rank_stops_both_at_one_step(tmp_path, shared_tok):
    workdir = str(tmp_path / "mp")
    # Steps of milliseconds: JAX agrees on the stop step asynchronously, so the run is long
    # enough that the notice always lands before its end.
    procs = _launch(workdir, shared_tok, steps=40)
    for line in procs[0].stderr:   # only process 0 logs progress
        if "step 3/40" in line:
            procs[1].send_signal(signal.SIGTERM)   # rank 1 only
            break
    codes, outs = _finish(procs)
    assert codes == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    stops = [re.search(r"preempted: checkpoint at step (\d+)", o) for o in outs]
    assert all(stops), "a rank did not stop early:\n" + outs[0][-1500:] + outs[1][-1500:]
    stops = [int(m[1]) for m in stops]
    assert stops[0] == stops[1] < 40, stops
    codes, outs = _finish(_launch(workdir, shared_tok, steps=40))
    assert codes == [0, 0], outs[0][-2000:]
    assert [r["step"] for r in faults.read_ledger(workdir)] == list(range(1, 41))


@pytest.mark.slow
def test_two_processes_config_mismatch_and_stuck_rank_exit_all(tmp_path, shared_tok):
    codes, outs = _finish(_launch(str(tmp_path / "a"), shared_tok, steps=4,
                                  extra=((), ("--config.train.seed=1",))))
    assert codes[0] != 0 and codes[1] != 0
    assert all("process 1: train.seed: 0 -> 1" in o for o in outs), outs[0][-2000:]
    assert not os.path.exists(tmp_path / "a" / "checkpoints")
    t0 = time.time()
    codes, outs = _finish(_launch(str(tmp_path / "b"), shared_tok, steps=12, extra=(
        ("--config.train.watchdog_min_s=15",),
        ("--config.train.watchdog_min_s=15", "--config.train.inject_hang_at_step=4"))))
    # Both ranks stop at step 4 (rank 1 stuck, rank 0 blocked in a collective): the first
    # watchdog to fire ends its process and JAX aborts the other on the lost peer
    # (heartbeat timeout), unless its own watchdog fires first.
    assert faults.EXIT_STALLED in codes and 0 not in codes, codes
    assert re.search(r"stalled after step [34]:", outs[0] + outs[1])
    assert time.time() - t0 < 150


def test_checkpoint_saved_on_2_devices_restores_onto_1_and_4(tmp_path, tiny_cfg):
    tx = optax.adam(1e-3)

    def trainer(n):
        mesh = sharding.make_mesh((1, n, 1), jax.devices()[:n])
        return train.make_trainer(tiny_cfg, tx, mesh, sharding.RULES["fsdp"], seed=0)

    two = trainer(2)
    state = two.init()
    ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
    ckpts.save(state, {"pos": 1}, {})
    ckpts.close()
    expect = jax.device_get(state)
    for n in (1, 4):
        target = trainer(n)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                jax.eval_shape(target.init), target.state_shardings)
        ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
        restored, _, _ = ckpts.restore(abstract, check_meta=lambda s, m: None)
        ckpts.close()
        assert restored.params["wte"]["embedding"][...].sharding == \
            target.state_shardings.params["wte"]["embedding"].get_value()
        assert _bits_equal(expect, jax.device_get(restored))


def test_resume_allows_speed_and_location_changes_the_pipeline_fingerprint_accepts(caplog):
    from jaxgpt import checks
    from jaxgpt import config as config_lib
    config = config_lib.base_config()
    saved = {"config": config.to_dict(), "tokenizer": "t", "pipeline": "p"}
    config.data.prefetch, config.data.on_bad_record = 9, "skip"
    config.data.path = "/moved/copy"
    config.model.attention, config.model.scan_layers = "dot_product", True
    meta = {**saved, "config": config.to_dict()}
    with caplog.at_level(logging.INFO):
        checks.resume_guard(config, meta)(7, saved)           # same pipeline: accepted
    assert "data.on_bad_record: 'error' -> 'skip'" in caplog.text
    assert "model.attention: 'einsum' -> 'dot_product'" in caplog.text
    config.model.dtype = "bfloat16"                           # other numbers: refused
    with pytest.raises(ValueError, match=r"model.dtype: 'float32' -> 'bfloat16'.*resume as "
                                         r"it was with --config.model.dtype=float32, or"):
        checks.resume_guard(config, {**meta, "config": config.to_dict()})(7, saved)
    config.model.dtype = "float32"
    with pytest.raises(ValueError, match=r"pipeline: 'p' -> 'q'; data.on_bad_record: "
                                         r"'error' -> 'skip'; data.path"):
        checks.resume_guard(config, {**meta, "pipeline": "q"})(7, saved)
    config.data.block_size = 64
    with pytest.raises(ValueError, match=r"data.block_size: 128 -> 64"):
        checks.resume_guard(config, {**meta, "config": config.to_dict()})(7, saved)


def test_a_checkpoint_older_than_a_field_resumes_while_the_field_keeps_its_default():
    """Fields added to the schema after a checkpoint was written count as their defaults
    (what runs did before them): such a checkpoint resumes; a changed value is refused."""
    config = helpers.tiny_run_config("corpus.txt")
    saved = {"config": config.to_dict()}
    del saved["config"]["data"]["val_max_documents"], saved["config"]["model"]["qk_norm"]
    checks.resume_guard(config, {"config": config.to_dict()})(5, saved)
    config.data.val_max_documents = 7
    with pytest.raises(ValueError, match=r"differing fields: data.val_max_documents: 0 -> 7"):
        checks.resume_guard(config, {"config": config.to_dict()})(5, saved)


# ---------------------------------------------------------------- a run's life cycle


def _own_tokenizer_run(shared_tok, workdir, **changes):
    """A run whose tokenizer is its own WORKDIR/tokenizer.model (a copy of the shared one)."""
    os.makedirs(workdir, exist_ok=True)
    if not os.path.exists(os.path.join(workdir, "tokenizer.model")):
        shutil.copy(shared_tok[1], os.path.join(workdir, "tokenizer.model"))
    return _config(shared_tok, data__tokenizer_path=None, **changes)


@pytest.mark.slow
def test_a_run_moved_rolled_back_refused_finished_and_extended(tmp_path, shared_tok, caplog):
    """One run directory through the events of a run's life, each checked as it happens."""
    from jaxgpt import tokenizer
    first, moved = str(tmp_path / "first"), str(tmp_path / "moved")
    run = lambda workdir, **changes: train.train_and_evaluate(_own_tokenizer_run(
        shared_tok, workdir, optim__warmup_steps=1, train__log_every=1, **changes), workdir)
    steps = lambda workdir: sorted(int(n) for n in os.listdir(
        os.path.join(workdir, "checkpoints")) if n.isdigit())
    run(first, train__steps=4)
    assert steps(first) == [2, 4]

    # Asked for fewer steps than it has done: nothing to train, nothing written.
    before = helpers.tree_hash(first)
    with caplog.at_level(logging.WARNING, logger="jaxgpt.train"):
        out = run(first, train__steps=3)
    assert int(out["state"].step) == 4 and out["train"] == {}
    assert "at step 4 already, not before train.steps 3: nothing to train" in caplog.text
    assert "recomputed" not in caplog.text
    assert helpers.tree_hash(first) == before

    # A rollback the resume guard refuses (data.path may change, its tokens may not) moves
    # no checkpoint.
    other = tmp_path / "other.txt"
    other.write_text(pathlib.Path(shared_tok[0]).read_text()[::-1])
    with pytest.raises(ValueError, match="incompatible run"):
        run(first, train__steps=4, data__path=str(other), checkpoint__restore_step=2)
    assert steps(first) == [2, 4]
    assert not os.path.exists(os.path.join(first, "checkpoints.rolledback"))

    # A rollback that goes ahead sets the abandoned records aside: steps only go forward.
    lines = pathlib.Path(first, "metrics.jsonl").read_text().splitlines()
    run(first, train__steps=4, checkpoint__restore_step=2)
    records = report_records(first)
    aside = pathlib.Path(first, "metrics.abandoned.jsonl").read_text().splitlines()
    assert aside == [x for x in lines if json.loads(x)["step"] > 2]
    assert records[:len(lines) - len(aside)] == [
        json.loads(x) for x in lines if json.loads(x)["step"] <= 2]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    assert steps(first) == [2, 4]

    # Moved: the tools find its own tokenizer, and it resumes there.
    os.rename(first, moved)
    step, meta = checkpoint.read_meta(moved)
    assert step == 4 and meta["tokenizer"]["path"] == os.path.join(moved, "tokenizer.model")
    assert tokenizer.from_meta(meta).fingerprint == meta["tokenizer"]["fingerprint"]

    # More steps: the schedule is recomputed, and the log says what the next lr becomes.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxgpt.train"):
        out = run(moved, train__steps=8)
    assert int(out["state"].step) == 8
    assert [r["step"] for r in faults.read_ledger(moved)] == list(range(1, 9))
    line = next(r.getMessage() for r in caplog.records if "recomputed" in r.getMessage())
    assert "resuming step 4 with train.steps 4 -> 8" in line
    # The lr it names for step 5 is the one the resumed run logs; the saved schedule's is
    # its floor (the 4-step cosine had decayed to learning_rate * min_lr_ratio).
    lr_now, lr_was = map(float, re.search(r"runs at lr (\S+) \((\S+) under", line).groups())
    logged = next(r for r in report_records(moved) if r.get("step") == 5 and "lr" in r)
    assert lr_now == pytest.approx(logged["lr"], rel=1e-3)
    config = _config(shared_tok)
    assert lr_was == pytest.approx(config.optim.learning_rate * config.optim.min_lr_ratio,
                                   rel=1e-3)


def report_records(workdir):
    return [json.loads(x) for x in pathlib.Path(workdir, "metrics.jsonl").read_text()
            .splitlines()]


@pytest.mark.slow
def test_rates_leave_out_evaluation_time_and_the_eta_counts_it(tmp_path, shared_tok,
                                                                monkeypatch):
    real = train.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config(shared_tok, train__steps=6, train__log_every=2,
                                     eval__every=2), workdir)
    logs = {r["step"]: r for r in report_records(workdir) if "tokens_per_s" in r}
    tokens_per_step = 8 * 32
    # Steps 3-4 follow the 1 s evaluation at step 2: counted in, they could not beat
    # 2 steps / 1 s; and one evaluation is still to come at step 6.
    assert logs[4]["tokens_per_s"] > 5 * (2 * tokens_per_step / 1.0)
    assert logs[4]["eta_s"] >= 1.0


def test_tasks_every_n_steps_still_to_come():
    # evaluations at 2, 4, 6 and the last step 7: after step 3, three remain (4, 6, 7)
    assert [train._occurrences(d, 7, 2) for d in range(8)] == [4, 4, 3, 3, 2, 2, 1, 0]
    assert [train._occurrences(d, 6, 3) for d in range(7)] == [2, 2, 2, 1, 1, 1, 0]
    assert train._occurrences(0, 6, 0) == 0


def test_a_named_tokenizer_file_must_exist(tmp_path, shared_tok):
    workdir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="data.tokenizer_path .*typo.model' does not "
                                                "exist"):
        train.train_and_evaluate(_config(shared_tok, data__tokenizer_path=str(
            tmp_path / "typo.model")), str(workdir))
    assert not workdir.exists() and not (tmp_path / "typo.model").exists()


@pytest.mark.slow
def test_a_validation_split_smaller_than_one_eval_batch_is_scored_whole(tmp_path, shared_tok):
    from jaxgpt import data, tokenizer
    workdir = str(tmp_path / "run")
    out = train.train_and_evaluate(_config(shared_tok, train__steps=2, eval__every=2,
                                           eval__batch_size=1024), workdir)
    dcfg = data.DataConfig.from_config(_config(shared_tok).data)
    corpus = data.load_corpus(dcfg, tokenizer.load("sentencepiece", shared_tok[1]),
                              os.path.join(workdir, "data"))
    assert 0 < len(corpus.val) < 1024
    assert out["eval"]["val_tokens"] == len(corpus.val) * 32
