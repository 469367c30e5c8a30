"""Workdirs that tell the truth: config.json once a run has started, finished runs not changed
after the fact, metrics without repeated steps after a resume; and errors said in one line."""
import json
import os
import shutil
import subprocess

import pytest

from masksub_jax import train
from masksub_jax import workdir as workdir_lib
from tests.conftest import REPO, digits_main_command, tiny_digits_config


def _read(workdir, name):
    with open(os.path.join(workdir, name), encoding="utf-8") as f:
        return f.read()


def _metrics(workdir):
    return [json.loads(line) for line in _read(workdir, "metrics.jsonl").splitlines()]


@pytest.fixture(scope="module")
def finished(digits_dir, tmp_path_factory):
    """40 steps, checkpoints and logs every 10."""
    workdir = str(tmp_path_factory.mktemp("finished") / "w")
    config = tiny_digits_config(digits_dir, total_steps=40, log_every_steps=10, checkpoint_every_steps=10)
    return config, workdir, train.run(config, workdir)


def test_a_failed_start_leaves_no_record_and_the_corrected_command_runs(digits_dir, tmp_path):
    workdir = str(tmp_path / "w")
    wrong = tiny_digits_config(digits_dir, total_steps=10, **{"data.source": "tfds", "data.name": "no_such_set"})
    with pytest.raises(Exception, match="no_such_set"):
        train.run(wrong, workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    right = tiny_digits_config(digits_dir, total_steps=10, checkpoint_every_steps=10)
    assert train.run(right, workdir)["step"] == 10
    assert json.loads(_read(workdir, "config.json"))["data.source"] == "digits"


def test_a_finished_run_refuses_changed_training_keys_and_keeps_its_config(finished, capsys):
    config, workdir, summary = finished
    before = _read(workdir, "config.json")
    changed = config.copy_and_resolve_references()
    changed.optim.lr, changed.masksub.ratio = 1e-4, 0.25
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"finished.*masksub.ratio, optim.lr \(masksub.ratio: 0.5 -> 0.25"):
        train.run(changed, workdir)
    harmless = config.copy_and_resolve_references()
    harmless.log_every_steps = 7
    assert train.run(harmless, workdir) == summary
    assert "log_every_steps: 10 -> 7 differ from the finished run's values" in capsys.readouterr().out
    assert _read(workdir, "config.json") == before


def test_a_resume_drops_the_metrics_past_its_checkpoint_and_records_what_changed(finished, tmp_path):
    config, workdir, _ = finished
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    for step in ("30", "40"):  # as if killed after logging step 40 but before its checkpoints landed
        shutil.rmtree(os.path.join(resumed, "checkpoints", step))
    os.remove(os.path.join(resumed, "summary.json"))
    changed = config.copy_and_resolve_references()
    changed.optim.lr = 1e-3
    assert train.run(changed, resumed)["step"] == 40
    logged = _metrics(resumed)
    assert [m["step"] for m in logged if "train/loss" in m] == [10, 20, 30, 40]
    assert sum("hparams" in m for m in logged) == 1
    assert [m["step"] for m in logged if "eval/top1" in m] == [40]
    assert _read(resumed, "config.json") == _read(workdir, "config.json")  # what the run started with
    assert json.loads(_read(resumed, "resumes.jsonl")) == {"step": 20, "changed": {"optim.lr": 1e-3}}
    with pytest.raises(workdir_lib.WorkdirError, match="optim.lr"):  # the record counts: 1e-3 is now the run's
        train.run(config, resumed)
    assert train.run(changed, resumed)["step"] == 40


def test_a_resume_with_another_model_is_refused_before_anything_loads(finished):
    config, workdir, _ = finished
    other = config.copy_and_resolve_references()
    other.batch_size = 32
    with pytest.raises(workdir_lib.WorkdirError, match=r"different batch_size \(batch_size: 64 -> 32\)"):
        train.run(other, workdir)


def _main(tmp_path, digits_dir, *args, config="configs/digits.py"):
    command = digits_main_command(str(tmp_path / "w"), digits_dir, {"total_steps": 2})
    command[3] = f"--config={config}"
    return subprocess.run(command + list(args), cwd=REPO, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("args, config, message", [
    (["--config.optim.lrr=1"], "configs/digits.py",  # reaches config.validate
     "error: Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
    (["--config.nothing.here=3"], "configs/digits.py",  # stopped by ml_collections' flag parser
     "error: Unknown config key 'nothing.here'."),
    ([], "configs/digits.py:epochs=9", "error: Unknown config argument 'epochs'"),
])
@pytest.mark.smoke
def test_a_bad_command_line_ends_with_one_line_and_status_1(tmp_path, digits_dir, args, config, message):
    done = _main(tmp_path, digits_dir, *args, config=config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert not os.path.exists(tmp_path / "w")


def test_verbose_prints_the_traceback_and_errors_log_keeps_it(tmp_path, digits_dir):
    os.makedirs(tmp_path / "w")
    done = _main(tmp_path, digits_dir, "--config.batch_size=7", "--verbose")
    assert done.returncode == 1 and "Traceback" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Config batch_size=7 is invalid: must be a positive multiple of the device count")
    assert "Traceback" in _read(str(tmp_path / "w"), "errors.log")


def test_a_record_from_before_a_run_defining_key_existed_had_its_default():
    """config.json written before model.scan existed: the run's blocks were unrolled, so resuming it
    with scanned blocks is a change of a run-defining key (not a checkpoint that fails to load)."""
    old_record = {"model.variant": "mu/2", "batch_size": 64}
    changes = workdir_lib.changed_keys(old_record, {"model.variant": "mu/2", "batch_size": 64, "model.scan": True})
    assert changes == {"model.scan": (False, True)}
    assert workdir_lib.changed_keys(old_record, {"model.variant": "mu/2", "model.scan": False}) == {}
    with pytest.raises(workdir_lib.WorkdirError, match=r"different model.scan \(model.scan: False -> True\)"):
        workdir_lib.check_same_run("/runs/old", changes)
