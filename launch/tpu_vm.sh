#!/usr/bin/env bash
# Creates a Cloud TPU VM (or pod slice), installs masksub_jax on every worker, and trains on all of
# them at once. Rerunning the same command after a preemption resumes from the newest checkpoint in
# --workdir (a gs:// path, so that every worker sees it).
#
#   launch/tpu_vm.sh --name=masksub-b16 --zone=us-central2-b --accelerator=v4-32 \
#       --workdir=gs://BUCKET/vit_b --data_dir=gs://BUCKET/tfds [--config=configs/vit_b.py] [--dry-run]
#
# Steps: create (skipped if the TPU exists), copy this checkout's committed tree (git archive) to
# every worker and install it there with its `tpu` extra (constraints.txt), train
# (`python -m masksub_jax.main --cluster` on --worker=all: JAX's own TPU detection finds the other
# workers and starts the runtime that delivers preemption notices).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

NAME="" ZONE="" ACCELERATOR="" VERSION="tpu-ubuntu2204-base"
for arg in "$@"; do
  common_arg "${arg}" && continue
  case "${arg}" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --accelerator=*) ACCELERATOR="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    *) die "unknown argument ${arg}; see the header of $0" ;;
  esac
done
[[ -n "${NAME}" && -n "${ZONE}" && -n "${ACCELERATOR}" && -n "${WORKDIR}" ]] \
  || die "--name, --zone, --accelerator and --workdir are required"
[[ "${WORKDIR}" == gs://* ]] || die "--workdir must be a gs:// path that every TPU worker can reach"

TPU=(gcloud compute tpus tpu-vm)
if [[ "${DRY_RUN}" == 1 ]] || ! "${TPU[@]}" describe "${NAME}" --zone="${ZONE}" >/dev/null 2>&1; then
  run "${TPU[@]}" create "${NAME}" --zone="${ZONE}" --accelerator-type="${ACCELERATOR}" --version="${VERSION}"
fi

ARCHIVE="${TMPDIR:-/tmp}/masksub_jax.tar.gz"
run git -C "$(dirname "$0")/.." archive --format=tar.gz --output="${ARCHIVE}" HEAD
run "${TPU[@]}" scp "${ARCHIVE}" "${NAME}:masksub_jax.tar.gz" --zone="${ZONE}" --worker=all
INSTALL="set -e; mkdir -p masksub_jax && tar -xzf masksub_jax.tar.gz -C masksub_jax && cd masksub_jax \
&& python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]' -c constraints.txt"
run "${TPU[@]}" ssh "${NAME}" --zone="${ZONE}" --worker=all --command="${INSTALL}"

CLUSTER=1 train_command
run "${TPU[@]}" ssh "${NAME}" --zone="${ZONE}" --worker=all \
  --command="cd masksub_jax && . .venv/bin/activate && ${TRAIN_QUOTED}"
