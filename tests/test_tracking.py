"""W&B tracking (tracking.py), offline: what the run directory holds. Nothing is sent anywhere. The
trainer's W&B run: tests/test_train.py."""
import glob
import os
import struct
import time

import numpy as np
import pytest
from wandb.proto import wandb_internal_pb2  # wandb is in the test extra

from masksub_jax import config as config_lib
from masksub_jax import tracking


def offline_records(run_dir: str) -> list:
    """The protobuf records of an offline run's .wandb file: a LevelDB-style log (a 7-byte header,
    then 32 KiB blocks of chunks: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    with open(path, "rb") as f:
        data = f.read()
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunks = (b"" if kind in (1, 2) else chunks) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def records_with_step(run_dir: str, step: int, timeout_s: float = 20.0) -> list:
    """The run's records once they hold `step`: W&B's service process may still be writing the file
    when finish() returns (seen once in the full suite)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = offline_records(run_dir)
        if step in logged(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def logged(records) -> dict[int, dict]:
    """step -> {key: value (JSON text)} of the history records."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            out.setdefault(int(items["_step"]), {}).update(items)
    return out


def test_a_resumed_run_continues_its_wandb_run_and_logs_scalars_images_and_the_config(tmp_path):
    settings = config_lib.base().wandb
    settings.project, settings.mode, settings.tags = "masksub-tests", "offline", ("ci",)
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = tracking.WandbWriter(workdir, settings, {"model.variant": "mu/2", "seed": 0})
    first.write_scalars(10, {"train/loss_main": 2.5})
    first.write_images(10, {"train/inputs": np.zeros((2, 8, 8, 3), np.float32)})
    first.close()
    time.sleep(1.1)  # W&B names a session's directory by the second it started
    second = tracking.WandbWriter(workdir, settings, {"model.variant": "mu/2", "seed": 0})
    second.write_scalars(20, {"train/loss_main": 1.5, "eval/top1": 0.5})
    second.close()

    with open(os.path.join(workdir, tracking.RUN_ID), encoding="utf-8") as f:
        run_id = f.read().strip()
    runs = sorted(glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}")))
    assert len(runs) == 2  # two sessions of one W&B run
    (start,) = [r.run for r in offline_records(runs[0]) if r.WhichOneof("record_type") == "run"]
    assert (start.run_id, start.project, list(start.tags)) == (run_id, "masksub-tests", ["ci"])
    assert start.display_name == "run"  # the workdir's name
    assert {i.key: i.value_json for i in start.config.update}["model.variant"] == '"mu/2"'
    first_steps, second_steps = logged(records_with_step(runs[0], 10)), logged(records_with_step(runs[1], 20))
    assert first_steps[10]["train/loss_main"] == "2.5" and first_steps[10]["train/inputs/count"] == "2"
    assert second_steps[20]["train/loss_main"] == "1.5" and second_steps[20]["eval/top1"] == "0.5"


def test_wandb_without_a_project_is_off_and_a_bad_mode_is_named():
    config = config_lib.base()
    assert not tracking.enabled(config.wandb)
    config.wandb.mode = "sometimes"
    with pytest.raises(ValueError, match="wandb.mode='sometimes' is invalid: use 'online', 'offline' or 'disabled'"):
        config_lib.validate(config, num_devices=None)
