"""Every reader of weights checks what it reads (evaluate, convert --to_timm, init_from, load_variables):
a damaged newest checkpoint is skipped, saying so, or the reader stops naming the damage. evaluate
--workdir evaluates with the run's own config; init_from mistakes are named before JAX and the data
start; predict names the images it takes. One tiny digits run, copied for each kind of damage."""
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from masksub_jax import checkpoint, convert, evaluate, init_from, models, train
from masksub_jax.models import vit
from tests.conftest import REPO, damage_an_array, digits_file_config, digits_main_command, tiny_digits_config

# configs/digits.py, short, at a variant and normalisation of its own (what evaluate must read from
# config.json), with an evaluation at every checkpoint (what a fallback must reproduce).
RUN = {"total_steps": 6, "checkpoint_every_steps": 2, "eval_every_steps": 2, "log_every_steps": 2,
       "model.variant": "mu/4", "data.std": (0.4,), "optim.warmup_epochs": 0.0, "optim.lr": 5e-3,
       "ema.decay": 0.5}
EARLY = 20  # seconds: an init_from mistake is named before the data and JAX's devices (today 25-30 s in)


@pytest.fixture(scope="module")
def run(digits_dir, tmp_path_factory):
    """A finished run: its workdir and its evaluations {step: "top1 X top5 Y"} as the trainer printed them."""
    workdir = str(tmp_path_factory.mktemp("run"))
    summary = train.run(digits_file_config(digits_dir, RUN), workdir)
    evals = {h["step"]: f"top1 {h['eval/top1']:.4f} top5 {h['eval/top5']:.4f}"
             for h in summary["history"] if "eval/top1" in h}
    evals[6] = f"top1 {summary['top1']:.4f} top5 {summary['top5']:.4f}"
    assert evals[4] != evals[6], evals  # else a fallback could not be told from reading step 6
    return workdir, evals


def _copy(run, tmp_path) -> str:
    workdir = str(tmp_path / "w")
    shutil.copytree(run[0], workdir)
    return workdir


def _damage(workdir: str, step: int, how: str, collection: str = "params") -> None:
    damage_an_array(os.path.join(workdir, "checkpoints", str(step)), how, collection)


def _run(args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _evaluate(workdir: str, digits_dir: str) -> list[str]:
    """`evaluate --workdir` with --config and the run's overrides given as well: the way it worked
    before it read config.json, so that the damage tests test only the checks."""
    command = digits_main_command(workdir, digits_dir, RUN)
    return ["masksub_jax.evaluate", *command[3:]]


def _one_error_line(done) -> str:
    """The failed command's error line: exit 1, the last line of stderr, no traceback on the console."""
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr[-2000:]
    return last


# ------------------------------------------------------------------------------------------------------
# evaluate --workdir


def test_evaluate_workdir_alone_uses_the_runs_config_and_prints_the_trainers_result(run):
    workdir, evals = run
    done = _run(["masksub_jax.evaluate", f"--workdir={workdir}"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{evals[6]} on 300 eval examples" in done.stdout, done.stdout


def test_evaluate_skips_a_damaged_newest_checkpoint_saying_so(run, digits_dir, tmp_path):
    evals = run[1]
    workdir = _copy(run, tmp_path)
    _damage(workdir, 6, "flip")
    done = _run(_evaluate(workdir, digits_dir))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    said = done.stdout + done.stderr
    assert "the checkpoint of step 6" in said and "do not match the checksums" in said, said
    assert "read step 4, the newest intact one" in said, said
    assert f"{evals[4]} on 300 eval examples" in done.stdout, done.stdout  # step 4's weights, as trained
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]  # a reader moves nothing


def test_evaluate_with_every_checkpoint_damaged_stops_in_one_line_naming_each(run, digits_dir, tmp_path):
    workdir = _copy(run, tmp_path)
    _damage(workdir, 6, "flip")
    _damage(workdir, 4, "nan")
    _damage(workdir, 2, "flip")
    done = _run(_evaluate(workdir, digits_dir))
    line = _one_error_line(done)
    assert "Every checkpoint in" in line and "step 6: 1 array(s) do not match the checksums" in line, line
    assert "step 4: ['params']" in line and "holds NaN or Inf" in line and "step 2: 1 array(s)" in line, line
    assert "evaluating" not in done.stdout


def test_evaluate_mistakes_are_one_line(run, tmp_path):
    done = _run(["masksub_jax.evaluate", "--config=digits"])
    assert "give one of --workdir (a training run) and --init_from" in _one_error_line(done)
    done = _run(["masksub_jax.evaluate", f"--init_from={run[0]}"])
    assert "--init_from needs --config=FILE" in _one_error_line(done)
    os.makedirs(tmp_path / "empty")
    done = _run(["masksub_jax.evaluate", f"--workdir={tmp_path / 'empty'}", "--config=digits"])
    assert f"--workdir={tmp_path / 'empty'} is not a training workdir (it has no checkpoints/)" in _one_error_line(done)
    (tmp_path / "vit_s.npz").write_bytes(b"")
    done = _run(["masksub_jax.evaluate", "--config=configs/digits.py", f"--init_from={tmp_path / 'vit_s.npz'}"])
    assert "is a weight file; convert it first: `python -m masksub_jax.convert" in _one_error_line(done)


# ------------------------------------------------------------------------------------------------------
# convert --to_timm


def test_convert_to_timm_skips_a_damaged_newest_checkpoint_and_writes_nothing_when_all_are(run, tmp_path):
    workdir = _copy(run, tmp_path)
    _damage(workdir, 6, "nan")
    target = tmp_path / "out.npz"
    done = _run(["masksub_jax.convert", "--to_timm", f"--from={workdir}", f"--to={target}"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the checkpoint of step 6" in done.stderr and "holds NaN or Inf" in done.stderr, done.stderr
    with np.load(target) as exported:
        want = vit.to_timm(checkpoint.load_params(run[0], step=4))
        assert set(exported.files) == set(want)
        for name, value in want.items():
            np.testing.assert_array_equal(exported[name], value, err_msg=name)

    for step in (2, 4):
        _damage(workdir, step, "flip")
    target = tmp_path / "none.npz"
    done = _run(["masksub_jax.convert", "--to_timm", f"--from={workdir}", f"--to={target}"])
    assert done.returncode != 0 and not target.exists()
    assert "Every checkpoint in" in done.stderr and "step 2: 1 array(s) do not match" in done.stderr, done.stderr


# ------------------------------------------------------------------------------------------------------
# The readers in Python


def test_load_variables_checks_what_it_reads_and_moves_nothing(run, tmp_path, capfd):
    workdir = _copy(run, tmp_path)
    intact = checkpoint.load_variables(workdir, step=4)
    assert checkpoint.load_variables(workdir, ema=True)  # the moving average's paths match its checksums
    _damage(workdir, 6, "nan")
    capfd.readouterr()
    np.testing.assert_equal(checkpoint.load_variables(workdir), intact)
    said = capfd.readouterr().err.strip().splitlines()  # by default a warning line on stderr
    assert len(said) == 1 and "step 6" in said[0] and "holds NaN or Inf" in said[0], said
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"step 6 .* is damaged: \['params'\].* holds NaN"):
        checkpoint.load_variables(workdir, step=6)
    with pytest.raises(checkpoint.DamagedCheckpointError, match="step 6"):
        checkpoint.load_variables(workdir, fall_back=False)
    _damage(workdir, 4, "flip", collection="ema")
    ema_said = []
    checkpoint.load_variables(workdir, ema=True, say=ema_said.append)  # step 6's average is intact
    assert ema_said == []
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"e\.g\. \['ema'\]"):
        checkpoint.load_variables(workdir, step=4, ema=True)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]


def test_a_truncated_array_file_is_named_in_one_line_without_tracebacks_after_it(run, tmp_path):
    """An emptied file fails the read while TensorStore still has reads in flight, whose late
    callbacks printed hundreds of "Event loop is closed" tracebacks after the warning."""
    workdir = _copy(run, tmp_path)
    data = os.path.join(workdir, "checkpoints", "6", "default", "ocdbt.process_0", "d")
    for name in os.listdir(data):
        open(os.path.join(data, name), "w").close()
    script = ("import gc\nfrom masksub_jax import checkpoint\n"
              f"for _ in range(6):\n    checkpoint.load_variables({workdir!r})\ngc.collect()\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "checkpoint" in line]
    assert len(said) == 6 and all("step 6" in line and "cannot be read" in line for line in said), said[:12]


def test_converted_weights_are_checked_against_the_checksums_written_with_them(run, tmp_path):
    variables = checkpoint.load_variables(run[0])
    directory = str(tmp_path / "converted")
    convert.save_variables(variables, directory, family="vit", variant="mu/4", image_size=8)
    np.testing.assert_equal(convert.read_variables(directory), variables)
    metadata = init_from.read_metadata(directory)
    assert metadata["fingerprints"] == checkpoint.fingerprint_record(variables)
    # One bit flipped in an array, the checksums kept: only they can tell.
    changed = jax.tree.map(np.array, variables)
    kernel = changed["params"]["head"]["kernel"].reshape(-1).view(np.uint32)
    kernel[3] ^= 1
    shutil.rmtree(directory)
    ocp.PyTreeCheckpointer().save(directory, changed)
    (tmp_path / "converted" / init_from.METADATA).write_text(json.dumps(metadata))
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"damaged: 1 array\(s\) .* \['params'\]\['head'\]"):
        convert.read_variables(directory)
    os.remove(tmp_path / "converted" / init_from.METADATA)  # converted before checksums were written: read as then
    assert init_from.read_metadata(directory) is None
    np.testing.assert_equal(convert.read_variables(directory), changed)


# ------------------------------------------------------------------------------------------------------
# init_from


def _train_command(tmp_path, digits_dir, init_from, **overrides):
    command = digits_main_command(str(tmp_path / "ft"), digits_dir, {**overrides, "init_from": init_from})
    return command[2:]  # _run adds `python -m`


def test_init_from_mistakes_are_named_with_the_fix_before_jax_and_the_data_start(run, digits_dir, tmp_path):
    weights = tmp_path / "deit3_small_patch16_224.safetensors"
    weights.write_bytes(b"")
    os.makedirs(tmp_path / "photos")
    resnet = str(tmp_path / "resnet_weights")
    convert.save_variables({"params": {"w": np.zeros(2, np.float32)}}, resnet, family="resnet", variant="50")
    cases = {
        str(tmp_path / "missing"): "does not exist. config.init_from takes a training workdir",
        str(weights): (f"is a weight file; convert it first: `python -m masksub_jax.convert --family=vit "
                       f"--variant=mu/2 --from={weights} --to=inits/deit3_small_patch16_224`"),
        run[0]: "holds a vit mu/4 model",  # the run's config.json says so; this config is mu/2
        resnet: "holds a resnet 50 model",
        str(tmp_path / "photos"): "is neither a training workdir nor converted weights",
    }
    for path, said in cases.items():
        start = time.perf_counter()
        done = _run(_train_command(tmp_path, digits_dir, path))
        took = time.perf_counter() - start
        line = _one_error_line(done)
        assert said in line, (path, line)
        assert "JAX " not in done.stdout and took < EARLY, (path, took, done.stdout)  # before JAX's devices
        assert not os.path.exists(tmp_path / "ft" / "checkpoints")


def test_init_from_a_damaged_workdir_never_starts_training(run, digits_dir, tmp_path):
    workdir = _copy(run, tmp_path)
    _damage(workdir, 6, "flip")
    done = _run(_train_command(tmp_path, digits_dir, workdir, **{"model.variant": "mu/4", "data.std": (0.4,)}))
    line = _one_error_line(done)
    assert f"config.init_from={workdir!r}: The checkpoint of step 6" in line and "do not match the checksums" in line
    assert not any(out.startswith(("step ", "compiling", "Training")) for out in done.stdout.splitlines()), done.stdout
    assert not os.path.exists(tmp_path / "ft" / "checkpoints" / "2")


# ------------------------------------------------------------------------------------------------------
# predict


def test_predict_names_the_images_it_takes(run, digits_dir):
    config = digits_file_config(digits_dir, RUN)
    variables = checkpoint.load_variables(run[0])
    good = np.zeros((2, 8, 8, 1), np.uint8)
    assert evaluate.predict(config, variables, good).shape == (2, 10)
    for images, said in [(good.astype(np.float32) / 255, r"got float32 images\. Pass the 0-255 pixels as uint8"),
                         (np.zeros((2, 16, 16, 1), np.uint8), r"got shape \(2, 16, 16, 1\): resize them to 8x8"),
                         (np.zeros((2, 8, 8, 3), np.uint8), r"give them 1 channel\(s\)"),
                         (good[0], r"got shape \(8, 8, 1\) \(one image: images\[None\]\)"),
                         (good[..., 0], r"got shape \(2, 8, 8\) \(single-channel images: images\[\.\.\., None\]\)"),
                         (good[:0], r"got no images \(shape \(0, 8, 8, 1\)\)")]:
        with pytest.raises(ValueError, match=r"^predict takes uint8 images of shape \(N, 8, 8, 1\) .*" + said):
            evaluate.predict(config, variables, images)
    # The Python loader checks the model the weights record before reading them, as init_from does.
    with pytest.raises(ValueError, match=r"path='.*' holds a vit mu/4 model .*config.json.*model.variant='mu/2'"):
        evaluate.load_variables(digits_file_config(digits_dir, {**RUN, "model.variant": "mu/2"}), run[0], 10)


def test_the_classifier_is_the_familys_to_name(tmp_path):
    """tests/tiny_family names its classifier "classifier" (CLASSIFIER): predict counts its classes there."""
    config = tiny_digits_config("/unused", **{"model.family": "tests.tiny_family"})
    family = models.of(config)
    model = family.build(config, 7)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32)))
    assert models.classifier(family) == "classifier" and models.num_classes(family, variables["params"]) == 7
    assert evaluate.predict(config, variables, np.zeros((3, 8, 8, 1), np.uint8)).shape == (3, 7)
    initial = jax.device_get(family.build(config, 5).init(jax.random.PRNGKey(1), np.zeros((1, 8, 8, 1), np.float32)))
    said = []
    adapted = convert.adapt_params(variables["params"], initial["params"], family="tests.tiny_family",
                                   say=said.append)  # 7 classes into 5: the classifier starts fresh
    np.testing.assert_array_equal(adapted["classifier"]["kernel"], initial["params"]["classifier"]["kernel"])
    assert any(line.startswith("init_from: classifier/kernel (64, 7) does not fit (64, 5)") for line in said), said
