"""Never lose a run: kill -9 and SIGTERM of a real training process, damaged and incompatible
checkpoints, NaNs, a failing checkpoint write, an unwritable workdir. Digits data, CPU."""
import glob
import os
import pickle
import resource
import shutil
import signal
import subprocess
import threading
import time

import jax
import numpy as np
import pytest

from masksub_jax import checkpoint, preemption, train
from masksub_jax.data import pipeline
from tests.conftest import (
    REPO,
    digits_file_config,
    digits_main_command,
    flip_one_bit,
    flip_one_bit_in_an_array,
    tiny_digits_config,
    wait_for_step,
)

# configs/digits.py shortened; the same overrides for the child processes and the in-process reference.
OVERRIDES = {"total_steps": 30, "checkpoint_every_steps": 5, "log_every_steps": 1, "eval_every_steps": 0}


def _command(workdir, data_dir):
    return digits_main_command(workdir, data_dir, OVERRIDES)


def _digits_config(data_dir):
    return digits_file_config(data_dir, OVERRIDES)


def _sigint_as_a_terminal_sends_it():
    """In the child: SIGINT not ignored. A test run started in the background by a shell without job
    control ignores SIGINT, and children inherit that (Python then keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(workdir, data_dir):
    return subprocess.Popen(_command(workdir, data_dir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=_sigint_as_a_terminal_sends_it)


def _assert_same_params(workdir_a, workdir_b):
    params_a, params_b = checkpoint.load_params(workdir_a), checkpoint.load_params(workdir_b)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def reference(digits_dir, tmp_path_factory):
    """The uninterrupted run, in this process."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    assert train.run(_digits_config(digits_dir), workdir)["step"] == OVERRIDES["total_steps"]
    return workdir


def test_kill_9_at_random_steps_and_during_a_write_then_rerun_equals_uninterrupted(reference, digits_dir, tmp_path):
    workdir = str(tmp_path / "w")
    for kill_at in sorted(np.random.default_rng(0).choice(np.arange(3, 28), 3, replace=False)):
        proc = _start(workdir, digits_dir)
        wait_for_step(proc, kill_at)
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    # Once more, killed the moment a checkpoint write is seen in progress (Orbax's temporary folder).
    proc = _start(workdir, digits_dir)
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    caught = False
    while proc.poll() is None and not caught:
        caught = bool(glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")))
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    done = subprocess.run(_command(workdir, digits_dir), cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Resuming from the checkpoint of step" in done.stdout
    _assert_same_params(reference, workdir)
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))


def test_sigterm_twice_saves_exits_75_and_the_rerun_equals_uninterrupted(reference, digits_dir, tmp_path):
    workdir = str(tmp_path / "w")
    proc = _start(workdir, digits_dir)
    wait_for_step(proc, 7)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # while it finishes the step or saves: must not corrupt anything
    output = proc.stdout.read()
    assert proc.wait() == preemption.EXIT_PREEMPTED, output[-3000:]
    assert "Preempted: saved the checkpoint of step" in output
    saved = checkpoint.manager(workdir, read_only=True).latest_step()
    assert 7 <= saved < OVERRIDES["total_steps"]
    assert saved % 5 != 0 or saved == 10  # saved at the step it was told, not only on the 5-step grid
    done = subprocess.run(_command(workdir, digits_dir), cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"Resuming from the checkpoint of step {saved}" in done.stdout
    _assert_same_params(reference, workdir)


def _truncate_largest_array_file(step_dir):
    largest = max(glob.glob(os.path.join(step_dir, "default", "**", "d", "*"), recursive=True), key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 3)


def _remove_array_metadata(step_dir):
    os.remove(os.path.join(step_dir, "default", "_METADATA"))


def _replace_metadata_by_a_pickle(step_dir):
    """A pickle that would create a file if anything unpickled it."""
    class Bomb:
        def __reduce__(self):
            return (open, (os.path.join(step_dir, "..", "..", "PWNED"), "w"))
    with open(os.path.join(step_dir, "default", "_METADATA"), "wb") as f:
        pickle.dump(Bomb(), f)


def _remove_item_folder(step_dir):
    shutil.rmtree(os.path.join(step_dir, "default"))


@pytest.mark.parametrize("damage", [_truncate_largest_array_file, _remove_array_metadata,
                                    _replace_metadata_by_a_pickle, _remove_item_folder, flip_one_bit,
                                    flip_one_bit_in_an_array])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(reference, tmp_path, capsys,
                                                                                      damage, digits_dir):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    os.remove(os.path.join(workdir, "summary.json"))
    damage(os.path.join(workdir, "checkpoints", "30"))
    assert train.run(_digits_config(digits_dir), workdir)["step"] == 30
    out = capsys.readouterr().out
    assert "the checkpoint of step 30 is damaged" in out and "Resuming from the checkpoint of step 25" in out
    damage_line = next(line for line in out.splitlines() if "is damaged" in line)
    assert "<" not in damage_line and "0x" not in damage_line, damage_line  # no Orbax object reprs
    assert "TensorStore details" not in damage_line, damage_line
    if damage is flip_one_bit_in_an_array:  # restored without complaint by Orbax: only the checksums see it
        assert "1 array(s) do not match the checksums" in damage_line, damage_line
    kept = glob.glob(os.path.join(workdir, "damaged_checkpoints", "30-*"))
    assert len(kept) == 1 and os.listdir(kept[0])  # moved aside, not deleted
    assert not os.path.exists(os.path.join(workdir, "PWNED"))
    _assert_same_params(reference, workdir)


def test_fingerprints_see_one_flipped_bit_and_moved_values():
    x = jax.numpy.arange(12, dtype=jax.numpy.float32).reshape(3, 4) / 7
    base = int(checkpoint.fingerprints({"x": x})["x"])
    bits = np.asarray(x).view(np.uint32).copy()
    for index in range(bits.size):
        for bit in (0, 13, 31):
            flipped = bits.copy().reshape(-1)
            flipped[index] ^= np.uint32(1 << bit)
            changed = jax.numpy.asarray(flipped.view(np.float32).reshape(3, 4))
            assert int(checkpoint.fingerprints({"x": changed})["x"]) != base, (index, bit)
    assert int(checkpoint.fingerprints({"x": x[::-1]})["x"]) != base
    assert int(checkpoint.fingerprints({"x": x.astype(jax.numpy.bfloat16)})["x"]) != base


def test_a_regular_file_under_a_step_name_is_set_aside_not_deleted(reference, digits_dir, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    os.remove(os.path.join(workdir, "summary.json"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "30"))
    with open(os.path.join(workdir, "checkpoints", "30"), "w", encoding="utf-8") as f:
        f.write("not a checkpoint")
    assert train.run(_digits_config(digits_dir), workdir)["step"] == 30
    assert "the checkpoint of step 30 is damaged: it is a regular file" in capsys.readouterr().out
    kept = glob.glob(os.path.join(workdir, "damaged_checkpoints", "30-*"))
    assert len(kept) == 1 and open(kept[0], encoding="utf-8").read() == "not a checkpoint"
    _assert_same_params(reference, workdir)


def test_load_params_prints_nothing(reference, capfd):
    capfd.readouterr()
    checkpoint.load_params(reference)
    out, err = capfd.readouterr()
    assert out == "" and "WARNING" not in err, err


def test_checkpoint_of_another_model_is_a_clear_error_and_nothing_is_moved(reference, digits_dir, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    os.remove(os.path.join(workdir, "config.json"))  # so that only the checkpoint itself can tell
    config = _digits_config(digits_dir)
    config.model.variant = "mu/4"
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="different model.*pos_embed"):
        train.run(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "25", "30"]
    assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))


def test_unwritable_workdir_is_a_clear_error(digits_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="Cannot write to --workdir"):
        train.run(tiny_digits_config(digits_dir), str(blocker / "w"))


def _nan_at(monkeypatch, bad_step: int):
    """The digits batches as float32, with NaN images in the batch of step index `bad_step`."""
    original = pipeline.ArraySource.train_batches

    def train_batches(self, start_step=0):
        for step, batch in enumerate(original(self, start_step), start_step):
            image = batch["image"].astype(np.float32)
            yield {"image": image * np.nan if step == bad_step else image, "label": batch["label"]}
    monkeypatch.setattr(pipeline.ArraySource, "train_batches", train_batches)


def test_nan_stops_the_run_naming_the_step_and_no_checkpoint_holds_nans(digits_dir, tmp_path, monkeypatch):
    _nan_at(monkeypatch, bad_step=7)
    config = tiny_digits_config(digits_dir, total_steps=20, checkpoint_every_steps=5, log_every_steps=10)
    with pytest.raises(train.NonFiniteError, match="NaN or Inf at step 8 .*newest is step 5"):
        train.run(config, str(tmp_path))
    assert checkpoint.manager(str(tmp_path), read_only=True).all_steps() == [5]


def test_nan_before_the_first_checkpoint_says_there_is_none(digits_dir, tmp_path, monkeypatch):
    _nan_at(monkeypatch, bad_step=1)
    config = tiny_digits_config(digits_dir, total_steps=10, checkpoint_every_steps=5, log_every_steps=2)
    with pytest.raises(train.NonFiniteError, match="NaN or Inf at step 2 .*no checkpoint after it was written; "
                                                   "there is none yet"):
        train.run(config, str(tmp_path))


def test_nan_skip_policy_skips_that_update_and_finishes(digits_dir, tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, bad_step=7)
    config = tiny_digits_config(digits_dir, total_steps=20, checkpoint_every_steps=5, log_every_steps=10,
                                on_nonfinite="skip")
    assert train.run(config, str(tmp_path))["step"] == 20
    assert "NaN or Inf loss or gradient at steps [8]" in capsys.readouterr().out
    for leaf in jax.tree.leaves(checkpoint.load_params(str(tmp_path))):
        assert np.all(np.isfinite(leaf))


def test_write_cut_off_mid_checkpoint_is_ignored_and_cleaned_up(reference, digits_dir, tmp_path):
    """What kill -9 during an asynchronous save leaves: step 30 only as Orbax's temporary folder, half
    written. The run resumes from step 25, removes the leftover and ends equal to the uninterrupted run."""
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    os.remove(os.path.join(workdir, "summary.json"))
    step_dir = os.path.join(workdir, "checkpoints", "30")
    _truncate_largest_array_file(step_dir)
    os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp")
    assert train.run(_digits_config(digits_dir), workdir)["step"] == 30
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "25", "30"]
    _assert_same_params(reference, workdir)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_disk_full_through_the_command_line_ends_with_the_error_naming_the_step(digits_dir, tmp_path):
    """Files may not grow past 100 kB (RLIMIT_FSIZE, which binds root too): the array files of the
    step-15 checkpoint cannot be written, as on a full disk. The CheckpointWriteError naming that step
    and the intact ones is the last line, no Orbax or asyncio traceback follows it, the status is 1,
    and the rerun with room to write resumes from step 10."""
    workdir = str(tmp_path / "w")
    train.run(digits_file_config(digits_dir, {**OVERRIDES, "total_steps": 10}), workdir)
    full = subprocess.run(_command(workdir, digits_dir), cwd=REPO, capture_output=True, text=True, check=False,
                          preexec_fn=_limit_file_size)
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Writing the checkpoint of step 15") and "intact (steps [5, 10])" in last, last
    assert "Traceback" not in full.stderr and "cannot schedule new futures" not in full.stderr
    assert sorted(checkpoint.manager(workdir, read_only=True).all_steps()) == [5, 10]


def test_sigterm_during_start_up_exits_75(digits_dir, tmp_path):
    proc = _start(str(tmp_path / "w"), digits_dir)
    time.sleep(1.0)  # importing JAX and TensorFlow
    proc.send_signal(signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait() == preemption.EXIT_PREEMPTED, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("Preempted: SIGTERM outside the training loop"), output[-2000:]
    assert "Traceback" not in output


def test_ctrl_c_finishes_the_save_in_flight_and_exits_130_with_one_line(digits_dir, tmp_path):
    workdir = str(tmp_path / "w")
    proc = _start(workdir, digits_dir)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    in_flight = []
    while proc.poll() is None and not in_flight:  # Ctrl-C the moment a checkpoint write is under way
        in_flight = glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C while it finishes the write
    assert proc.wait() == preemption.EXIT_INTERRUPTED, "".join(lines[-30:])
    time.sleep(0.5)  # the reader thread's last lines
    progress = ("step ", "Training", "WARNING: All log", "I0000", "JAX ", "compiling", "compiled and ran")
    said = [line for line in lines if not line.startswith(progress)]
    assert said[-1].startswith("Interrupted (Ctrl-C)") and len(said) <= 2, said
    step = int(os.path.basename(in_flight[0]).split(".")[0])
    assert step in checkpoint.manager(workdir, read_only=True).all_steps()  # finished, not dropped
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
    assert checkpoints_restorable(workdir)


def checkpoints_restorable(workdir) -> bool:
    return all(jax.tree.leaves(checkpoint.load_params(workdir, step)) for step in
               checkpoint.manager(workdir, read_only=True).all_steps())
