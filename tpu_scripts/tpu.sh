#!/usr/bin/env bash
# Manage a Cloud TPU VM for jaxcompress: create, setup, launch, logs, fetch, delete.
#
#   tpu_scripts/tpu.sh [--dry-run] COMMAND
#
# Settings come from the environment: TPU_NAME, TPU_ZONE, TPU_TYPE (e.g. v5litepod-8),
# TPU_RUNTIME (e.g. v2-alpha-tpuv5-lite), TPU_PROJECT, and for `launch` CONFIG (a
# config spec such as configs/finetune.py:sst2) and WORKDIR (a run directory on the VM).
# --dry-run prints the exact gcloud commands instead of running them.
# Multi-host pod slices need jax.distributed (the scale issue); today a single-host VM runs.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
COMMAND="${1:-}"

: "${TPU_NAME:=jaxcompress}"
: "${TPU_ZONE:=us-central2-b}"
: "${TPU_TYPE:=v4-8}"
: "${TPU_RUNTIME:=tpu-ubuntu2204-base}"
: "${TPU_PROJECT:=$(gcloud config get-value project 2>/dev/null || echo unset-project)}"
: "${CONFIG:=configs/finetune.py:sst2}"
: "${WORKDIR:=runs/tpu}"

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

tpu() {
  run gcloud compute tpus tpu-vm "$@" --zone="$TPU_ZONE" --project="$TPU_PROJECT"
}

case "$COMMAND" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME"
    ;;
  setup)
    repo_root="$(cd "$(dirname "$0")/.." && pwd)"
    tpu scp --recurse --worker=all "$repo_root" "$TPU_NAME:~/jaxcompress"
    tpu ssh "$TPU_NAME" --worker=all \
      --command="cd ~/jaxcompress && pip install -q -e . 'jax[tpu]'"
    ;;
  launch)
    tpu ssh "$TPU_NAME" --worker=all --command="cd ~/jaxcompress && nohup jaxcompress \
finetune --config $CONFIG --workdir $WORKDIR > $WORKDIR.log 2>&1 &"
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 50 -f ~/jaxcompress/$WORKDIR.log"
    ;;
  fetch)
    tpu scp --recurse --worker=0 "$TPU_NAME:~/jaxcompress/$WORKDIR" "./$WORKDIR"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "usage: $0 [--dry-run] {create|setup|launch|logs|fetch|delete}" >&2
    exit 2
    ;;
esac
