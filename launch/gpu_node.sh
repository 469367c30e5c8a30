#!/usr/bin/env bash
# Trains on all GPUs of one machine: one process drives every local GPU (JAX's single-controller
# model on one host), the batch split over them. Rerun the same command to resume. Installs the
# checkout with JAX's CUDA wheels into its .venv on Python 3.11 first (launch/masksub_worker.sh
# install), then trains in the foreground from this checkout (run it in tmux or screen to log out).
# A relative --config is looked for in the current directory, then in the checkout; a relative
# --workdir or --data_dir is taken from the current directory.
#
#   launch/gpu_node.sh --workdir=runs/vit_b --data_dir=/data/tfds [--config=configs/vit_b.py] \
#       [--config.KEY=VALUE ...] [--dry-run]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

for arg in "$@"; do
  common_arg "${arg}" || die "unknown argument ${arg}; see the header of $0"
done
[[ -n "${WORKDIR}" ]] || die "--workdir is required"
absolute_paths

install_here cuda
train_command
run cd "${REPO}"
# XLA may take all GPU memory up front (the default, fastest); tf.data stays on the CPU.
run "${TRAIN[@]}"
