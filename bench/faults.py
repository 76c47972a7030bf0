"""Chaos resume: kill -9 the trainer K times (some mid-save), resume each time, and compare
the final params + optimizer state bit for bit with an uninterrupted run.

    python bench/faults.py --kills 10            # prints: faults survived X/K, kills
                                                 # mid-save M, identical: yes|no
    python bench/faults.py --kills 3 --break-restore data   # a mutation control: must say no

Every segment is a fresh `python -m jaxgpt.main` in its own process group (JAX start-up is
~3 s). A kill "lands mid-save" when, right after it, the newest step directory is an
unfinished orbax temp dir or a finalized step whose checksums were not yet written.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run_args(workdir: str, corpus: str, tokenizer: str, steps: int) -> list[str]:
    """A tiny model (dropout on, so the RNG matters) saving every 2 steps."""
    overrides = {
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.vocab_size": 384,
        "model.n_positions": 64, "model.resid_pdrop": 0.1, "data.path": corpus,
        "data.tokenizer_path": tokenizer, "data.block_size": 32, "train.steps": steps,
        "train.batch_size": 8, "train.log_every": 1, "optim.warmup_steps": 2,
        "eval.every": 4, "eval.batch_size": 8, "eval.batches": 1, "checkpoint.every": 2,
        "checkpoint.keep": 2, "sample.max_new_tokens": 0}
    return [sys.executable, "-m", "jaxgpt.main", "--config=configs/default.py",
            f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def prepare(root: str) -> tuple[str, str]:
    """A ~100 KB real-text corpus and a SentencePiece model shared by every run."""
    from jaxgpt import tokenizer
    corpus = os.path.join(root, "corpus.txt")
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), "rb") as f:
        text = f.read()
    with open(corpus, "wb") as f:
        f.write(text)
    path = os.path.join(root, "tokenizer.model")
    tokenizer.load_or_train_sentencepiece(path, [text.decode()], 384)
    return corpus, path


def run_to_end(args: list[str], env: dict | None = None, timeout: float = 300) -> int:
    """Run a trainer to completion; returns the step it resumed from (0: fresh start)."""
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, **(env or {})), check=False)
    if out.returncode:
        raise RuntimeError(f"trainer exited {out.returncode}:\n{out.stderr[-3000:]}")
    return _resumed_from(out.stderr)


def _resumed_from(text: str) -> int:
    marker = "resumed from step "
    return int(text.split(marker)[1].split()[0]) if marker in text else 0


def _mid_save(workdir: str) -> bool:
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return False
    names = os.listdir(root)
    if any(".orbax-checkpoint-tmp" in n for n in names):
        return True
    steps = sorted(int(n) for n in names if n.isdigit())
    return bool(steps) and not os.path.exists(os.path.join(root, str(steps[-1]),
                                                            "integrity.json"))


def kill_segment(args: list[str], rng: random.Random, env: dict | None = None,
                 timeout: float = 300) -> tuple[bool, int]:
    """Start a trainer and SIGKILL its process group at a random moment: half the time
    0-30 ms after it starts a save, else after a random number of steps. Returns (killed:
    False if the trainer finished first, the step it had resumed from)."""
    target_save = rng.random() < 0.5
    wait_lines = rng.randint(1, 3) if target_save else rng.randint(2, 8)
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    deadline = time.time() + timeout
    seen = resumed = 0
    for line in proc.stderr:
        resumed = resumed or _resumed_from(line)
        hit = "saving checkpoint at step" in line if target_save else "| loss" in line
        seen += hit
        if seen >= wait_lines:
            time.sleep(rng.uniform(0, 0.03))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, resumed
        if time.time() > deadline:
            break
    proc.wait()
    if proc.returncode:
        raise RuntimeError(f"trainer exited {proc.returncode} before it could be killed")
    return False, resumed


def final_state(workdir: str) -> dict:
    """{path: numpy array} of the newest checkpoint's params and optimizer state."""
    import jax
    import orbax.checkpoint as ocp
    # Sharding comes from the saved file (one CPU device here): fine for a comparison.
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    state = restored.state
    manager.close()
    tree = {"params": state["params"], "opt_state": state["opt_state"], "rng": state["rng"],
            "step": state["step"]}
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def identical(ref: str, other: str) -> tuple[bool, str]:
    """Bitwise equality of final states and of the per-step ledgers."""
    from jaxgpt import faults
    a, b = final_state(ref), final_state(other)
    if a.keys() != b.keys():
        return False, "state trees differ"
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes():
            return False, (f"{k} differs (max |diff| "
                           f"{np.abs(a[k].astype(np.float64) - b[k]).max():.3g})")
    la, lb = faults.read_ledger(ref), faults.read_ledger(other)
    if la != lb:
        first = next((x["step"] for x, y in zip(la, lb) if x != y), min(len(la), len(lb)))
        return False, f"ledgers differ from step {first} ({len(la)} vs {len(lb)} steps)"
    return True, f"{len(a)} arrays and {len(la)} ledger steps equal"


def chaos(root: str, kills: int, steps: int, seed: int, env: dict | None = None,
          reference: str | None = None) -> dict:
    """Reference run (unless given), then a run killed `kills` times and resumed."""
    corpus = os.path.join(root, "corpus.txt")
    tok = os.path.join(root, "tokenizer.model")
    if not os.path.exists(tok):
        corpus, tok = prepare(root)
    if reference is None:
        reference = os.path.join(root, "reference")
        run_to_end(run_args(reference, corpus, tok, steps))
    workdir = tempfile.mkdtemp(prefix="chaos-", dir=root)
    rng = random.Random(seed)
    survived = mid_save = 0
    resumes = []   # the step each segment after the first resumed from
    for i in range(kills):
        killed, resumed = kill_segment(run_args(workdir, corpus, tok, steps), rng, env)
        if i:
            resumes.append(resumed)
        if killed:
            mid_save += _mid_save(workdir)
            survived += 1
    resumes.append(run_to_end(run_args(workdir, corpus, tok, steps), env))
    same, why = identical(reference, workdir)
    return {"survived": survived, "kills": kills, "mid_save": mid_save, "identical": same,
            "why": why, "reference": reference, "workdir": workdir, "resumes": resumes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--break-restore", choices=("data", "rng", "opt"), default=None,
                        help="mutation control: disable one part of the restore")
    parser.add_argument("--root", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="jaxgpt-faults-")
    os.makedirs(root, exist_ok=True)
    env = {"JAXGPT_TEST_BREAK_RESTORE": args.break_restore} if args.break_restore else None
    t0 = time.time()
    out = chaos(root, args.kills, args.steps, args.seed, env)
    print(f"faults survived {out['survived']}/{out['kills']}, kills mid-save "
          f"{out['mid_save']}, identical: {'yes' if out['identical'] else 'no'} "
          f"({out['why']}; resumed from steps {out['resumes']}; {time.time() - t0:.0f} s; "
          f"workdirs under {root})")


if __name__ == "__main__":
    main()
