# Sourced by the launch scripts: `run CMD ARGS...` prints the command, and runs it unless DRY_RUN=1.
# Everything else they print starts with `# `, so that the output of --dry-run is a bash script that
# does what the real run would do (tests/test_launch.py runs it against fake cluster commands).
# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"
WORKDIR="" DATA_DIR="" CONFIG="configs/vit_b.py" EXTRA=()
# This checkout (absolute), whatever directory the script was started from.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

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

# Sets CONFIG_FILE to the absolute path of --config's file and CONFIG_ARGS to what follows it (the
# `:epochs=800` of `configs/vit_b.py:epochs=800`). A relative path is read from the current directory,
# else from this checkout, so that the default configs work from any directory; a name without a
# slash that is neither (vit_b, vit_b.py) is a packaged config, masksub_jax/configs/NAME.py, as the
# trainer takes it (masksub_jax/cli.py resolve_config_arg).
find_config() {
  local file="${CONFIG%%:*}" packaged="${REPO}/masksub_jax/configs"
  CONFIG_ARGS="${CONFIG#"${file}"}"
  if [[ "${file}" != /* && ! -f "${file}" && -f "${REPO}/${file}" ]]; then file="${REPO}/${file}"; fi
  if [[ ! -f "${file}" && "${file}" != */* && "${file}" != _* && -f "${packaged}/${file%.py}.py" ]]; then
    file="${packaged}/${file%.py}.py"
  fi
  [[ -f "${file}" ]] || die "--config: there is no file ${file} (a relative path is looked for in the current directory, then in ${REPO}), nor a packaged config of that name: $(config_names "${packaged}")"
  CONFIG_FILE="$(cd "$(dirname "${file}")" && pwd)/$(basename "${file}")"
}

# The packaged configs' names (the files NAME.py of folder $1, but _*.py), separated by spaces.
config_names() {
  local path names=()
  for path in "$1"/*.py; do
    path="$(basename "${path}" .py)"
    if [[ "${path}" != _* && -f "$1/${path}.py" ]]; then names+=("${path}"); fi
  done
  echo "${names[*]-}"
}

# $1 as an absolute path (from the current directory), unless it is absolute already or a URL (gs://).
absolute() {
  if [[ -z "$1" || "$1" == /* || "$1" == *://* ]]; then echo "$1"; else echo "${PWD}/${1#./}"; fi
}

# For a job that starts in this checkout rather than where the script runs: --config, --workdir and
# --data_dir as absolute paths.
absolute_paths() {
  find_config
  CONFIG="${CONFIG_FILE}${CONFIG_ARGS}"
  WORKDIR="$(absolute "${WORKDIR}")"
  DATA_DIR="$(absolute "${DATA_DIR}")"
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

# Installs this checkout into its own .venv on Python 3.11 (whatever python3 the machine has) with JAX
# for the accelerator ($1: cuda or tpu) at the tested versions (constraints.txt), and sets PYTHON to
# that venv's python: launch/masksub_worker.sh install. Runs where the script runs (a SLURM login node
# has the network that compute nodes often lack); a no-op when all is installed.
install_here() {
  PYTHON="${REPO}/.venv/bin/python"
  run bash "${REPO}/launch/masksub_worker.sh" install "${REPO}" "$1"
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
