"""Entry point: `python -m jaxgpt.main --config=configs/default.py --workdir=DIR`.

Config fields are overridden with `--config.group.field=value`; the config is locked, so a
typo'd field is rejected. Bad input exits non-zero with one clear line.
"""

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxgpt import faults, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:size]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, samples.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that mean "your input is wrong": reported in one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError,
               UnicodeDecodeError)


class _QuietLibraries(logging.Filter):
    """Drop orbax's and grain's INFO chatter (a dozen lines per checkpoint); keep warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
        return record.levelno >= logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    logging.info("JAX %s: %d %s device(s), %d process(es)", jax.__version__,
                 jax.device_count(), jax.default_backend(), jax.process_count())
    try:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as e:
        logging.error("%s: %s", type(e).__name__, e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except faults.Halt as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    if result["preempted"] is not None:
        print(f"preempted: checkpoint at step {result['preempted']} in {FLAGS.workdir}; "
              f"rerun the same command to resume", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
