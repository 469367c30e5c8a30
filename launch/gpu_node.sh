#!/usr/bin/env bash
# Trains on all GPUs of one machine: one process drives every local GPU (JAX's single-controller
# model on one host), the batch split over them. Rerun the same command to resume.
#
#   launch/gpu_node.sh --workdir=runs/vit_b --data_dir=/data/tfds [--config=configs/vit_b.py] \
#       [--config.KEY=VALUE ...] [--dry-run]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

WORKDIR="" DATA_DIR="" CONFIG="configs/vit_b.py" EXTRA=()
for arg in "$@"; do
  case "${arg}" in
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --data_dir=*) DATA_DIR="${arg#*=}" ;;
    --config=*) CONFIG="${arg#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*) EXTRA+=("${arg}") ;;
    *) die "unknown argument ${arg}; see the header of $0" ;;
  esac
done
[[ -n "${WORKDIR}" ]] || die "--workdir is required"

COMMAND=(python -m masksub_jax.main --config="${CONFIG}" --workdir="${WORKDIR}")
[[ -n "${DATA_DIR}" ]] && COMMAND+=(--config.data.data_dir="${DATA_DIR}")
# XLA may take all GPU memory up front (the default, fastest); tf.data stays on the CPU.
run "${COMMAND[@]}" "${EXTRA[@]+"${EXTRA[@]}"}"
