#!/usr/bin/env bash
# Manage a Cloud TPU VM or pod slice for jaxcompress.
#
#   tpu_scripts/tpu.sh [--dry-run] COMMAND [ARGS...]
#
#   create   create the TPU VM or pod slice
#   setup    copy the package to every worker and install it there, in a Python 3.11
#            virtual environment made by uv (TPU VM images ship Python 3.10)
#   mount    mount the bucket $BUCKET at $MOUNT on every worker with Cloud Storage FUSE
#            (gcsfuse --implicit-dirs), installing gcsfuse from Google's apt repository where
#            it is missing; the workers' service account needs read and write access to the
#            bucket (e.g. roles/storage.objectUser)
#   launch   run `jaxcompress $JOB` in the background on every worker; ARGS are passed on,
#            e.g. `launch --set mesh.fsdp=-1 --set mesh.data=1`
#   status   describe the TPU
#   logs     follow worker 0's log (on a pod slice only process 0 logs)
#   fetch    copy the run directory into $FETCH_DIR: with `gcloud storage cp` from the bucket
#            when BUCKET is set and WORKDIR lies below MOUNT, else with scp from worker 0
#   delete   delete the TPU
#
# Settings come from the environment: TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_TYPE (v4-8, v4-32,
# v5litepod-16, ...), TPU_RUNTIME and TPU_HOSTS (defaults from TPU_TYPE), JOB (finetune, recipe
# or sweep), CONFIG (a config spec such as configs/finetune.py:sst2), WORKDIR, FETCH_DIR, BUCKET
# (a bucket name) and MOUNT (where `mount` puts it, /mnt/jc by default).
#
# WORKDIR is a path on the workers, never a gs:// URL: a run directory is written with local
# file APIs (metrics.jsonl is appended to, which Cloud Storage objects cannot be), so to keep a
# run in a bucket, `mount` it and pass a path below MOUNT, e.g. WORKDIR=/mnt/jc/sst2.
# Pod slices: a slice with more than one host runs the same command on every worker with
# `--set distributed=True`, and jax.distributed.initialize() finds the other workers.
# Checkpoints are then written collectively, so WORKDIR must be an absolute path on a file
# system every worker shares at that path: the bucket mounted by `mount`, or a Filestore or
# other NFS mount; a relative WORKDIR is refused.
# Hosts per slice: the number in v2, v3, v4 and v5p types counts TensorCores, 8 per host (v4-8:
# 1 host, v4-32: 4); in v5litepod and v6e types it counts chips, up to 8 on one host and 4 per
# host in larger slices (v5litepod-8: 1 host, v5litepod-16: 4). TPU_HOSTS overrides this.
#
# --dry-run prints the exact commands instead of running them.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
COMMAND="${1:-}"
shift || true

usage() {
  echo "usage: $0 [--dry-run] {create|setup|mount|launch [ARGS...]|status|logs|fetch|delete}" >&2
  exit 2
}

# Hosts (TPU VMs) in a slice of type $1, or nothing when the type is not of the form NAME-N.
slice_hosts() {
  local family="${1%-*}" size="${1##*-}"
  if [[ ! "$size" =~ ^[0-9]+$ ]]; then
    return
  elif ((size <= 8)); then
    echo 1
  elif [[ "$family" == v5litepod || "$family" == v6e ]]; then
    echo $((size / 4))
  else
    echo $((size / 8))
  fi
}

# The runtime (VM image) each TPU generation needs.
default_runtime() {
  case "$1" in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

: "${TPU_NAME:=jaxcompress}"
: "${TPU_ZONE:=us-central2-b}"
: "${TPU_TYPE:=v4-8}"
: "${TPU_RUNTIME:=$(default_runtime "$TPU_TYPE")}"
: "${TPU_HOSTS:=$(slice_hosts "$TPU_TYPE")}"
: "${TPU_PROJECT:=$(gcloud config get-value project 2>/dev/null || echo unset-project)}"
: "${JOB:=finetune}"
: "${CONFIG:=configs/finetune.py:sst2}"
: "${WORKDIR:=runs/tpu}"
: "${FETCH_DIR:=runs}"
: "${BUCKET:=}"
: "${MOUNT:=/mnt/jc}"
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"
MOUNT="${MOUNT%/}"
RUN_NAME="${WORKDIR%/}"
RUN_NAME="${RUN_NAME##*/}"
LOG="logs/$RUN_NAME.log" # on each worker, under ~/jaxcompress

# One shell word as it would be typed: bare when that is safe, else in single quotes (only the
# value of a --flag=value).
word() {
  local flag=""
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
    return
  elif [[ "$1" =~ ^--[a-z-]+= ]]; then
    flag="${BASH_REMATCH[0]}"
  fi
  local value="${1#"$flag"}"
  printf "%s'%s'" "$flag" "${value//\'/\'\\\'\'}"
}

# All arguments as one command line.
words() {
  local line="" arg
  for arg in "$@"; do
    line+="${line:+ }$(word "$arg")"
  done
  printf '%s' "$line"
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(words "$@")"
  else
    "$@"
  fi
}

tpu() {
  run gcloud compute tpus tpu-vm "$@" --zone="$TPU_ZONE" --project="$TPU_PROJECT"
}

if [[ "$COMMAND" != launch && $# -gt 0 ]]; then
  usage
fi

case "$COMMAND" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME"
    ;;
  setup)
    cd "$(dirname "$0")/.." # copy from the repository root, by relative paths
    tpu ssh "$TPU_NAME" --worker=all --command="mkdir -p ~/jaxcompress"
    tpu scp --recurse --worker=all pyproject.toml README.md jaxcompress configs \
      "$TPU_NAME:~/jaxcompress"
    tpu ssh "$TPU_NAME" --worker=all --command="cd ~/jaxcompress \
&& python3 -m pip install -q --user uv \
&& python3 -m uv venv -q --allow-existing --python 3.11 .venv \
&& python3 -m uv pip install -q --python .venv/bin/python -e . \"jax[tpu]\""
    ;;
  mount)
    if [[ -z "$BUCKET" || "$BUCKET" == */* || "$MOUNT" != /* ]]; then
      echo "mount needs BUCKET=NAME (a bucket, not a path) and an absolute MOUNT" >&2
      usage
    fi
    tpu ssh "$TPU_NAME" --worker=all --command="(command -v gcsfuse > /dev/null || { \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null \
&& curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null \
&& sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }) \
&& sudo mkdir -p $(word "$MOUNT") && sudo chown \$USER $(word "$MOUNT") \
&& (mountpoint -q $(word "$MOUNT") || gcsfuse --implicit-dirs $(word "$BUCKET") $(word "$MOUNT"))"
    ;;
  launch)
    case "$JOB" in
      finetune | recipe) job=(.venv/bin/jaxcompress "$JOB" --config "$CONFIG") ;;
      sweep) job=(.venv/bin/jaxcompress sweep "$CONFIG") ;;
      *)
        echo "JOB must be finetune, recipe or sweep, not '$JOB'" >&2
        exit 2
        ;;
    esac
    job+=(--workdir "$WORKDIR")
    if [[ "$WORKDIR" == gs://* ]]; then
      echo "WORKDIR cannot be a gs:// URL ('$WORKDIR'): a run directory needs a file system." \
        "Mount the bucket on every worker (BUCKET=NAME $0 mount, at MOUNT=$MOUNT) and pass" \
        "a path below the mount, e.g. WORKDIR=$MOUNT/${RUN_NAME}" >&2
      exit 2
    elif [[ ! "$TPU_HOSTS" =~ ^[0-9]+$ ]]; then
      echo "cannot tell the hosts of TPU_TYPE=$TPU_TYPE: set TPU_HOSTS" >&2
      exit 2
    elif ((TPU_HOSTS > 1)); then
      if [[ "$WORKDIR" != /* ]]; then
        echo "$TPU_TYPE has $TPU_HOSTS hosts: WORKDIR needs an absolute path on a shared" \
          "mount, e.g. $MOUNT/RUN (see \`mount\`), not '$WORKDIR'" >&2
        exit 2
      fi
      job+=(--set distributed=True)
    fi
    job+=("$@")
    tpu ssh "$TPU_NAME" --worker=all --command="cd ~/jaxcompress && mkdir -p logs \
&& nohup $(words "${job[@]}") > $(word "$LOG") 2>&1 < /dev/null &"
    ;;
  status)
    tpu describe "$TPU_NAME"
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 50 -f ~/jaxcompress/$(word "$LOG")"
    ;;
  fetch)
    run mkdir -p "$FETCH_DIR"
    if [[ -n "$BUCKET" && "$WORKDIR" == "$MOUNT"/?* ]]; then
      below="${WORKDIR#"$MOUNT"/}"
      run gcloud storage cp -r "gs://$BUCKET/${below%/}" "$FETCH_DIR"
    elif [[ "$WORKDIR" == /* ]]; then
      tpu scp --recurse --worker=0 "$TPU_NAME:$WORKDIR" "$FETCH_DIR"
    else
      tpu scp --recurse --worker=0 "$TPU_NAME:~/jaxcompress/$WORKDIR" "$FETCH_DIR"
    fi
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    usage
    ;;
esac
