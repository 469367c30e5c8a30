#!/usr/bin/env bash
# Submits a multi-node GPU run to SLURM: one task (process) per GPU, as JAX's SLURM support expects:
# every task sees the node's GPUs and JAX binds it to the GPU of its local rank (SLURM_LOCALID), and
# finds the other tasks from SLURM's environment (--cluster). Requeued jobs resume from the newest
# checkpoint, and the trainer saves and exits 75 on the SIGTERM that SLURM sends before a preemption
# or time limit.
#
#   launch/slurm_gpu.sh --nodes=8 --gpus_per_node=8 --workdir=/shared/runs/vit_l \
#       --data_dir=/shared/tfds [--config=configs/vit_l.py] [--partition=P] [--time=72:00:00] [--dry-run]
#
# --workdir and this checkout (with its .venv, installed here first) must be on a file system that
# every node sees. --dry-run prints the batch script.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

NODES="" GPUS=8 PARTITION="" TIME="72:00:00" CONFIG="configs/vit_l.py"
for arg in "$@"; do
  common_arg "${arg}" && continue
  case "${arg}" in
    --nodes=*) NODES="${arg#*=}" ;;
    --gpus_per_node=*) GPUS="${arg#*=}" ;;
    --partition=*) PARTITION="${arg#*=}" ;;
    --time=*) TIME="${arg#*=}" ;;
    *) die "unknown argument ${arg}; see the header of $0" ;;
  esac
done
[[ -n "${NODES}" && -n "${WORKDIR}" ]] || die "--nodes and --workdir are required"
positive_int --nodes "${NODES}"
positive_int --gpus_per_node "${GPUS}"
install_here cuda  # here, on the node that submits: the venv is in the checkout, on the shared file system
CLUSTER=1 train_command

SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=masksub
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=${GPUS}
#SBATCH --gpus-per-node=${GPUS}
#SBATCH --time=${TIME}
#SBATCH --requeue
#SBATCH --signal=TERM@300
${PARTITION:+#SBATCH --partition=${PARTITION}
}srun --kill-on-bad-exit=1 ${TRAIN_QUOTED}
status=\$?
# 75: saved and stopped on request; requeue so that the run continues.
if [ \"\${status}\" -eq 75 ]; then scontrol requeue \"\${SLURM_JOB_ID}\"; fi
exit \"\${status}\""

echo "${SCRIPT}"
run mkdir -p "${WORKDIR}"
# The log path as an argument rather than an #SBATCH line, which cannot quote a space.
SBATCH=(sbatch --output="${WORKDIR}/slurm-%j.out")
if [[ "${DRY_RUN}" == 1 ]]; then
  echo "+ $(quoted "${SBATCH[@]}") <<< (the script above)"
else
  "${SBATCH[@]}" <<< "${SCRIPT}"
fi
