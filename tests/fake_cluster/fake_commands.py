"""Fake cluster commands for tests/test_launch.py, one program dispatched on its first argument.

`bin_dir()` in tests/test_launch.py puts a wrapper per command on PATH (`exec PYTHON THIS_FILE NAME "$@"`).
Each call appends {"cmd": NAME, "argv": [...]} to $FAKE_CLOUD/calls.jsonl. The cloud's state lives in
$FAKE_CLOUD: tpus/NAME/state (READY, PREEMPTED, ...; absent: no such TPU), tpus/NAME/worker-I/ (each
worker's home directory, emptied when the TPU is created again, as a new VM's disk is),
queued/NAME/state. `gcloud ... ssh --command=CMD` runs CMD with bash in each worker's home, then kills
what is left of that ssh session, as sshd does when the connection ends. `sbatch` runs the job script
at once in the directory it was submitted from, `srun` runs its command once as task 0.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

CLOUD = os.environ["FAKE_CLOUD"]


def record(name, argv):
    with open(os.path.join(CLOUD, "calls.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"cmd": name, "argv": argv}) + "\n")


def flags(argv):
    """--key=value and --switch arguments as a dict; the others in order."""
    options, positional = {}, []
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            options[key] = value
        else:
            positional.append(arg)
    return options, positional


def read(path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return default


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def tpu_dir(name):
    return os.path.join(CLOUD, "tpus", name)


def workers(name):
    count = int(os.environ.get("FAKE_TPU_WORKERS", "2"))
    return [os.path.join(tpu_dir(name), f"worker-{i}") for i in range(count)]


def not_found(kind, name):
    print(f"ERROR: (gcloud.compute.tpus.{kind}.describe) NOT_FOUND: Resource "
          f"'projects/p/locations/z/{kind}/{name}' was not found", file=sys.stderr)
    return 1


def create_node(name):
    shutil.rmtree(tpu_dir(name), ignore_errors=True)
    for home in workers(name):
        os.makedirs(home)
    write(os.path.join(tpu_dir(name), "state"), "READY")


def selected_workers(name, options):
    homes = workers(name)
    which = options.get("worker", "0")
    return list(enumerate(homes)) if which == "all" else [(int(which), homes[int(which)])]


def ssh(name, options):
    if read(os.path.join(tpu_dir(name), "state")) != "READY":
        print(f"ssh: connect to host {name}: Connection refused", file=sys.stderr)
        return 255
    status = 0
    for index, home in selected_workers(name, options):
        env = dict(os.environ, HOME=home, FAKE_WORKER=str(index))
        session = subprocess.Popen(["bash", "-c", options["command"]], cwd=home, env=env, start_new_session=True)
        status = max(status, session.wait())
        try:  # the connection ends: whatever the command left in its session goes with it
            os.killpg(session.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return status


def scp(name_and_dest, sources, options):
    name, _, dest = name_and_dest.partition(":")
    for _, home in selected_workers(name, options):
        for source in sources:
            shutil.copy(source, os.path.join(home, dest))
    return 0


def gcloud(argv):
    options, words = flags(argv)
    assert words[:2] == ["compute", "tpus"], argv
    kind, verb, rest = words[2], words[3], words[4:]
    if kind == "tpu-vm":
        name = rest[0] if verb != "scp" else None
        if verb == "describe":
            state = read(os.path.join(tpu_dir(name), "state"))
            if state is None:
                return not_found("nodes", name)
            print(state if options.get("format") == "value(state)" else f"state: {state}")
        elif verb == "create":
            if os.path.exists(tpu_dir(name)):
                print(f"ERROR: ALREADY_EXISTS: node {name}", file=sys.stderr)
                return 1
            create_node(name)
        elif verb == "delete":
            shutil.rmtree(tpu_dir(name))
        elif verb == "ssh":
            return ssh(name, options)
        elif verb == "scp":
            return scp(rest[-1], rest[:-1], options)
        return 0
    if kind == "queued-resources":
        name, state_file = rest[0], os.path.join(CLOUD, "queued", rest[0], "state")
        if verb == "describe":
            state = read(state_file)
            if state is None:
                return not_found("queuedResources", name)
            print(state)
            then = read(state_file + ".next")  # a request moves on by one state each time it is looked at
            if then:
                write(state_file, then)
                os.remove(state_file + ".next")
        elif verb == "create":
            if read(state_file):
                print(f"ERROR: ALREADY_EXISTS: queued resource {name}", file=sys.stderr)
                return 1
            write(state_file, "PROVISIONING")
            write(state_file + ".next", "ACTIVE")
            create_node(options["node-id"])
        elif verb == "delete":
            if "force" not in options and read(state_file) == "ACTIVE":
                print("ERROR: FAILED_PRECONDITION: the queued resource has nodes; use --force", file=sys.stderr)
                return 1
            shutil.rmtree(os.path.dirname(state_file))
            shutil.rmtree(tpu_dir(name), ignore_errors=True)
        return 0
    raise AssertionError(argv)


def sbatch(argv):
    script = sys.stdin.read()
    write(os.path.join(CLOUD, "sbatch_script.sh"), script)
    print("Submitted batch job 1")
    env = dict(os.environ, SLURM_JOB_ID="1", SLURM_CPUS_ON_NODE=os.environ.get("FAKE_CPUS_ON_NODE", "64"))
    return subprocess.run(["bash", "-c", script], env=env, check=False).returncode


def srun(argv):
    command = next(i for i, arg in enumerate(argv) if not arg.startswith("-"))
    env = dict(os.environ, SLURM_PROCID="0", SLURM_LOCALID="0")
    return subprocess.run(argv[command:], env=env, check=False).returncode


def old_python(argv):
    """The python3 of Ubuntu 22.04 (the TPU VM images): 3.10, with pip."""
    if argv[:1] in (["--version"], ["-V"]):
        print("Python 3.10.12")
        return 0
    if argv[:3] == ["-m", "pip", "install"] and "uv" in argv and "--user" in argv:
        uv = os.path.join(os.environ["HOME"], ".local", "bin", "uv")
        write(uv, f'#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} uv "$@"\n')
        os.chmod(uv, 0o755)
        return 0
    if argv[:2] == ["-m", "venv"]:
        python = os.path.join(argv[-1], "bin", "python")
        write(python, f'#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} python3 "$@"\n')
        os.chmod(python, 0o755)
        write(os.path.join(argv[-1], "bin", "activate"), f"PATH={os.path.dirname(python)}:$PATH\n")
        return 0
    print(f"fake python 3.10: {argv} is not faked", file=sys.stderr)
    return 1


def uv(argv):
    options, words = flags(argv)
    if words[:1] == ["venv"]:
        wanted = tuple(int(part) for part in options["python"].split("."))
        if wanted < (3, 11):
            print(f"fake uv: asked for Python {options['python']}", file=sys.stderr)
            return 1
        # a real interpreter >= 3.11 (this one) stands in for the one uv would download
        return subprocess.run([sys.executable, "-m", "venv", "--without-pip", words[-1]], check=False).returncode
    if words[:2] == ["pip", "install"] or argv[:1] == ["--version"]:
        return 0  # recorded, not installed
    print(f"fake uv: {argv} is not faked", file=sys.stderr)
    return 1


def refuse(name):
    print(f"{name}: not available in these tests (nothing may be downloaded or installed)", file=sys.stderr)
    return 1


def main():
    name, argv = sys.argv[1], sys.argv[2:]
    record(name, argv)
    handlers = {"gcloud": gcloud, "sbatch": sbatch, "srun": srun, "python3": old_python, "uv": uv,
                "scontrol": lambda argv: 0}
    return handlers[name](argv) if name in handlers else refuse(name)


if __name__ == "__main__":
    sys.exit(main())
