# Sourced by the launch scripts: `run CMD ARGS...` prints the command, and runs it unless DRY_RUN=1.
# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"

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
