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

# Sets TRAIN to the trainer's command line for those arguments (with --cluster where CLUSTER=1: JAX
# finds the other processes), and TRAIN_QUOTED to the same as one line that a shell reads back word
# for word.
train_command() {
  TRAIN=("${PYTHON:-python}" -m masksub_jax.main --config="${CONFIG}" --workdir="${WORKDIR}")
  if [[ "${CLUSTER:-0}" == 1 ]]; then TRAIN+=(--cluster); fi
  if [[ -n "${DATA_DIR}" ]]; then TRAIN+=(--config.data.data_dir="${DATA_DIR}"); fi
  TRAIN+=("${EXTRA[@]+"${EXTRA[@]}"}")
  # shellcheck disable=SC2034  # read by the scripts that source this file
  TRAIN_QUOTED=$(quoted "${TRAIN[@]}")
}

# Installs this checkout into its own .venv with JAX for the accelerator ($1: cuda or tpu) at the
# tested versions (constraints.txt), and sets PYTHON to that venv's python. Runs where the script runs
# (a SLURM login node has the network that compute nodes often lack); a no-op when all is installed.
install_here() {
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  PYTHON="${repo}/.venv/bin/python"
  run python3 -m venv "${repo}/.venv"
  run "${PYTHON}" -m pip install -q -e "${repo}[$1]" -c "${repo}/constraints.txt"
}

# Its arguments, each quoted for the shell (printf %q), joined by spaces.
quoted() {
  local out
  printf -v out ' %q' "$@"
  echo "${out# }"
}

# Dies unless $2 (the value of option $1) is a positive integer.
positive_int() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

run() {
  echo "+ $(quoted "$@")"
  if [[ "${DRY_RUN}" != 1 ]]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}
