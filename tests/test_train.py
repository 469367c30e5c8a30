"""The trainer end to end on digits: learning, checkpoints, exact resume, finishing, and outputs."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from masksub_jax import checkpoint, goodput, train
from tests.conftest import mock_imagenet, tiny_digits_config


@pytest.fixture(scope="module")
def finished_run(digits_dir, tmp_path_factory):
    """60 MaskSub (ratio 0.5) steps on digits with checkpoints every 20 steps, steps 2 and 3 profiled,
    tracked by an offline W&B run."""
    workdir = str(tmp_path_factory.mktemp("run") / "w")
    config = tiny_digits_config(digits_dir, **{"profile.steps": (2, 4), "profile.dump_hlo": True,
                                               "wandb.project": "masksub-tests", "wandb.mode": "offline"})
    return config, workdir, train.run(config, workdir)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if '"step"' in line]


def test_a_run_profiles_its_chosen_steps_dumps_its_hlo_and_says_where_its_time_went(finished_run):
    _, workdir, summary = finished_run
    traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files if f.endswith(".xplane.pb")]
    assert len(traces) == 1
    with open(os.path.join(workdir, "profile", "train_step.hlo.txt"), encoding="utf-8") as f:
        assert f.read().startswith("HloModule jit_train_step")
    with open(os.path.join(workdir, "sessions.jsonl"), encoding="utf-8") as f:
        (session,) = [json.loads(line) for line in f]
    assert (session["start_step"], session["step"], session["devices"]) == (0, 60, 8)
    assert sum(session[f"{phase}_s"] for phase in goodput.PHASES) == pytest.approx(session["wall_s"])
    assert session["compile_s"] > 0 and session["eval_s"] > 0 and session["save_s"] > 0
    assert 0 < summary["time"]["goodput"] < 1 and summary["time"]["redone_steps"] == 0


def test_the_wandb_run_gets_the_scalars_images_and_config_tensorboard_gets(finished_run):
    from tests.test_tracking import logged, records_with_step
    _, workdir, summary = finished_run
    (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    records = records_with_step(run_dir, 60)
    steps = logged(records)
    assert [s for s in sorted(steps) if "train/loss_main" in steps[s]] == [20, 40, 60]
    assert float(steps[60]["eval/top1"]) == pytest.approx(summary["top1"])
    assert steps[20]["train/sub_branch_inputs/count"] == "8"
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {i.key: i.value_json for i in start.config.update}["model.variant"] == '"mu/2"'


@pytest.mark.smoke
def test_masksub_run_learns_and_writes_its_outputs(finished_run):
    config, workdir, summary = finished_run
    logged = [m for m in _metrics(workdir) if "train/loss" in m]
    assert [m["step"] for m in logged] == [20, 40, 60]
    assert logged[-1]["train/loss_main"] < 0.95 * logged[0]["train/loss_main"]
    # The sub loss is a cross-entropy against a teacher that sharpens as it learns: not monotone.
    assert all(np.isfinite(m["train/loss_sub"]) for m in logged)
    assert all(m["train/examples_per_s"] > 0 for m in logged)
    # The lr shown is the logged step's (the schedule at its start), not the mean over the log window.
    from masksub_jax import step
    from masksub_jax.data import pipeline
    _, schedule = step.make_optimizer(config, total_steps=60,
                                      steps_per_epoch=pipeline.make(config).num_train_examples // config.batch_size)
    assert [m["train/lr"] for m in logged] == pytest.approx([float(schedule(s - 1)) for s in (20, 40, 60)], rel=1e-6)
    assert summary["step"] == 60 and summary["eval_examples"] == 300
    assert summary["top1"] > 0.2  # 10 classes: chance is 0.1
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        assert {"step", "top1", "wall_s"} <= set(json.load(f))
    assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [20, 40, 60]
    assert config.keep_checkpoints == 3
    assert summary["history"] == _metrics(workdir)  # run() hands back what it logged


@pytest.mark.smoke
def test_tensorboard_groups_train_and_eval_and_shows_the_first_inputs(finished_run):
    from tensorboard.backend.event_processing import event_accumulator
    _, workdir, _ = finished_run
    events = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"train/loss", "train/loss_main", "train/loss_sub", "train/lr", "train/examples_per_s",
            "eval/top1", "eval/top5", "train/inputs", "train/sub_branch_inputs"} <= tags
    assert not any(tag.startswith("eval_") or tag == "eval/eval_examples" for tag in tags)
    assert [e.step for e in events.Tensors("train/sub_branch_inputs")] == [20]  # once, at the first log step
    # tf.summary.image: width, height, then 8 PNGs (the first 8 examples)
    assert len(events.Tensors("train/inputs")[0].tensor_proto.string_val) == 2 + 8


def test_input_preview_greys_out_exactly_the_units_the_sub_branch_drops(digits_dir):
    from masksub_jax import masksub, step
    from masksub_jax.data import pipeline
    config = tiny_digits_config(digits_dir, **{"masksub.ratio": 0.25})
    batch = next(pipeline.make(config).train_batches())
    rng = jax.random.PRNGKey(7)
    inputs, sub_inputs = jax.device_get(step.make_input_preview(config, 10)(batch, rng))
    assert inputs.shape == sub_inputs.shape == (8, 8, 8, 1) and 0 <= inputs.min() and inputs.max() <= 1
    # The train step's key for the loss is the second half of split(rng); its corruption key the third of three.
    keep = np.asarray(masksub.keep_indices(jax.random.split(jax.random.split(rng)[1], 3)[2], 8, 16, 0.25))
    assert keep.shape == (8, 12)  # mu/2 on 8x8: 16 units of 2x2 pixels, 12 kept at ratio 0.25
    for i in range(8):
        for unit in range(16):
            r, c = divmod(unit, 4)
            block = (slice(2 * r, 2 * r + 2), slice(2 * c, 2 * c + 2))
            want = inputs[i][block] if unit in keep[i] else np.full((2, 2, 1), 0.5, np.float32)
            np.testing.assert_array_equal(sub_inputs[i][block], want)


@pytest.mark.smoke
def test_evaluate_and_predict_reproduce_the_runs_result(finished_run):
    from masksub_jax import evaluate
    from masksub_jax.data import pipeline
    config, workdir, summary = finished_run
    variables = evaluate.load_variables(config, workdir, 10)
    scores = evaluate.evaluate(config, variables)
    assert scores == {"top1": summary["top1"], "top5": summary["top5"], "eval_examples": 300}
    data = pipeline.make(config)
    logits = evaluate.predict(config, variables, data.eval_images)
    assert logits.shape == (300, 10)
    assert np.mean(logits.argmax(-1) == data.eval_labels) == pytest.approx(summary["top1"], abs=1e-9)
    sub = evaluate.predict(config, variables, data.eval_images[:32], sub_branch_rng=jax.random.PRNGKey(0))
    assert sub.shape == (32, 10) and not np.allclose(sub, logits[:32])  # half the tokens: other logits


def test_finished_run_says_so_and_does_nothing(finished_run, capsys):
    config, workdir, summary = finished_run
    again = train.run(config, workdir)
    assert again == summary
    assert "already finished at step 60" in capsys.readouterr().out


@pytest.mark.smoke
def test_resumed_run_equals_uninterrupted_run(finished_run, tmp_path):
    """Resuming from the step-20 checkpoint reproduces the uninterrupted run's parameters exactly."""
    config, workdir, _ = finished_run
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(workdir, "checkpoints", "20"), os.path.join(resumed, "checkpoints", "20"))
    summary = train.run(config, resumed)
    assert summary["step"] == 60
    assert [m["step"] for m in _metrics(resumed) if "train/loss" in m] == [40, 60]
    want, got = checkpoint.load_params(workdir), checkpoint.load_params(resumed)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_longer_run_continues_from_the_last_checkpoint(finished_run, tmp_path, capsys):
    config, workdir, _ = finished_run
    longer = str(tmp_path / "longer")
    shutil.copytree(workdir, longer)
    config = tiny_digits_config(config.data.data_dir, total_steps=80)
    assert train.run(config, longer)["step"] == 80
    out = capsys.readouterr().out
    assert "Resuming from the checkpoint of step 60" in out
    assert f"JAX {jax.__version__}, backend cpu: 8 device(s) (cpu) in 1 process(es)." in out


def test_load_params_gives_numpy_arrays_of_the_model(finished_run):
    _, workdir, _ = finished_run
    params = checkpoint.load_params(workdir)
    assert isinstance(params["head"]["kernel"], np.ndarray)
    assert params["head"]["kernel"].shape == (64, 10)
    assert params["pos_embed"].shape == (1, 16, 64)
    older = checkpoint.load_params(workdir, step=20)
    assert not np.array_equal(older["head"]["kernel"], params["head"]["kernel"])
    with pytest.raises(FileNotFoundError, match="it has steps \\[20, 40, 60\\]"):
        checkpoint.load_params(workdir, step=15)


def test_workdir_of_another_model_is_refused(finished_run, tmp_path):
    config, workdir, _ = finished_run
    other = str(tmp_path / "other")
    shutil.copytree(workdir, other)
    config = tiny_digits_config(config.data.data_dir, **{"model.variant": "mu/4"})
    with pytest.raises(ValueError, match="different model.variant"):
        train.run(config, other)


@pytest.mark.parametrize("mode", ["none", "dropout", "droppath"])
def test_other_modes_train(digits_dir, tmp_path, mode, capsys):
    config = tiny_digits_config(digits_dir, total_steps=4, log_every_steps=2, checkpoint_every_steps=4,
                                **{"masksub.mode": mode})
    summary = train.run(config, str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    first = out.index("compiling the train step...")
    assert out[first + 1].startswith("compiled and ran the first step in ")
    assert out[first + 2].startswith("step 2/4 |") and "ex/s | input wait " in out[first + 2]  # the first step left out
    assert out[-2] == "evaluating 300 examples..."
    logged = [m for m in _metrics(str(tmp_path)) if "train/loss" in m]
    assert summary["step"] == 4 and len(logged) == 2
    assert np.isnan(logged[0]["train/loss_sub"]) == (mode == "none")


def test_lamb_bce_mixup_recipe_on_synthetic_data(tmp_path):
    """The DeiT-III recipe's code path (LAMB, BCE, mixup + cutmix) on a synthetic 3-channel set."""
    config = tiny_digits_config("/unused", total_steps=6, log_every_steps=3, checkpoint_every_steps=6, loss="bce",
                                label_smoothing=0.0, **{"data.source": "synthetic", "data.image_size": 16,
                                                        "data.mean": (0.5,) * 3, "data.std": (0.5,) * 3,
                                                        "model.variant": "mu/4", "optim.name": "lamb",
                                                        "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0})
    summary = train.run(config, str(tmp_path))
    assert summary["step"] == 6 and summary["eval_examples"] == 256


def test_trainer_on_mock_imagenet(tmp_path):
    config = tiny_digits_config(str(tmp_path / "tfds"), total_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                                batch_size=8, eval_batch_size=8,
                                **{"data.source": "tfds", "data.image_size": 32, "data.mean": (0.5,) * 3,
                                   "data.std": (0.5,) * 3, "model.variant": "mu/8"})
    with mock_imagenet(num_examples=10):
        summary = train.run(config, str(tmp_path / "w"))
    assert summary["step"] == 2 and summary["eval_examples"] == 10


def test_bfloat16_memory_lean_remat_scanned_run_learns(digits_dir, tmp_path, capsys):
    """The precision, memory-lean, remat and scanned-blocks switches go through the trainer, which
    still learns, and a longer run continues from the scanned blocks' checkpoint."""
    switches = {"model.dtype": "bfloat16", "model.remat": True, "masksub.memory_lean": True, "model.scan": True}
    mixed = train.run(tiny_digits_config(digits_dir, **switches), str(tmp_path / "bf16"))
    assert mixed["step"] == 60 and mixed["top1"] > 0.2  # 10 classes: chance is 0.1
    logged = [m for m in _metrics(str(tmp_path / "bf16")) if "train/loss" in m]
    assert logged[-1]["train/loss_main"] < 0.95 * logged[0]["train/loss_main"]
    assert checkpoint.load_params(str(tmp_path / "bf16"))["blocks"]["block"]["mlp"]["fc1"]["kernel"].shape[0] == 4
    capsys.readouterr()
    assert train.run(tiny_digits_config(digits_dir, total_steps=80, **switches), str(tmp_path / "bf16"))["step"] == 80
    assert "Resuming from the checkpoint of step 60" in capsys.readouterr().out


def test_workdir_paths_keep_bucket_urls():
    """gs:// workdirs stay URLs (a local path would be made absolute and written on each host's disk)."""
    assert checkpoint.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
    assert checkpoint.checkpoint_dir("runs/x") == os.path.join(os.getcwd(), "runs", "x", "checkpoints")
