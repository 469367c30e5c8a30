#!/usr/bin/env bash
# What runs on the machine that trains: the launch scripts run it there (launch/tpu_vm.sh copies it to
# every TPU worker's home; launch/gpu_node.sh and launch/slurm_gpu.sh run `install` on the node they
# start from). Each command is idempotent, so rerunning a launch command repeats nothing that is done.
#
#   masksub_worker.sh install CHECKOUT EXTRA [ARCHIVE]  unpack ARCHIVE (a git archive) into CHECKOUT, then
#       install CHECKOUT into CHECKOUT/.venv with its EXTRA (cuda, tpu) at the tested versions
#       (constraints.txt), on Python 3.11 whatever the machine's python3 is (uv fetches a standalone
#       CPython into CHECKOUT/.python where none is installed). A no-op when that is installed already,
#       and while a trainer started here runs.
#   masksub_worker.sh start CHECKOUT -- COMMAND...  run COMMAND in CHECKOUT detached from this session
#       (it survives the end of the ssh connection), its output in CHECKOUT/train.log and its exit
#       status in CHECKOUT/train.exit. Not started again while it runs.
#   masksub_worker.sh status CHECKOUT       running / finished / preempted (exit 75) / failed (exit N)
#   masksub_worker.sh logs CHECKOUT [LINES|follow]  the last LINES (100) lines of train.log, or follow it
set -euo pipefail

# The Python the package is tested with (setup.py: python_requires >= 3.11; constraints.txt: CI's 3.11).
PYTHON_VERSION=3.11

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints the absolute path of directory $1 (which must exist).
absolute_dir() {
  (cd "$1" && pwd)
}

# Prints the pid of the trainer started in checkout $1 if it still runs; fails otherwise. (After a
# restart of the machine the pid may belong to another process: the trainer's shell is named.)
trainer_pid() {
  local pid
  [[ -f "$1/train.pid" && ! -f "$1/train.exit" ]] || return 1
  pid=$(<"$1/train.pid")
  kill -0 "${pid}" 2>/dev/null || return 1
  [[ ! -r "/proc/${pid}/cmdline" ]] || grep -qa masksub-trainer "/proc/${pid}/cmdline" || return 1
  echo "${pid}"
}

# Prints the path of a uv executable, installing uv for this user first where there is none. A
# non-interactive ssh session does not read ~/.profile, so ~/.local/bin is looked in by name.
find_uv() {
  local uv="${HOME}/.local/bin/uv"
  if command -v uv >/dev/null; then command -v uv; return; fi
  if [[ -x "${uv}" ]]; then echo "${uv}"; return; fi
  # uv is a wheel on PyPI that any python3 with pip installs (3.10 on the Ubuntu 22.04 TPU images);
  # else the standalone installer, into the same directory without editing shell profiles
  # (https://docs.astral.sh/uv/getting-started/installation/, https://docs.astral.sh/uv/reference/installer/).
  echo "installing uv into ${HOME}/.local/bin" >&2
  python3 -m pip install --user --quiet uv >&2 \
    || curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR="${HOME}/.local/bin" UV_NO_MODIFY_PATH=1 sh >&2 \
    || true
  [[ -x "${uv}" ]] || die "could not install uv (https://docs.astral.sh/uv/getting-started/installation/); install it and rerun"
  echo "${uv}"
}

# What an install depends on: the extra and the checkout's requirements and pins.
install_key() {
  echo "$2 $(cat "$1/setup.py" "$1/constraints.txt" | sha256sum | cut -d' ' -f1)"
}

# True when checkout $1 has a venv on Python >= 3.11.
venv_usable() {
  [[ -x "$1/.venv/bin/python" ]] \
    && "$1/.venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

cmd_install() {
  [[ $# -ge 2 ]] || die "install needs CHECKOUT EXTRA [ARCHIVE]"
  local checkout="$1" extra="$2" archive="${3:-}" pid uv
  if [[ -d "${checkout}" ]] && pid=$(trainer_pid "${checkout}"); then
    echo "$(hostname): trainer running (pid ${pid}): ${checkout} and its .venv left as they are"
    return 0
  fi
  if [[ -n "${archive}" ]]; then
    mkdir -p "${checkout}"
    tar -xzf "${archive}" -C "${checkout}"
  fi
  [[ -f "${checkout}/setup.py" ]] || die "$(hostname): ${checkout} is not a masksub_jax checkout (no setup.py)"
  checkout=$(absolute_dir "${checkout}")
  if venv_usable "${checkout}" && [[ "$(cat "${checkout}/.venv/masksub-install" 2>/dev/null)" == "$(install_key "${checkout}" "${extra}")" ]]; then
    echo "$(hostname): masksub_jax[${extra}] already installed in ${checkout}/.venv"
    return 0
  fi
  uv=$(find_uv)
  if ! venv_usable "${checkout}"; then
    rm -rf "${checkout}/.venv"
    # The interpreter goes into the checkout: on a cluster, the nodes that see the checkout see it too.
    UV_PYTHON_INSTALL_DIR="${checkout}/.python" "${uv}" venv --seed --python="${PYTHON_VERSION}" "${checkout}/.venv"
  fi
  "${uv}" pip install --python="${checkout}/.venv/bin/python" -e "${checkout}[${extra}]" -c "${checkout}/constraints.txt"
  install_key "${checkout}" "${extra}" >"${checkout}/.venv/masksub-install"
  echo "$(hostname): installed masksub_jax[${extra}] into ${checkout}/.venv"
}

cmd_start() {
  [[ $# -ge 3 && "$2" == "--" ]] || die "start needs CHECKOUT -- COMMAND..."
  local checkout="$1" pid
  shift 2
  cd "${checkout}"
  if pid=$(trainer_pid .); then
    echo "$(hostname): trainer already running (pid ${pid}); not started again"
    return 0
  fi
  rm -f train.pid train.exit
  echo "=== $(date -u '+%F %T') UTC: $*" >>train.log
  # setsid: a session of its own, which the end of the ssh connection does not take down (nohup: nor
  # its hangup); all three streams away from the connection, so that ssh returns at once. The exit
  # status goes to train.exit through a temporary name, so that a reader never sees half of it.
  # shellcheck disable=SC2016  # expanded by the detached shell
  PYTHONUNBUFFERED=1 setsid nohup bash -c 'echo $$ >train.pid; "$@"; echo $? >train.exit.tmp; mv train.exit.tmp train.exit' \
    masksub-trainer "$@" >>train.log 2>&1 </dev/null &
  for _ in $(seq 100); do
    [[ -s train.pid ]] && break
    sleep 0.1
  done
  echo "$(hostname): trainer started (pid $(cat train.pid 2>/dev/null || echo '?')); log: ${PWD}/train.log"
}

cmd_status() {
  [[ $# -eq 1 ]] || die "status needs CHECKOUT"
  local checkout="$1" pid code state
  if pid=$(trainer_pid "${checkout}"); then
    state="trainer running (pid ${pid})"
  elif [[ -f "${checkout}/train.exit" ]]; then
    code=$(<"${checkout}/train.exit")
    case "${code}" in
      0) state="trainer finished (exit 0)" ;;
      75) state="trainer preempted (exit 75): it saved a checkpoint; rerun the launch command to resume" ;;
      *) state="trainer failed (exit ${code}); see ${checkout}/train.log" ;;
    esac
  elif [[ -f "${checkout}/train.pid" ]]; then
    state="trainer stopped without an exit status (killed, or the machine restarted)"
  else
    state="no trainer started"
  fi
  echo "$(hostname): ${state}"
  if [[ -s "${checkout}/train.log" ]]; then echo "$(hostname):   last log line: $(tail -n 1 "${checkout}/train.log")"; fi
}

cmd_logs() {
  [[ $# -ge 1 && $# -le 2 ]] || die "logs needs CHECKOUT [LINES|follow]"
  local log="$1/train.log" lines="${2:-100}"
  [[ -f "${log}" ]] || die "$(hostname): no ${log}: no trainer was started here"
  if [[ "${lines}" == follow ]]; then
    tail -n 100 -F "${log}"
  else
    tail -n "${lines}" "${log}"
  fi
}

[[ $# -ge 1 ]] || die "usage: $0 install|start|status|logs ...; see the header of $0"
command="$1"
shift
case "${command}" in
  install) cmd_install "$@" ;;
  start) cmd_start "$@" ;;
  status) cmd_status "$@" ;;
  logs) cmd_logs "$@" ;;
  *) die "unknown command ${command}; see the header of $0" ;;
esac
