"""Run-level fault handling: workdir lock, stop requests, step watchdog, batch ledger,
cross-process config check, and the `Halt` error that ends a run with a chosen exit code.

Everything here is host-side bookkeeping around the training loop in `train.py`; nothing
touches the jitted steps.
"""

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import statistics
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

EXIT_HALTED = 3      # non-finite loss/gradients or too many skipped steps
EXIT_STALLED = 4     # the watchdog saw no step finish in time
EXIT_LOCKED = 75     # another trainer holds the workdir (EX_TEMPFAIL: retry later)


class Halt(RuntimeError):
    """A run that must stop with `exit_code` and one explanatory line (no traceback)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- workdir lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


_EMPTY_LOCK_S = 10.0   # an empty LOCK older than this was left by a killed writer


def _started() -> int | None:
    """This process's start time (clock ticks after boot; Linux), which tells it from an
    earlier process with the same pid: a restarted container's, or one in another pid
    namespace on the same host."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
_HELD: set = set()     # the LOCK paths this process holds


class WorkdirLock:
    """`WORKDIR/LOCK` holds {"pid", "host"} of the one trainer allowed to write there.

    orbax has no single-writer lock, and two trainers on one workdir delete each other's
    checkpoints. A lock left by a dead pid on this host (or by a process with this one's pid
    that started earlier, as in a restarted container) is taken over with a warning, as is
    one a kill left empty;
    a lock from another host cannot be checked and must be removed by hand.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "LOCK")
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _started()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if self._stale(owner, me):
                    log.warning("taking over stale workdir lock %s (%s)", self.path,
                                f"pid {owner['pid']}" if owner else "left empty")
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                if not owner:
                    raise Halt(f"workdir lock {self.path} is empty: a trainer is taking it "
                               f"(a lock left empty is taken over after {_EMPTY_LOCK_S:.0f} "
                               f"s)", EXIT_LOCKED) from None
                raise Halt(f"workdir locked by pid {owner.get('pid')} on host "
                           f"{owner.get('host')} ({self.path}); if that trainer is gone, "
                           f"delete the file", EXIT_LOCKED) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            _HELD.add(os.path.abspath(self.path))
            return
        raise Halt(f"could not take the workdir lock {self.path}", EXIT_LOCKED)

    def _stale(self, owner: dict, me: dict) -> bool:
        """A lock left on this host by a dead pid, or by an earlier process with this pid (a
        restarted container reuses it, often as pid 1), or left empty by a kill between its
        creation and its write (older than a live writer would take)."""
        if not owner:
            with contextlib.suppress(FileNotFoundError):
                return time.time() - os.path.getmtime(self.path) > _EMPTY_LOCK_S
            return False
        pid = owner.get("pid")
        # This pid, but not this process: one started at another time (a lock this process
        # took is in _HELD).
        earlier_me = (pid == me["pid"] and os.path.abspath(self.path) not in _HELD
                      and me["started"] is not None
                      and owner.get("started") not in (None, me["started"]))
        return (owner.get("host") == me["host"] and isinstance(pid, int)
                and (earlier_me or not _pid_alive(pid)))

    def _owner(self) -> dict:
        try:
            with open(self.path) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            return {}   # unreadable (half-written by a killed trainer): treat as unknown
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        if self.held:
            self.held = False
            _HELD.discard(os.path.abspath(self.path))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# ---------------------------------------------------------------- preemption

class StopRequest:
    """SIGTERM/SIGINT -> finish the current step, save, exit 0.

    Single process: our own handler sets a flag. After `jax.distributed.initialize` JAX
    owns SIGTERM and `reached_preemption_sync_point` makes every process stop at the same
    step (it must be called at every step by all processes).
    """

    def __init__(self):
        self.signal_name = None
        self.distributed = jax.process_count() > 1
        self._previous = {}
        signals = (signal.SIGINT,) if self.distributed else (signal.SIGTERM, signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        if self.distributed:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "preemption notice"
                return True
            # SIGINT is ours on every process; agree on it so all stop at the same step.
            flag = np.int32(self.signal_name is not None)
            return bool(multihost_utils.process_allgather(flag).max())
        return self.signal_name is not None

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ---------------------------------------------------------------- watchdog

class Watchdog:
    """Ends the process when no step finishes for max(min_s, factor * median step time), or
    a phase (evaluation, a checkpoint save) runs past max(min_s, factor * its own longest
    earlier run); a phase's first run, which compiles or sets up, is not timed.

    A peer that is alive but stuck hangs every other process in its next collective
    forever; each process's watchdog then fires and `os._exit` ends it (Python cleanup
    would block on the same collective). Armed after the first step (compilation).
    """

    def __init__(self, min_s: float, factor: float, *, poll_s: float = 0.5, on_stall=None):
        self.min_s, self.factor, self.poll_s = min_s, factor, poll_s
        self.enabled = min_s > 0
        self._on_stall = on_stall or _exit_stalled
        self._lock = threading.Lock()
        self._last = None          # (step, time) of the latest beat
        self._times = []           # recent step durations
        self._phase = None         # (name, start time, limit or None) of the running phase
        self._longest = {}         # phase name -> its longest run so far
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="step-watchdog",
                                            daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """Step `step` has finished; the first beat arms the watchdog (the first step, which
        compiles, is not timed). A step no newer than the last beat's is no progress."""
        now = time.monotonic()
        with self._lock:
            if self._last is not None and step <= self._last[0]:
                return
            if self._last is not None:
                self._times = (self._times + [(now - self._last[1]) / (step - self._last[0])]
                               )[-100:]
            self._last = (step, now)
        if self._thread is None:
            self.start()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Evaluation, checkpoint saves and the like: not steps, timed against themselves."""
        with self._lock:
            longest = self._longest.get(name)
            limit = None if longest is None else max(self.min_s, self.factor * longest)
            outer, self._phase = self._phase, (name, time.monotonic(), limit)
        try:
            yield
        finally:
            with self._lock:
                now = time.monotonic()
                self._longest[name] = max(self._longest.get(name, 0.0), now - self._phase[1])
                self._phase = outer
                if self._last is not None:
                    self._last = (self._last[0], now)

    def timeout(self) -> float:
        median = statistics.median(self._times) if self._times else 0.0
        return max(self.min_s, self.factor * median)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                step = self._last[0] if self._last is not None else 0
                if self._phase is not None:
                    name, since, limit = self._phase
                    where = f"in {name} after step {step}"
                    if limit is None:
                        continue
                elif self._last is not None:
                    since, limit, where = self._last[1], self.timeout(), f"after step {step}"
                else:
                    continue
            waited = time.monotonic() - since
            if waited > limit:
                self._on_stall(f"watchdog: stalled {where}: no progress for {waited:.1f} s "
                               f"(limit {limit:.1f} s) on process {jax.process_index()}; "
                               f"exiting")
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _exit_stalled(message: str) -> None:
    log.error(message)
    print(f"error: {message}", flush=True)
    os._exit(EXIT_STALLED)


# ---------------------------------------------------------------- batch ledger

def batch_digest(local: np.ndarray) -> bytes:
    """16-byte digest of this process's rows of a batch (shape and dtype included)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{local.shape}{local.dtype}".encode())
    h.update(np.ascontiguousarray(local).tobytes())
    return h.digest()


def global_digests(digests: list[bytes]) -> list[str]:
    """Combine every process's per-step digests into one hex hash per global batch."""
    local = np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), 16)
    if jax.process_count() > 1:
        local = multihost_utils.process_allgather(local)      # [P, n, 16]
        local = np.moveaxis(np.asarray(local), 0, 1).reshape(len(digests), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in local]


class Ledger:
    """WORKDIR/ledger.jsonl: {"step", "batch", "loss", "skipped"} per optimizer step, so a
    resumed run can be checked bit for bit against an uninterrupted one. Truncated to the
    restored step on every start, so it always describes the run that produced the
    latest checkpoint."""

    def __init__(self, workdir: str, start_step: int):
        self.path = os.path.join(workdir, "ledger.jsonl")
        self.enabled = jax.process_index() == 0
        if self.enabled:
            truncate_records(self.path, start_step)

    def write(self, records: list[dict]) -> None:
        if self.enabled and records:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def truncate_records(path: str, step: int, aside: str | None = None) -> int:
    """Drop the records of a JSON-lines file newer than `step` (and, from a line cut short
    by a kill, everything after it), rewriting the file atomically; `aside`: append the
    dropped lines there instead of losing them. Returns how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep, dropped = [], []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            dropped += lines[i:]   # a line cut short: everything after it is newer
            break
        (keep if record.get("step", 0) <= step else dropped).append(line)
    if dropped:
        if aside is not None:
            with open(aside, "a") as f:
                f.writelines(x if x.endswith("\n") else x + "\n" for x in dropped)
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    return len(dropped)


def read_ledger(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "ledger.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- config agreement

def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(a: dict, b: dict, prefixes: tuple[str, ...] = ("",)) -> list[tuple]:
    """(dotted name, value in a, value in b) of the fields under `prefixes` that differ."""
    fa, fb = _flatten(json.loads(json.dumps(a))), _flatten(json.loads(json.dumps(b)))
    names = sorted(n for n in set(fa) | set(fb) if n.startswith(prefixes))
    return [(n, fa.get(n, "<absent>"), fb.get(n, "<absent>"))
            for n in names if fa.get(n, "<absent>") != fb.get(n, "<absent>")]


def config_diff(a: dict, b: dict, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """The fields under `prefixes` whose values differ, as 'x.y: a -> b'."""
    return [f"{n}: {old!r} -> {new!r}" for n, old, new in config_changes(a, b, prefixes)]


def assert_same_config_everywhere(config_dict: dict) -> None:
    """Every process must run the same config; a mismatch stops all of them, naming the
    fields that differ from process 0's."""
    if jax.process_count() == 1:
        return
    # The train.inject_* test hooks may differ per process (a stuck rank, say).
    config_dict = dict(config_dict, train={k: v for k, v in config_dict["train"].items()
                                           if not k.startswith("inject_")})
    blob = json.dumps(config_dict, sort_keys=True).encode()
    digest = np.frombuffer(hashlib.sha256(blob).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if (digests == digests[0]).all():
        return
    # Every process gets every config, so each one names the same differing fields.
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(blob))))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(blob)] = np.frombuffer(blob, np.uint8)
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    configs = [json.loads(bytes(b[:n])) for b, n in zip(blobs, sizes)]
    diffs = [f"process {i}: {'; '.join(config_diff(configs[0], c))}"
             for i, c in enumerate(configs) if i and (digests[i] != digests[0]).any()]
    raise ValueError(f"processes run different configs (vs process 0): {' | '.join(diffs)}")


# ---------------------------------------------------------------- non-finite steps

class NonFiniteGuard:
    """Host-side verdict on each step's `finite` flag: halt at the first NaN/Inf (default)
    or, in skip mode (the jitted step already kept the old params), count skips and halt
    after `max_consecutive` in a row."""

    def __init__(self, mode: str, max_consecutive: int):
        self.mode, self.max_consecutive = mode, max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def check(self, step: int, metrics: dict) -> bool:
        """True if the step was skipped; raises `Halt` when the run must stop."""
        if bool(metrics["finite"]):
            self.consecutive = 0
            return False
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        what = (f"loss {loss}" if not np.isfinite(loss) else f"grad_norm {grad_norm}")
        if self.mode == "halt":
            raise Halt(f"non-finite {what} at step {step}; halting with no checkpoint at or "
                       f"after it (train.nonfinite='skip' skips such steps)", EXIT_HALTED)
        self.consecutive += 1
        self.skipped += 1
        log.warning("step %d skipped: non-finite %s (%d in a row, %d in total)", step, what,
                    self.consecutive, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise Halt(f"{self.consecutive} consecutive non-finite steps up to step {step} "
                       f"(last: {what}); halting (train.max_consecutive_skips="
                       f"{self.max_consecutive})", EXIT_HALTED)
        return True
