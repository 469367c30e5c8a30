"""`python -m masksub_jax.data.prepare --folder`: a rerun, images that do not decode, and the
training command it prints."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from masksub_jax import cli
from masksub_jax.data import generated, pipeline, prepare
from tests.conftest import REPO, digits_file_config

TRAIN, VAL = 12, 6  # images per split of the tree: 3 classes x 4 train, 2 val


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generated.image_folder(str(tmp_path_factory.mktemp("tree") / "images"), num_classes=3,
                                  per_class={"train": 4, "val": 2}, heights=(20, 30), widths=(20, 30), png_every=3)


def _prepare_command(*flags):
    result = subprocess.run([sys.executable, "-m", "masksub_jax.data.prepare", *flags], cwd=REPO,
                            capture_output=True, text=True, check=False)
    return result.returncode, result.stdout, result.stderr


def _num_train_examples(data_dir, name):
    return tfds.builder_from_directory(f"{data_dir}/{name}/{prepare.VERSION}").info.splits["train"].num_examples


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_rerun_needs_overwrite_which_replaces_the_set_only_with_every_image_decoded(tree, tmp_path):
    data_dir = str(tmp_path / "tfds")
    prepare.prepare_folder(tree, "my_images", data_dir)
    rc, _, err = _prepare_command(f"--folder={tree}", "--name=my_images", f"--data_dir={data_dir}")
    assert rc == 1 and f"already prepared in {data_dir}/my_images/1.0.0. Pass --overwrite" in _error_line(err)

    dirty = str(tmp_path / "dirty")
    shutil.copytree(tree, dirty)
    data = open(f"{dirty}/train/class_01/train_0000.JPEG", "rb").read()
    cut = [f"{dirty}/train/class_02/cut_{i}.jpg" for i in range(6)]
    for path in cut:
        with open(path, "wb") as f:
            f.write(data[:len(data) // 3])
    shutil.copy(f"{dirty}/train/class_01/train_0000.JPEG", f"{dirty}/train/class_01/extra.JPEG")
    rc, _, err = _prepare_command(f"--folder={dirty}", "--name=my_images", f"--data_dir={data_dir}", "--overwrite")
    line = _error_line(err)
    assert rc == 1 and f"6 image(s) in {dirty}/train cannot be decoded: {', '.join(cut[:5])} ..." in line, line
    assert "--on_corrupt_image=skip" in line
    assert _num_train_examples(data_dir, "my_images") == TRAIN  # the old set, untouched
    assert os.listdir(data_dir) == ["my_images"]  # nothing half-written

    said = prepare.prepare_folder(dirty, "my_images", data_dir, on_corrupt_image="skip", overwrite=True)
    assert "6 image(s) that do not decode were left out" in said
    assert _num_train_examples(data_dir, "my_images") == TRAIN + 1
    assert not [name for name in os.listdir(data_dir) if name.startswith(".")]  # no staging folder left


def test_the_printed_training_command_reads_the_prepared_tree(tree, tmp_path):
    """The tree's eval split is "val", not the config's default: the command must say so."""
    said = prepare.prepare_folder(tree, "printed", str(tmp_path / "tfds"))
    command = shlex.split(said.splitlines()[-1])
    assert command[:4] == ["python", "-m", "masksub_jax.main", "--config=vit_b"]  # the packaged config: any cwd
    assert os.path.isfile(cli.resolve_config_arg(command[3]).partition("=")[2])
    data = dict(arg[len("--config."):].split("=", 1) for arg in command if arg.startswith("--config.data."))
    assert data["data.eval_split"] == "val" and data["data.data_dir"] == str(tmp_path / "tfds")
    config = digits_file_config(data.pop("data.data_dir"), {
        **data, "data.image_size": 16, "data.mean": (0.5,) * 3, "data.std": (0.5,) * 3, "model.variant": "mu/8",
        "batch_size": 8, "eval_batch_size": 8})
    source = pipeline.make(config)
    assert source.num_train_examples == TRAIN and source.num_eval_examples == VAL
    assert next(source.train_batches())["image"].shape == (8, 16, 16, 3)
    assert next(source.eval_batches())["mask"].sum() == VAL


def test_a_rerun_that_fails_while_writing_leaves_the_old_set_and_no_staging_folder(tree, tmp_path, monkeypatch):
    data_dir = str(tmp_path / "tfds")
    prepare.prepare_folder(tree, "kept", data_dir)
    store = prepare._store

    def store_then_fail(*args):
        store(*args)
        raise OSError("disk full")
    monkeypatch.setattr(prepare, "_store", store_then_fail)
    with pytest.raises(OSError, match="disk full"):
        prepare.prepare_folder(tree, "kept", data_dir, overwrite=True)
    assert _num_train_examples(data_dir, "kept") == TRAIN and os.listdir(data_dir) == ["kept"]


def test_a_name_tfds_cannot_load_is_refused_before_any_work(tree, tmp_path):
    rc, _, err = _prepare_command(f"--folder={tree}", "--name=My-Imgs", f"--data_dir={tmp_path}/tfds")
    line = _error_line(err)
    assert rc == 1 and line.startswith("error: --name=My-Imgs ") and "--name=my_imgs" in line, line
    assert not os.path.exists(f"{tmp_path}/tfds")
    for name in ("MyImgs", "1st", "_x", "imgs/cfg", "imgs:1.0.0", "ns:imgs", "my imgs", ""):  # TFDS reads another
        with pytest.raises(cli.CommandError, match="lower snake_case"):
            prepare.check_name(name)
    for name in ("my_imgs", "a1", "imagenet_folder"):
        prepare.check_name(name)


def test_the_command_prints_its_own_lines_and_none_of_tfds(tree, tmp_path):
    """No `Downloading and preparing`, no `downloaded and prepared to` a staging folder, no absl
    warning, no progress bars: what TFDS's builder says while prepare writes the set."""
    rc, out, err = _prepare_command(f"--folder={tree}", "--name=quiet", f"--data_dir={tmp_path}/tfds")
    assert rc == 0, err
    said = out + err
    for noise in ("incomplete", "Downloading and preparing", "downloaded and prepared", "dataset_info.json",
                  "\x1b[", "\r", "%|"):
        assert noise not in said, said
    assert [line.split(" ", 2)[:2] for line in said.splitlines()] == [
        ["Decoding", "the"], ["Writing", "them"], ["Wrote", tree], ["Train", "on"], ["", ""]], said
    assert said.splitlines()[-1].startswith("  python -m masksub_jax.main --config=vit_b ")
