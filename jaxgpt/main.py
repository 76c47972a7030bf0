"""Entry point: `python -m jaxgpt.main --config=configs/default.py --workdir=DIR`.

Config fields are overridden with `--config.group.field=value`; the config is locked, so a
typo'd field is rejected. Bad input exits non-zero with one clear line.

Multi-host: every process runs this same command. `jax.distributed.initialize` runs first,
before anything touches a device, from `--coordinator_address --num_processes --process_id`
(defaults: the JAXGPT_COORDINATOR_ADDRESS, JAXGPT_NUM_PROCESSES, JAXGPT_PROCESS_ID
environment variables, which the `launch/` scripts set), or from the cluster's own
environment on SLURM and TPU pods. Only process 0 logs at INFO and writes reports.
"""

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxgpt import config as config_schema
from jaxgpt import faults, train

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:size]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, samples.")
flags.mark_flags_as_required(["config", "workdir"])


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise app.UsageError(f"environment variable {name}={value!r} is not an integer")
    return int(value)


flags.DEFINE_enum("distributed", os.environ.get("JAXGPT_DISTRIBUTED", "auto"),
                  ["auto", "on", "off"],
                  "jax.distributed: auto = when a coordinator is given or SLURM / a TPU pod "
                  "runs several processes; on = always (cluster auto-detection); off = never.")
flags.DEFINE_string("coordinator_address", os.environ.get("JAXGPT_COORDINATOR_ADDRESS"),
                    "host:port of process 0's coordination service.")
flags.DEFINE_integer("num_processes", None,
                     "Processes in the job (default: $JAXGPT_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None,
                     "This process's index in [0, num_processes) (default: $JAXGPT_PROCESS_ID).")
flags.DEFINE_integer("cpu_devices", None, "CPU devices in this process (jax_num_cpu_devices; "
                     "default: $JAXGPT_CPU_DEVICES); for testing the multi-host path on CPUs.")
flags.DEFINE_list("local_device_ids", os.environ.get("JAXGPT_LOCAL_DEVICE_IDS") or None,
                  "Accelerators this process uses, e.g. 0,1,2,3 (default: all, or on SLURM "
                  "the one GPU SLURM_LOCALID).")
flags.DEFINE_integer("heartbeat_timeout", None, "Seconds without a heartbeat after which a "
                     "process counts as dead and the others exit with an error "
                     "(default: $JAXGPT_HEARTBEAT_TIMEOUT or 100).")

# Errors that mean "your input is wrong": reported in one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError,
               UnicodeDecodeError)


class _QuietLibraries(logging.Filter):
    """Drop orbax's and grain's INFO chatter (a dozen lines per checkpoint); keep warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
        return record.levelno >= logging.WARNING or not noisy


def _slurm_step_tasks() -> int:
    """Tasks of the SLURM job step this process is one of: srun sets SLURM_STEP_NUM_TASKS.
    A process of an allocation that srun did not start (`salloc -n4` then `python ...`) is
    alone, whatever the job's SLURM_NTASKS: jax's SLURM detection would fail or wait for
    peers that never come."""
    if "SLURM_JOB_ID" not in os.environ:
        return 1
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    job_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if not tasks and job_tasks > 1:
        log.warning("SLURM_NTASKS=%d, but srun did not start this process: it runs alone "
                    "(start every process with srun, e.g. launch/slurm.sbatch)", job_tasks)
    return tasks or 1


def _cluster_runs_several_processes() -> bool:
    """A SLURM job step of several tasks, or a multi-host TPU slice (jax then detects the
    rest)."""
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return _slurm_step_tasks() > 1 or tpu_pod


def init_distributed() -> None:
    """Start jax.distributed per the flags/environment; must precede any device use."""
    cpu_devices = FLAGS.cpu_devices or _env_int("JAXGPT_CPU_DEVICES")
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    num_processes = FLAGS.num_processes or _env_int("JAXGPT_NUM_PROCESSES")
    process_id = FLAGS.process_id if FLAGS.process_id is not None else _env_int(
        "JAXGPT_PROCESS_ID")
    explicit = FLAGS.coordinator_address is not None
    if FLAGS.distributed == "off":
        return
    cluster = not explicit and _cluster_runs_several_processes()
    if not explicit and not cluster and (num_processes is not None or process_id is not None):
        raise app.UsageError(f"--num_processes={num_processes} --process_id={process_id} "
                             f"need --coordinator_address (or JAXGPT_COORDINATOR_ADDRESS), "
                             f"unless SLURM or a TPU pod starts the processes")
    if FLAGS.distributed == "auto" and not explicit and not cluster:
        return
    if explicit and (num_processes is None or process_id is None):
        raise app.UsageError(f"--coordinator_address={FLAGS.coordinator_address} needs "
                             f"--num_processes and --process_id (or JAXGPT_NUM_PROCESSES and "
                             f"JAXGPT_PROCESS_ID)")
    # CPU devices of different processes talk through gloo (no-op for GPU/TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    heartbeat = FLAGS.heartbeat_timeout or _env_int("JAXGPT_HEARTBEAT_TIMEOUT") or 100
    try:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address, num_processes=num_processes,
            process_id=process_id, heartbeat_timeout_seconds=heartbeat,
            local_device_ids=[int(i) for i in FLAGS.local_device_ids or ()] or None,
            initialization_timeout=max(60, 3 * heartbeat), shutdown_timeout_seconds=heartbeat)
    except ValueError as e:   # e.g. --distributed=on where no cluster says who the peers are
        raise app.UsageError(f"jax.distributed.initialize: {e} (--distributed="
                             f"{FLAGS.distributed}; give --coordinator_address, start the "
                             f"processes with srun, or use --distributed=off)") from None


def _parents(path: str):
    while (parent := os.path.dirname(path)) != path:
        yield parent
        path = parent


def _workdir_error(e: OSError, workdir: str) -> str | None:
    """One line for an OSError creating `workdir` (or a parent) or taking its lock; None for
    one about another path, which is no input's fault and keeps its traceback."""
    if not isinstance(e.filename, str):
        return None
    path, target = os.path.abspath(e.filename), os.path.abspath(workdir)
    if path == os.path.abspath(faults.WorkdirLock(workdir).path):
        return f"workdir {workdir} cannot be locked: {e.strerror} ({e.filename})"
    if path != target and not target.startswith(path + os.sep):
        return None
    file = next((p for p in _parents(target) if os.path.isfile(p)), None)
    why = f"{file} is a file, not a directory" if file else e.strerror
    return f"workdir {workdir} cannot be created: {why}" + (
        f" ({e.filename})" if path != target and not file else "")


def _train(config, workdir: str) -> dict:
    """train.train_and_evaluate; bad input (config, data, workdir) exits 2 with one line."""
    try:
        return train.train_and_evaluate(config, workdir)
    except USER_ERRORS as e:
        log.error("%s: %s", type(e).__name__, e)
        message = str(e)
    except ConnectionError as e:   # the HF hub, for a dataset or model named by hub id
        log.error("%s: %s", type(e).__name__, e)
        message = (f"{e} (hub names need the network; point data.path, "
                   f"data.tokenizer_path or init_from at local files instead)")
    except OSError as e:
        message = _workdir_error(e, workdir)
        if message is None:
            raise
        log.error("%s: %s", type(e).__name__, message)
    except faults.Halt as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    init_distributed()
    cache = config_schema.use_compilation_cache(FLAGS.config.train.compilation_cache)
    # Process 0 speaks for the job; the others report warnings and errors only.
    logging.getLogger().setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    log.info("JAX %s: %d %s device(s), %d process(es); compilation cache %s", jax.__version__,
             jax.device_count(), jax.default_backend(), jax.process_count(), cache or "off")
    result = _train(FLAGS.config, FLAGS.workdir)
    if result["preempted"] is not None:
        print(f"preempted: checkpoint at step {result['preempted']} in {FLAGS.workdir}; "
              f"rerun the same command to resume", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=config_schema.parse_flags)
