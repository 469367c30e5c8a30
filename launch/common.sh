# Sourced by the launch scripts: `run CMD ARGS...` prints the command, and runs it unless DRY_RUN=1.
# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"
WORKDIR="" DATA_DIR="" CONFIG="configs/vit_b.py" EXTRA=()

# The arguments every launch script takes; returns 1 for any other.
common_arg() {
  case "$1" in
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --config.*) EXTRA+=("$1") ;;
    --dry-run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

# Sets TRAIN to the trainer's command line for those arguments.
train_command() {
  TRAIN=(python -m masksub_jax.main --config="${CONFIG}" --workdir="${WORKDIR}")
  if [[ -n "${DATA_DIR}" ]]; then TRAIN+=(--config.data.data_dir="${DATA_DIR}"); fi
  TRAIN+=("${EXTRA[@]+"${EXTRA[@]}"}")
}

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "${DRY_RUN}" != 1 ]]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}
