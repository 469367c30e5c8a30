"""The mesh: data parallel and FSDP give the same training as one device."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from masksub_jax import checkpoint, goodput, preemption, sharding, train
from masksub_jax import step as step_lib
from tests.conftest import REPO, digits_file_config, digits_main_command, flip_one_bit_in_an_array, tiny_digits_config

# No warmup, so that 20 steps visibly learn.
OVERRIDES = {"total_steps": 20, "log_every_steps": 1, "checkpoint_every_steps": 20, "eval_every_steps": 0,
             "optim.warmup_epochs": 0.0}


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return np.array([[m["train/loss_main"], m["train/loss_sub"]] for m in map(json.loads, f) if "train/loss" in m])


def test_large_arrays_are_split_over_fsdp_and_small_ones_replicated():
    config = tiny_digits_config("/unused", **{"model.variant": "Ti/4", "data.image_size": 16})
    model = step_lib.make_model(config, 10)
    tx, _ = step_lib.make_optimizer(config, total_steps=10, steps_per_epoch=10)
    init = step_lib.make_init(model, tx, (16, 16, 1))
    mesh = sharding.make_mesh(2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    shardings = sharding.state_sharding(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    qkv = state["params"]["blocks_0"]["attn"]["qkv"]["kernel"]  # (192, 576): 576 is split
    assert qkv.sharding.spec == P(None, "fsdp") and qkv.addressable_shards[0].data.shape == (192, 288)
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if ".mu" in jax.tree_util.keystr(path)
               and "['blocks_0']['mlp']['fc1']['kernel']" in jax.tree_util.keystr(path)]
    assert len(moments) == 1 and moments[0].addressable_shards[0].data.shape == (192, 384)  # (192, 768) split
    bias = state["params"]["blocks_0"]["attn"]["qkv"]["bias"]  # 576 elements: replicated
    assert bias.sharding.spec == P() and bias.addressable_shards[0].data.shape == (576,)


def test_fsdp_that_does_not_divide_the_devices_is_a_clear_error(digits_dir, tmp_path):
    with pytest.raises(ValueError, match="mesh.fsdp=3 is invalid: must divide the device count 8"):
        train.run(tiny_digits_config(digits_dir, **{"mesh.fsdp": 3}), str(tmp_path))


def test_a_gpu_or_tpu_that_jax_does_not_use_is_named_with_the_install_command(tmp_path, monkeypatch):
    files = {"GPU": (str(tmp_path / "nvidia[0-9]*"),), "TPU": (str(tmp_path / "accel[0-9]*"),)}
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert sharding.unused_accelerator("cpu", files) is None  # nothing attached
    (tmp_path / "nvidia0").touch()
    warning = sharding.unused_accelerator("cpu", files)
    assert f"has a GPU ({tmp_path}/nvidia0) but JAX runs on the CPU" in warning
    assert "pip install -e '.[cuda]' -c constraints.txt" in warning
    assert sharding.unused_accelerator("gpu", files) is None
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # asked for
    assert sharding.unused_accelerator("cpu", files) is None
    monkeypatch.delenv("JAX_PLATFORMS")
    (tmp_path / "nvidia0").unlink()
    (tmp_path / "accel0").touch()
    assert "has a TPU" in sharding.unused_accelerator("cpu", files) and "'.[tpu]'" in sharding.unused_accelerator(
        "cpu", files)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROCESS_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                   "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


def _start_two_processes(workdir, digits_dir, overrides):
    """The trainer as two processes of two CPU devices each, over 127.0.0.1."""
    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(digits_main_command(workdir, digits_dir, overrides) +
                             [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                             cwd=REPO, env={**os.environ, **TWO_PROCESS_ENV}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def test_a_run_is_the_same_on_1_device_8_devices_and_resumed_on_another_topology(digits_dir, tmp_path):
    """A run is a function of its config and seed, whatever the devices: one process of 1 device, 8
    devices in this process, and a run on 8 devices with mesh.fsdp=2 to step 4 that two processes of
    two devices each (jax.distributed over 127.0.0.1, gloo) resume with fsdp 1 to step 10 give the same
    losses and weights within float reduction order (a constant lr, so that the first session's shorter
    schedule is the same schedule)."""
    overrides = {**OVERRIDES, "total_steps": 10, "checkpoint_every_steps": 10, "optim.min_lr": 2e-3}
    one = str(tmp_path / "one")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(digits_main_command(one, digits_dir, overrides), cwd=REPO, env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and "on 1 device(s)" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    eight = str(tmp_path / "eight")
    train.run(digits_file_config(digits_dir, overrides), eight)

    moved = str(tmp_path / "moved")
    train.run(digits_file_config(digits_dir, {**overrides, "total_steps": 4, "mesh.fsdp": 2}), moved)
    procs = _start_two_processes(moved, digits_dir, overrides)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert ("Resumed on 4 cpu device(s) in 2 process(es), mesh data 4 x fsdp 1; the run last trained on 8 cpu "
            "device(s) in 1 process(es), mesh data 4 x fsdp 2.") in outputs[0], outputs[0][-2000:]
    assert "Training" in outputs[0] and "Training" not in outputs[1]  # only process 0 reports

    reference = _losses(one)
    assert reference.shape == (10, 2) and reference[-1, 0] < reference[0, 0]  # it learns
    for workdir in (eight, moved):
        np.testing.assert_allclose(_losses(workdir), reference, rtol=2e-4, err_msg=workdir)
        for a, b in zip(jax.tree.leaves(checkpoint.load_params(workdir)), jax.tree.leaves(checkpoint.load_params(one)),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=workdir)
    with open(os.path.join(moved, "sessions.jsonl"), encoding="utf-8") as f:
        sessions = [json.loads(line) for line in f]
    assert [(s["start_step"], s["step"], s["devices"], s["processes"]) for s in sessions] == [
        (0, 4, 8, 1), (4, 10, 4, 2)]


def test_batches_are_the_same_whatever_the_devices_and_processes(digits_dir):
    """The batch of a step is a function of the config and the step: on 8 devices in one process, or
    split between two processes (each its half), bit for bit."""
    from masksub_jax.data import pipeline
    config = digits_file_config(digits_dir, {"batch_size": 16})
    whole = pipeline.make(config, batch_multiple=8).train_batches(start_step=5)
    halves = [pipeline.make(config, process_index=i, process_count=2, batch_multiple=4).train_batches(start_step=5)
              for i in range(2)]
    for _ in range(3):
        batch, parts = next(whole), [next(h) for h in halves]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key], err_msg=key)


def test_two_processes_resume_past_a_damaged_checkpoint_and_stop_together_on_sigterm(digits_dir, tmp_path):
    """Every process reads the workdir's records at start while process 0 writes them (config.json,
    resumes.jsonl, summary.json, sessions.jsonl): never a crash, and the records stay whole. On the
    way, the README's promises for two processes: a damaged newest checkpoint is set aside by both,
    and a SIGTERM to one process saves one checkpoint at a step both agree on and ends both with 75."""
    workdir = str(tmp_path / "w")
    base = {**OVERRIDES, "log_every_steps": 2, "checkpoint_every_steps": 2}
    procs = _start_two_processes(workdir, digits_dir, {**base, "total_steps": 4})
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

    flip_one_bit_in_an_array(os.path.join(workdir, "checkpoints", "4"))
    procs = _start_two_processes(workdir, digits_dir, {**base, "total_steps": 100000, "log_every_steps": 1})
    head = []
    for line in procs[0].stdout:
        head.append(line)
        if line.startswith("step 9/"):
            break
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    outputs[0] = "".join(head) + outputs[0]
    assert [p.returncode for p in procs] == [preemption.EXIT_PREEMPTED] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    for said in ("the checkpoint of step 4 is damaged: 1 array(s) do not match the checksums",
                 "Resuming from the checkpoint of step 2"):
        assert said in outputs[0], outputs[0][-3000:]
    assert len(os.listdir(os.path.join(workdir, "damaged_checkpoints"))) == 1
    saved = [int(o.split("saved the checkpoint of step ")[1].split()[0]) for o in outputs]
    assert saved[0] == saved[1] >= 9 and saved[0] in checkpoint.manager(workdir, read_only=True).all_steps()

    with open(os.path.join(workdir, "resumes.jsonl"), encoding="utf-8") as f:
        resumes = [json.loads(line) for line in f]
    assert [r["step"] for r in resumes] == [2]
    assert resumes[-1]["changed"] == {"total_steps": 100000, "log_every_steps": 1}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        logged = [m["step"] for m in map(json.loads, f) if "train/loss" in m]
    assert logged == sorted(set(logged)) and logged[:3] == [2, 3, 4]  # step 4 of the first session dropped
    # Every session's time is kept; the resume from step 2 (step 4 damaged) trained 2 steps again.
    sessions = goodput.read(workdir)
    assert [(s["start_step"], s["step"]) for s in sessions] == [(0, 4), (2, saved[0])]
    assert goodput.summarize(sessions)["redone_steps"] == 2


def test_a_lost_peer_ends_the_other_process_promptly_with_status_1(digits_dir, tmp_path):
    procs = _start_two_processes(str(tmp_path / "w"), digits_dir, {**OVERRIDES, "total_steps": 100000})
    lines = []
    for line in procs[0].stdout:  # process 0 reports the steps
        lines.append(line)
        if line.startswith("step 1/"):
            break
    procs[1].kill()
    start = time.monotonic()
    rest = procs[0].communicate(timeout=120)[0]
    waited = time.monotonic() - start
    assert procs[0].returncode == 1, "".join(lines[-20:]) + rest[-3000:]
    assert "error: lost process 1 of 2 (no heartbeat for" in rest.strip().splitlines()[-1], rest[-2000:]
    assert waited < sharding.LOST_AFTER_S + 15, waited  # JAX alone: SIGABRT after its 100 s heartbeat limit


def test_slurm_tasks_are_one_per_gpu_each_bound_to_its_local_rank(tmp_path):
    """What `launch/slurm_gpu.sh` starts on one node with 2 GPUs, in SLURM's environment: JAX detects
    the job, and task i of the node sees GPU i only (jax_cuda_visible_devices; on CPU it binds nothing)."""
    probe = ("import jax; from masksub_jax import sharding; assert sharding.initialize_distributed(cluster=True); "
             "print(jax.process_index(), jax.process_count(), jax.config.read('jax_cuda_visible_devices')); "
             "sharding.leaving_normally()")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", probe], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, **TWO_PROCESS_ENV, "SLURM_JOB_ID": "4242",
                                              "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                                              "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                                              "JAX_COORDINATOR_PORT": str(port)})
             for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [o.strip().splitlines()[-1] for o in outputs] == ["0 2 0", "1 2 1"]


def test_distributed_start_up_asks_jax_where_the_cluster_says_so(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    with pytest.raises(ValueError, match="go together"):
        sharding.initialize_distributed("127.0.0.1:1234", None, 0)
    # A GKE variable alone is no reason: on TPU VMs the launch script passes --cluster.
    assert not sharding.initialize_distributed(environ={"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "a,b"})
    assert calls == []
    assert sharding.initialize_distributed(cluster=True, environ={})
    assert sharding.initialize_distributed(environ={"SLURM_NTASKS": "4"})
    assert calls == [((), {}), ((), {})]  # JAX's own detection decides coordinator, count and index
