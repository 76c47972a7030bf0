"""Run `jaxgpt.main` as one of N local CPU processes of a jax.distributed job (tests only; not
named multiprocess.py, which as the script's folder on sys.path would hide the `multiprocess`
package that `datasets` imports).

    python tests/process_main.py PROCESS_ID NUM_PROCESSES PORT -- MAIN_FLAGS...
"""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run():
    process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=10)
    from absl import app

    from jaxgpt import main
    sys.argv = [sys.argv[0], *sys.argv[5:]]
    app.run(main.main)


if __name__ == "__main__":
    _run()
