"""The mesh: data parallel and FSDP give the same training as one device."""
import json
import os
import subprocess

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from masksub_jax import sharding, step as step_lib, train
from tests.conftest import REPO, digits_file_config, digits_main_command, tiny_digits_config

OVERRIDES = {"total_steps": 20, "log_every_steps": 1, "checkpoint_every_steps": 20, "eval_every_steps": 0}


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return np.array([[m["loss_main"], m["loss_sub"]] for m in map(json.loads, f) if "loss" in m])


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
               if ".mu" in jax.tree_util.keystr(path) and "['blocks_0']['mlp']['fc1']['kernel']" in jax.tree_util.keystr(path)]
    assert len(moments) == 1 and moments[0].addressable_shards[0].data.shape == (192, 384)  # (192, 768) split
    bias = state["params"]["blocks_0"]["attn"]["qkv"]["bias"]  # 576 elements: replicated
    assert bias.sharding.spec == P() and bias.addressable_shards[0].data.shape == (576,)


def test_loss_trajectory_is_the_same_on_1_device_8_devices_and_a_4x2_fsdp_mesh(digits_dir, tmp_path):
    one = str(tmp_path / "one")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(digits_main_command(one, digits_dir, OVERRIDES), cwd=REPO, env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and "on 1 device(s)" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    runs = {"1 device": _losses(one)}
    for fsdp in (1, 2):
        workdir = str(tmp_path / f"fsdp{fsdp}")
        train.run(digits_file_config(digits_dir, {**OVERRIDES, "mesh.fsdp": fsdp}), workdir)
        runs[f"8 devices, fsdp {fsdp}"] = _losses(workdir)
    assert runs["1 device"].shape == (20, 2)
    assert runs["1 device"][-1, 0] < runs["1 device"][0, 0]
    for name, losses in runs.items():
        np.testing.assert_allclose(losses, runs["1 device"], rtol=2e-4, err_msg=name)


def test_fsdp_that_does_not_divide_the_devices_is_a_clear_error(digits_dir, tmp_path):
    with pytest.raises(ValueError, match="mesh.fsdp=3 is invalid: must divide the device count 8"):
        train.run(tiny_digits_config(digits_dir, **{"mesh.fsdp": 3}), str(tmp_path))


def _free_port() -> int:
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_equal_one_process_of_four(digits_dir, tmp_path):
    """jax.distributed over 127.0.0.1 with gloo CPU collectives; one checkpoint, restorable by one process."""
    overrides = {**OVERRIDES, "total_steps": 10, "checkpoint_every_steps": 10}
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    single = str(tmp_path / "single")
    done = subprocess.run(digits_main_command(single, digits_dir, overrides), cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    multi = str(tmp_path / "multi")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(digits_main_command(multi, digits_dir, overrides) +
                              [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "on 4 device(s)" in outputs[0] and "Training" not in outputs[1]  # only process 0 reports
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=2e-4)
    from masksub_jax import checkpoint  # pylint: disable=import-outside-toplevel
    for a, b in zip(jax.tree.leaves(checkpoint.load_params(multi)), jax.tree.leaves(checkpoint.load_params(single))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_distributed_flags_go_together():
    with pytest.raises(ValueError, match="go together"):
        sharding.initialize_distributed("127.0.0.1:1234", None, 0)
    assert not sharding.initialize_distributed(environ={"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
