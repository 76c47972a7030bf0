#!/usr/bin/env bash
# N jaxgpt processes on this machine, each with its own CPU devices, talking through
# jax.distributed (coordinator on 127.0.0.1) and gloo collectives: the multi-host code path,
# testable anywhere.
#
#   launch/local.sh N [--devices D] [--port P] [--dry-run] -- MAIN_ARGS...
#   launch/local.sh 2 --devices 4 -- --config=configs/default.py --workdir=runs/two
#
# Every process runs the same `python -m jaxgpt.main MAIN_ARGS`; output lines are prefixed
# with the process index. Exits with the first non-zero status of any process.
set -euo pipefail

usage() { echo "usage: $0 N [--devices D] [--port P] [--dry-run] -- MAIN_ARGS..." >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
n=$1; shift
devices=4; port=${JAXGPT_PORT:-12355}; dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --devices) devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
python=${PYTHON:-python}
repo=$(cd "$(dirname "$0")/.." && pwd)

env_of() {  # the environment of process $1, as NAME=value words
  echo "JAX_PLATFORMS=cpu JAXGPT_COORDINATOR_ADDRESS=127.0.0.1:$port" \
       "JAXGPT_NUM_PROCESSES=$n JAXGPT_PROCESS_ID=$1 JAXGPT_CPU_DEVICES=$devices" \
       "JAXGPT_HEARTBEAT_TIMEOUT=${JAXGPT_HEARTBEAT_TIMEOUT:-10}"
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    echo "[$i] cd $repo && env $(env_of "$i") $python -m jaxgpt.main$(printf " %q" "$@")"
  done
  exit 0
fi

cd "$repo"
pids=()
for ((i = 0; i < n; i++)); do
  (set -o pipefail; env $(env_of "$i") "$python" -m jaxgpt.main "$@" 2>&1 \
     | sed -u "s/^/[$i] /") &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [[ $status == 0 ]] && status=$rc; }
done
exit $status
