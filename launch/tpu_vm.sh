#!/usr/bin/env bash
# Creates a Cloud TPU VM (or pod slice), installs masksub_jax on every worker, and starts training on
# all of them at once, detached from this session: a laptop that sleeps or logs out does not stop it.
# Rerunning the same command resumes: a TPU that was preempted (or terminated, or whose queued
# request was suspended or failed) is deleted and created again, a trainer that runs is left alone,
# one that stopped starts again from the newest checkpoint in --workdir (a gs:// path, so that every
# worker sees it).
#
#   launch/tpu_vm.sh --name=masksub-b16 --zone=us-central2-b --accelerator=v4-32 \
#       --workdir=gs://BUCKET/vit_b --data_dir=gs://BUCKET/tfds [--config=configs/vit_b.py] \
#       [--config.KEY=VALUE ...] [--version=RUNTIME] [--spot] [--queued] [--dry-run]
#   launch/tpu_vm.sh --name=masksub-b16 --zone=us-central2-b --status   # the TPU, and each worker's trainer
#   launch/tpu_vm.sh --name=masksub-b16 --zone=us-central2-b --logs [--follow] [--worker=N]  # worker N's log (0)
#
# --version: the TPU software (runtime) version; by default the one Google gives for JAX on that
#   generation (https://cloud.google.com/tpu/docs/runtimes): tpu-ubuntu2204-base for v2-v4,
#   v2-alpha-tpuv5-lite for v5e (v5litepod-*), v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e.
# --spot: a Spot TPU (cheaper, preemptible at any time; rerun this command after a preemption).
# --queued: ask through a queued resource of the same name, which waits for capacity instead of
#   failing (https://cloud.google.com/tpu/docs/queued-resources); this script waits with it, looking
#   every MASKSUB_TPU_POLL_SECONDS (60) seconds.
#
# Steps: create the TPU where needed; copy this checkout's committed tree (git archive) and
# launch/masksub_worker.sh to every worker; install there into ~/masksub_jax/.venv with the `tpu`
# extra (constraints.txt) on Python 3.11, which uv fetches where the image has an older python3 (the
# Ubuntu 22.04 images have 3.10); start `python -m masksub_jax.main --cluster` on every worker (JAX's
# TPU detection finds the other workers and starts the runtime that delivers preemption notices), its
# output in ~/masksub_jax/train.log and its exit status in ~/masksub_jax/train.exit on each worker.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

NAME="" ZONE="" ACCELERATOR="" VERSION="" SPOT=() QUEUED=0 MODE=launch LOG_WORKER=0 FOLLOW=0
for arg in "$@"; do
  common_arg "${arg}" && continue
  case "${arg}" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --accelerator=*) ACCELERATOR="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    --spot) SPOT=(--spot) ;;
    --queued) QUEUED=1 ;;
    --status) MODE=status ;;
    --logs) MODE=logs ;;
    --follow) MODE=logs FOLLOW=1 ;;
    --worker=*) LOG_WORKER="${arg#*=}" ;;
    *) die "unknown argument ${arg}; see the header of $0" ;;
  esac
done
[[ -n "${NAME}" && -n "${ZONE}" ]] || die "--name and --zone are required"
[[ "${LOG_WORKER}" =~ ^[0-9]+$ ]] || die "--worker must be a worker number (0 is the first), got '${LOG_WORKER}'"

TPU=(gcloud compute tpus tpu-vm)
QUEUED_RESOURCE=(gcloud compute tpus queued-resources)
CHECKOUT=masksub_jax  # on each worker, in its home directory
WORKER=(bash masksub_worker.sh)
POLL_SECONDS="${MASKSUB_TPU_POLL_SECONDS:-60}"

# Sets VERSION, unless --version gave it, to the runtime version for the accelerator's generation.
default_version() {
  if [[ -n "${VERSION}" ]]; then return; fi
  case "${ACCELERATOR}" in
    v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for --accelerator=${ACCELERATOR}; pass --version=RUNTIME (https://cloud.google.com/tpu/docs/runtimes)" ;;
  esac
}

# Sets STATE to the state that describe command "$@" reports, or to "" where there is no such
# resource. A dry run prints the command and takes the resource as absent.
describe() {
  local err
  echo "+ $(quoted "$@")"
  STATE=""
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "# (a dry run reads no state: it shows what happens where there is no TPU ${NAME})"
    return
  fi
  err=$(mktemp)
  if ! STATE=$("$@" 2>"${err}"); then
    STATE=""
    if ! grep -q NOT_FOUND "${err}"; then
      cat "${err}" >&2
      rm -f "${err}"
      die "could not read the state of ${NAME} (gcloud's message above)"
    fi
  fi
  rm -f "${err}"
}

node_state() {
  describe "${TPU[@]}" describe "${NAME}" --zone="${ZONE}" --format='value(state)'
}

queued_state() {
  describe "${QUEUED_RESOURCE[@]}" describe "${NAME}" --zone="${ZONE}" --format='value(state.state)'
}

# True for the states of a TPU node that never become READY again: it has to be created anew.
# (https://cloud.google.com/tpu/docs/preemptible: a preempted TPU stays, in state PREEMPTED.)
node_is_gone() {
  [[ "$1" =~ ^(PREEMPTED|TERMINATED|STOPPED|UNKNOWN)$ ]]
}

create_node() {
  run "${TPU[@]}" create "${NAME}" --zone="${ZONE}" --accelerator-type="${ACCELERATOR}" --version="${VERSION}" \
    "${SPOT[@]+"${SPOT[@]}"}"
}

create_queued() {
  run "${QUEUED_RESOURCE[@]}" create "${NAME}" --zone="${ZONE}" --node-id="${NAME}" \
    --accelerator-type="${ACCELERATOR}" --runtime-version="${VERSION}" \
    "${SPOT[@]+"${SPOT[@]}"}"
}

# A TPU node named NAME in state READY, created (again) where needed.
ensure_node() {
  node_state
  if [[ -z "${STATE}" ]]; then
    create_node
  elif node_is_gone "${STATE}"; then
    echo "# TPU ${NAME} is ${STATE}: deleting it and creating it again (the run resumes from its checkpoints)"
    run "${TPU[@]}" delete "${NAME}" --zone="${ZONE}" --quiet
    create_node
  elif [[ "${STATE}" != READY ]]; then
    die "TPU ${NAME} is ${STATE}; rerun when it is READY (or delete it: gcloud compute tpus tpu-vm delete ${NAME} --zone=${ZONE})"
  fi
}

# A queued resource named NAME that is ACTIVE with a usable node, requested (again) where needed.
ensure_queued() {
  queued_state
  case "${STATE}" in
    "") create_queued ;;
    FAILED | SUSPENDING | SUSPENDED) replace_queued ;;
    ACTIVE)
      node_state
      if [[ -z "${STATE}" ]] || node_is_gone "${STATE}"; then replace_queued; fi
      ;;
    DELETING) die "queued resource ${NAME} is being deleted; rerun when it is gone" ;;
  esac
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "# (then, until it is ACTIVE, the describe command above every ${POLL_SECONDS} s)"
  else
    wait_until_active
  fi
}

replace_queued() {
  echo "# queued resource ${NAME} is ${STATE}: deleting it (with its TPU) and asking again"
  run "${QUEUED_RESOURCE[@]}" delete "${NAME}" --zone="${ZONE}" --force --quiet
  create_queued
}

wait_until_active() {
  while true; do
    queued_state
    case "${STATE}" in
      ACTIVE) return ;;
      FAILED | "") die "queued resource ${NAME} is ${STATE:-gone}; see gcloud compute tpus queued-resources describe ${NAME} --zone=${ZONE}" ;;
      *) echo "# queued resource ${NAME} is ${STATE}; looking again in ${POLL_SECONDS} s" ;;
    esac
    sleep "${POLL_SECONDS}"
  done
}

# --status: the TPU's state and, where it runs, each worker's trainer.
show_status() {
  if [[ "${QUEUED}" == 1 ]]; then
    queued_state
    echo "# queued resource ${NAME}: ${STATE:-none}"
  fi
  node_state
  echo "# TPU ${NAME}: ${STATE:-none in ${ZONE}}"
  if [[ "${STATE}" == READY || "${DRY_RUN}" == 1 ]]; then
    run "${TPU[@]}" ssh "${NAME}" --zone="${ZONE}" --worker=all --command="$(quoted "${WORKER[@]}" status "${CHECKOUT}")"
  elif node_is_gone "${STATE}"; then
    echo "# its workers and their logs are gone; rerun the launch command to create it again: the run resumes from its newest checkpoint in the workdir"
  fi
}

# --logs: the end of one worker's train.log, or all of it as it grows (--follow).
show_logs() {
  local lines=100
  if [[ "${FOLLOW}" == 1 ]]; then lines=follow; fi
  run "${TPU[@]}" ssh "${NAME}" --zone="${ZONE}" --worker="${LOG_WORKER}" \
    --command="$(quoted "${WORKER[@]}" logs "${CHECKOUT}" "${lines}")"
}

# True when file $1 (in this checkout) is in HEAD; git does not follow a symbolic link (configs/ is
# one), so the path is compared without them.
committed() {
  local file repo
  file="$(cd "$(dirname "$1")" && pwd -P)/$(basename "$1")"
  repo="$(cd "${REPO}" && pwd -P)"
  git -C "${REPO}" cat-file -e "HEAD:${file#"${repo}/"}" 2>/dev/null
}

launch() {
  [[ -n "${ACCELERATOR}" && -n "${WORKDIR}" ]] || die "--accelerator and --workdir are required"
  [[ "${WORKDIR}" == gs://* ]] || die "--workdir must be a gs:// path that every TPU worker can reach"
  find_config
  [[ "${CONFIG_FILE}" == "${REPO}/"* ]] || die "--config must be a file in this checkout (${REPO}), which is copied to the workers"
  CONFIG="${CONFIG_FILE#"${REPO}/"}${CONFIG_ARGS}"  # relative to the checkout, where the workers start
  committed "${CONFIG_FILE}" \
    || die "--config ${CONFIG_FILE#"${REPO}/"} is not committed, and the workers get the committed tree (git archive HEAD); commit it and rerun"
  if [[ -n "$(git -C "${REPO}" status --porcelain --untracked-files=no)" ]]; then
    echo "# note: the uncommitted changes in ${REPO} stay here; the workers get HEAD"
  fi
  default_version

  if [[ "${QUEUED}" == 1 ]]; then ensure_queued; else ensure_node; fi

  local archive="${TMPDIR:-/tmp}/${CHECKOUT}.tar.gz"
  run git -C "${REPO}" archive --format=tar.gz --output="${archive}" HEAD
  run "${TPU[@]}" scp "${archive}" "${REPO}/launch/masksub_worker.sh" "${NAME}:" --zone="${ZONE}" --worker=all
  run "${TPU[@]}" ssh "${NAME}" --zone="${ZONE}" --worker=all \
    --command="$(quoted "${WORKER[@]}" install "${CHECKOUT}" tpu "${CHECKOUT}.tar.gz")"
  PYTHON=.venv/bin/python CLUSTER=1 train_command
  run "${TPU[@]}" ssh "${NAME}" --zone="${ZONE}" --worker=all \
    --command="$(quoted "${WORKER[@]}" start "${CHECKOUT}" --) ${TRAIN_QUOTED}"
  echo "# follow worker 0: $0 --name=${NAME} --zone=${ZONE} --logs --follow; all workers: --status"
}

case "${MODE}" in
  launch) launch ;;
  status) show_status ;;
  logs) show_logs ;;
esac
