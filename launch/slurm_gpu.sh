#!/usr/bin/env bash
# Submits a multi-node GPU run to SLURM: one task (process) per node driving its GPUs; JAX finds the
# other processes from SLURM's environment. Requeued jobs resume from the newest checkpoint, and the
# trainer saves and exits 75 on the SIGTERM that SLURM sends before a preemption or time limit.
#
#   launch/slurm_gpu.sh --nodes=8 --gpus_per_node=8 --workdir=/shared/runs/vit_l \
#       --data_dir=/shared/tfds [--config=configs/vit_l.py] [--partition=P] [--time=72:00:00] [--dry-run]
#
# --workdir must be on a file system that every node sees. --dry-run prints the batch script.
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
train_command

SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=masksub
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${GPUS}
#SBATCH --time=${TIME}
#SBATCH --requeue
#SBATCH --signal=TERM@300
${PARTITION:+#SBATCH --partition=${PARTITION}
}#SBATCH --output=${WORKDIR}/slurm-%j.out
srun --kill-on-bad-exit=1 ${TRAIN[*]}
status=\$?
# 75: saved and stopped on request; requeue so that the run continues.
if [ \"\${status}\" -eq 75 ]; then scontrol requeue \"\${SLURM_JOB_ID}\"; fi
exit \"\${status}\""

echo "${SCRIPT}"
run mkdir -p "${WORKDIR}"
if [[ "${DRY_RUN}" == 1 ]]; then
  printf '+ sbatch <<< (the script above)\n'
else
  sbatch <<< "${SCRIPT}"
fi
