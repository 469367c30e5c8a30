#!/usr/bin/env bash
# Submits a multi-node GPU run to SLURM: one task (process) per GPU, as JAX's SLURM support expects:
# every task sees the node's GPUs and JAX binds it to the GPU of its local rank (SLURM_LOCALID), and
# finds the other tasks from SLURM's environment (--cluster). Requeued jobs resume from the newest
# checkpoint, and the trainer saves and exits 75 on the SIGTERM that SLURM sends before a preemption
# or time limit.
#
#   launch/slurm_gpu.sh --nodes=8 --gpus_per_node=8 --workdir=/shared/runs/vit_l \
#       --data_dir=/shared/tfds [--config=configs/vit_l.py] [--partition=P] [--time=72:00:00] \
#       [--cpus_per_task=N] [--mem=SIZE] [--dry-run]
#
# What it asks SLURM for: --nodes nodes, each with --gpus_per_node GPUs and as many tasks; per task
# the node's cores divided by its GPUs (the whole node, --exclusive, and in the job
# SLURM_CPUS_ON_NODE / GPUs cores for each task), or --cpus_per_task cores where given (then the node
# is not asked for exclusively); --mem per node (default 0: all of each node's memory); --time; a
# requeue after a preemption, and SIGTERM 300 s before the end. The data pipeline of an H100 needs
# 5-13 host cores: SLURM's default, 1 core per task, starves it.
#
# The job starts in this checkout, whatever directory it was submitted from: --config is passed as an
# absolute path (a relative one is looked for in the current directory, then in the checkout), and so
# are a relative --workdir and --data_dir (from the current directory). --workdir and this checkout
# (with its .venv, installed here first on Python 3.11) must be on a file system that every node
# sees. --dry-run prints the commands and the batch script (as a here-document) and runs none.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

NODES="" GPUS=8 PARTITION="" TIME="72:00:00" CONFIG="configs/vit_l.py" CPUS="" MEM=0
for arg in "$@"; do
  common_arg "${arg}" && continue
  case "${arg}" in
    --nodes=*) NODES="${arg#*=}" ;;
    --gpus_per_node=*) GPUS="${arg#*=}" ;;
    --partition=*) PARTITION="${arg#*=}" ;;
    --time=*) TIME="${arg#*=}" ;;
    --cpus_per_task=*) CPUS="${arg#*=}" ;;
    --mem=*) MEM="${arg#*=}" ;;
    *) die "unknown argument ${arg}; see the header of $0" ;;
  esac
done
[[ -n "${NODES}" && -n "${WORKDIR}" ]] || die "--nodes and --workdir are required"
positive_int --nodes "${NODES}"
positive_int --gpus_per_node "${GPUS}"
if [[ -n "${CPUS}" ]]; then positive_int --cpus_per_task "${CPUS}"; fi
[[ "${MEM}" =~ ^[0-9]+[KMGT]?$ ]] || die "--mem must be a size such as 0 (all of the node's memory), 512G or 480000M, got '${MEM}'"
absolute_paths
install_here cuda  # here, on the node that submits: the venv is in the checkout, on the shared file system
CLUSTER=1 train_command

if [[ -n "${CPUS}" ]]; then
  ALLOCATION="#SBATCH --cpus-per-task=${CPUS}" TASK_CPUS="${CPUS}"
else
  ALLOCATION="#SBATCH --exclusive" TASK_CPUS="\$(( SLURM_CPUS_ON_NODE / ${GPUS} ))"
fi
SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=masksub
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=${GPUS}
#SBATCH --gpus-per-node=${GPUS}
${ALLOCATION}
#SBATCH --mem=${MEM}
#SBATCH --time=${TIME}
#SBATCH --requeue
#SBATCH --signal=TERM@300
${PARTITION:+#SBATCH --partition=${PARTITION}
}cd $(quoted "${REPO}") || exit 1
cpus=${TASK_CPUS}
if [ \"\${cpus}\" -lt 1 ]; then cpus=1; fi
# srun does not pass sbatch's --cpus-per-task on to the tasks (Slurm 22.05 and later: the note on
# --cpus-per-task in https://slurm.schedmd.com/sbatch.html): asked again.
srun --kill-on-bad-exit=1 --cpus-per-task=\"\${cpus}\" ${TRAIN_QUOTED}
status=\$?
# 75: saved and stopped on request; requeue so that the run continues.
if [ \"\${status}\" -eq 75 ]; then scontrol requeue \"\${SLURM_JOB_ID}\"; fi
exit \"\${status}\""

run mkdir -p "${WORKDIR}"
# The log path as an argument rather than an #SBATCH line, which cannot quote a space.
SBATCH=(sbatch --output="${WORKDIR}/slurm-%j.out")
echo "+ $(quoted "${SBATCH[@]}") <<'SBATCH_SCRIPT'"
echo "${SCRIPT}"
echo "SBATCH_SCRIPT"
if [[ "${DRY_RUN}" != 1 ]]; then
  "${SBATCH[@]}" <<< "${SCRIPT}"
fi
