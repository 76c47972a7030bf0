"""Multi-process training on CPU through launch/local.sh, and the launch scripts' dry runs."""

import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import helpers

LAUNCH = os.path.join(helpers.REPO, "launch")
# decay_steps fixed so runs of different lengths share one learning-rate schedule.
TINY = ["--config=configs/default.py", "--config.model.n_layer=2", "--config.model.n_head=2",
        "--config.model.n_embd=32", "--config.model.vocab_size=384",
        "--config.model.n_positions=64", "--config.data.block_size=32",
        "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.optim.warmup_steps=2", "--config.optim.decay_steps=50",
        "--config.eval.batch_size=8", "--config.eval.batches=2",
        "--config.checkpoint.every=2", "--config.sample.max_new_tokens=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


def _one_process(args, workdir, devices=8):
    out = helpers.run_main(*args, f"--workdir={workdir}", f"--cpu_devices={devices}",
                           env={"JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _dry_run(script, *args) -> list[str]:
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_local_dry_run_prints_each_process():
    lines = _dry_run("local.sh", "2", "--devices", "4", "--port", "4321", "--dry-run", "--",
                     "--config=configs/default.py", "--workdir=/tmp/a b")
    assert len(lines) == 2
    for i, line in enumerate(lines):
        words = shlex.split(line.split("&&", 1)[1])
        assert words[0] == "env"
        env = dict(w.split("=", 1) for w in words[1:] if "=" in w and not w.startswith("--"))
        assert env["JAXGPT_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
        assert env["JAXGPT_NUM_PROCESSES"] == "2" and env["JAXGPT_PROCESS_ID"] == str(i)
        assert env["JAXGPT_CPU_DEVICES"] == "4" and env["JAX_PLATFORMS"] == "cpu"
        assert words[-4:] == ["-m", "jaxgpt.main", "--config=configs/default.py",
                              "--workdir=/tmp/a b"]   # quoting survives


def test_slurm_dry_run_per_gpu_and_per_node():
    per_gpu = _dry_run("slurm.sbatch", "--dry-run", "--nodes", "2", "--ntasks-per-node", "4",
                       "--", "--workdir=/shared/run")
    assert per_gpu[0].startswith("srun --nodes=2 --ntasks-per-node=4 ")
    assert len(per_gpu) == 1 + 8
    assert "SLURM_PROCID=7 " in per_gpu[-1] and "SLURM_LOCALID=3 " in per_gpu[-1]
    assert "JAXGPT_LOCAL_DEVICE_IDS= " in per_gpu[-1]   # jax picks GPU SLURM_LOCALID
    assert per_gpu[-1].endswith("-m jaxgpt.main --distributed=on --workdir=/shared/run")
    per_node = _dry_run("slurm.sbatch", "--dry-run", "--nodes", "3", "--ntasks-per-node", "1",
                        "--gpus-per-node", "4", "--", "--workdir=/w")
    assert len(per_node) == 1 + 3
    assert all("JAXGPT_LOCAL_DEVICE_IDS=0,1,2,3 " in line for line in per_node)


def test_slurm_runs_the_words_its_dry_run_prints(tmp_path):
    """The real path hands srun each argument as given (parentheses, spaces, quotes), and
    the dry run prints exactly that command, quoted for a shell."""
    (tmp_path / "srun").write_text('#!/usr/bin/env bash\n'
                                   'python3 -c "import json, sys; print(json.dumps(sys.argv))" '
                                   '"$@"\n')
    (tmp_path / "srun").chmod(0o755)
    args = ["--nodes", "1", "--ntasks-per-node", "2", "--", "--config.mesh.shape=(2,2,2)",
            "--workdir=/shared/my run's"]
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "SLURM_CPUS_PER_TASK": "6"}
    out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), *args], env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    argv = json.loads(out.stdout)[1:]
    assert argv[:4] == ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=6",
                        "--kill-on-bad-exit=1"]
    assert argv[-6:] == ["python", "-m", "jaxgpt.main", "--distributed=on",
                         "--config.mesh.shape=(2,2,2)", "--workdir=/shared/my run's"]
    dry = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--dry-run", *args],
                         env=env, capture_output=True, text=True, timeout=30, check=True)
    assert shlex.split(dry.stdout.splitlines()[0]) == ["srun", *argv]


def test_launch_environments_that_name_no_peers(tmp_path):
    """A process of a SLURM allocation that srun did not start runs alone (jax's detection
    would fail, or wait for peers that never come); a process count without a coordinator,
    or --distributed=on where no cluster names the peers, is a one-line error."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    base = ["--config=configs/default.py", f"--workdir={not_a_dir}"]
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "TPU_", "JAXGPT_"))}

    def run(*args, **env):
        out = subprocess.run([sys.executable, "-m", "jaxgpt.main", *base, *args],
                             cwd=helpers.REPO, env={**clean, **env}, capture_output=True,
                             text=True, timeout=120, check=False)
        return out.returncode, out.stderr

    rc, err = run(SLURM_JOB_ID="7", SLURM_NTASKS="4", SLURM_PROCID="0", SLURM_LOCALID="0",
                  SLURM_STEP_NODELIST="localhost")
    assert "SLURM_NTASKS=4, but srun did not start this process: it runs alone" in err
    assert rc == 2 and f"workdir {not_a_dir} exists and is not a directory" in err
    rc, err = run("--num_processes=2", "--process_id=1")
    assert rc == 1 and "--num_processes=2 --process_id=1 need --coordinator_address" in err
    rc, err = run("--distributed=on")
    assert rc == 1 and "jax.distributed.initialize: coordinator_address should be" in err
    assert "Traceback" not in err


def test_tpu_pod_dry_run():
    lines = _dry_run("tpu_pod.sh", "--tpu", "pod1", "--zone", "us-central2-b", "--workers",
                     "4", "--dry-run", "--", "--workdir=gs://b/run")
    gcloud = shlex.split(lines[0])
    assert gcloud[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1",
                          "--zone=us-central2-b"]
    assert "--worker=all" in gcloud
    assert ("--command=cd ~/jaxgpt && python -m jaxgpt.main --distributed=on "
            "--workdir=gs://b/run") in gcloud
    assert lines[1:] == [f"[worker {w}] cd ~/jaxgpt && python -m jaxgpt.main --distributed=on "
                         f"--workdir=gs://b/run" for w in range(4)]
    bad = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_in_one(tmp_path):
    corpus = helpers.small_corpus(tmp_path)
    # A benchmark scored at every eval (LAMBADA's format, argparse's docstrings as passages).
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "Return the namespace populated with the parsed arguments",
        "Add an argument to the parser with these options", "Print a help message")))
    args = TINY + [f"--config.data.path={corpus}", "--config.eval.every=4",
                   f"--config.eval.tasks=lambada={lambada}"]
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(args + ["--config.train.steps=6"], one)
    out = subprocess.run(
        ["bash", os.path.join(LAUNCH, "local.sh"), "2", "--devices", "4", "--port",
         str(_free_port()), "--", *args, "--config.train.steps=4", f"--workdir={two}"],
        cwd=helpers.REPO, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[1] " in out.stdout and "2 process(es)" in out.stdout
    reference = _losses(one)
    assert all(0 < r["mfu"] < 1 for r in _records(two) if "loss" in r)
    for step, loss in _losses(two).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    val = {r["step"]: r["val_loss"] for r in _records(two) if "val_loss" in r}
    ref_val = {r["step"]: r["val_loss"] for r in _records(one) if "val_loss" in r}
    assert val[4] == pytest.approx(ref_val[4], rel=1e-5)
    # Both processes scored the benchmark with the params sharded over both.
    lambada_ppl = {r["step"]: r["lambada/ppl"] for r in _records(two) if "val_loss" in r}
    ref_ppl = {r["step"]: r["lambada/ppl"] for r in _records(one) if "val_loss" in r}
    assert lambada_ppl[4] == pytest.approx(ref_ppl[4], rel=1e-5)
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]
    # The checkpoint both processes wrote resumes in one process, on the same trajectory.
    _one_process(args + ["--config.train.steps=6"], two)
    resumed = _losses(two)
    for step in (5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step


@pytest.mark.slow
def test_processes_that_hold_the_same_rows_feed_the_same_data(tmp_path):
    """The batch split fewer ways than there are processes (tensor parallel across hosts:
    the batch is not split at all here): processes sharing rows read the same ones, and the
    run trains and evaluates on the batches one process with 8 devices does."""
    corpus = helpers.small_corpus(tmp_path)
    args = TINY + [f"--config.data.path={corpus}", "--config.model.n_head=8",
                   "--config.mesh.shape=(1,1,-1)", "--config.mesh.rules=fsdp_tp",
                   "--config.train.steps=3", "--config.eval.every=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(args, one)
    out = subprocess.run(
        ["bash", os.path.join(LAUNCH, "local.sh"), "2", "--devices", "4", "--port",
         str(_free_port()), "--", *args, f"--workdir={two}"],
        cwd=helpers.REPO, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reference, got = _records(one), _records(two)
    for key in ("loss", "val_loss"):
        want = {r["step"]: r[key] for r in reference if key in r}
        assert {r["step"]: r[key] for r in got if key in r} == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_killed_process_stops_the_others(tmp_path):
    corpus = helpers.small_corpus(tmp_path)
    args = TINY + [f"--config.data.path={corpus}", "--config.train.steps=100000",
                   "--config.eval.every=0", "--config.checkpoint.every=100000",
                   f"--workdir={tmp_path}"]
    lines = _dry_run("local.sh", "2", "--port", str(_free_port()), "--dry-run", "--", *args)
    procs = []
    for line in lines:
        words = shlex.split(line.split("&&", 1)[1])[1:]   # after `env`
        env = dict(os.environ, **dict(w.split("=", 1) for w in words
                                      if w.split("=")[0].isupper()))
        cmd = [sys.executable] + [w for w in words if not w.split("=")[0].isupper()][1:]
        procs.append(subprocess.Popen(cmd, cwd=helpers.REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 120
        while not os.path.exists(tmp_path / "metrics.jsonl"):   # training has started
            assert time.time() < deadline and procs[0].poll() is None, procs[0].stdout.read()
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        output, _ = procs[0].communicate(timeout=60)
        assert time.time() - killed_at < 60   # local.sh's heartbeat timeout is 10 s
        assert procs[0].returncode != 0
        assert "another task died" in output or "stopped sending heartbeats" in output
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_two_processes_stream_and_resume_exactly(tmp_path):
    # SlimPajama's layout, one document per paragraph of argparse's source.
    text = pathlib.Path(helpers.small_corpus(tmp_path)).read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    for split, docs in (("train", paragraphs[:-40]), ("validation", paragraphs[-40:])):
        (tmp_path / "sp" / split).mkdir(parents=True)
        with open(tmp_path / "sp" / split / "chunk.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d, "meta": {"redpajama_set_name": "S"}}) + "\n"
                         for d in docs)
    args = TINY + [f"--config.data.path={tmp_path / 'sp'}", "--config.data.source=slimpajama",
                   "--config.data.streaming=True", "--config.data.shuffle_windows=8",
                   "--config.eval.every=0"]

    def launch(workdir, steps):
        out = subprocess.run(
            ["bash", os.path.join(LAUNCH, "local.sh"), "2", "--devices", "2", "--port",
             str(_free_port()), "--", *args, f"--config.train.steps={steps}",
             f"--workdir={workdir}"],
            cwd=helpers.REPO, capture_output=True, text=True, timeout=240, check=False)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    launch(tmp_path / "a", 5)
    launch(tmp_path / "b", 3)      # blocks of 2 batches: it stops inside the second block
    with open(tmp_path / "b" / "checkpoints" / "3" / "data" / "metadata") as f:
        state = json.load(f)
    assert len(state["processes"]) == 2 and state["processes"][0] != state["processes"][1]
    launch(tmp_path / "b", 5)
    straight, resumed = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    for step in (4, 5):
        assert resumed[step] == straight[step], step
