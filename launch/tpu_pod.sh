#!/usr/bin/env bash
# jaxgpt on a Cloud TPU pod slice: the same command on every worker VM over ssh; jax.distributed
# finds the coordinator and process ids from the TPU metadata (main.py --distributed=on).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--workers N] [--dir REMOTE_DIR] \
#       [--dry-run] -- --config=configs/slimpajama.py:large --workdir=gs://bucket/run
#
# The repository must already be at REMOTE_DIR (default ~/jaxgpt) on every worker, with its
# dependencies installed; the workdir must be shared (a gs:// bucket).
set -euo pipefail

usage() {
  echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--workers N] [--dir D] [--dry-run]" \
       "-- MAIN_ARGS..." >&2
  exit 2
}
tpu=""; zone=""; project=""; workers=4; dir="~/jaxgpt"; dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ -n $tpu && -n $zone ]] || usage

remote="cd $dir && python -m jaxgpt.main --distributed=on$(printf ' %q' "$@")"
gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all
            "--command=$remote")
[[ -n $project ]] && gcloud_cmd+=("--project=$project")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${gcloud_cmd[@]}"; echo
  for ((w = 0; w < workers; w++)); do
    echo "[worker $w] $remote"
  done
  exit 0
fi
exec "${gcloud_cmd[@]}"
