"""Image-folder trees (ROOT/<split>/<class>/*): listing, errors, per-process slices, the file lists
kept in the workdir, the array_record copy, and a run through `python -m masksub_jax.main` that
survives kill -9 bit-identically (its moving average of the weights included)."""
import gzip
import json
import os
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from masksub_jax import checkpoint, convert, train
from masksub_jax.data import crop, folder_source, generated, pipeline, prepare, tfds_source, types
from tests.conftest import REPO, digits_file_config, digits_main_command, wait_for_step

SMALL = dict(heights=(20, 40), widths=(24, 40), png_every=3)


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory):
    """10 classes x (20 train + 4 val) images, every 3rd a PNG."""
    return generated.image_folder(str(tmp_path_factory.mktemp("tree") / "images"), **SMALL)


@pytest.fixture(scope="module")
def dirty_tree(clean_tree, tmp_path_factory):
    """The clean tree, plus a truncated JPEG, a text file and a hidden file in the train split."""
    root = str(tmp_path_factory.mktemp("dirty") / "images")
    shutil.copytree(clean_tree, root)
    with open(f"{root}/train/class_03/train_0000.JPEG", "rb") as f:
        data = f.read()
    with open(f"{root}/train/class_03/train_0100.JPEG", "wb") as f:
        f.write(data[:len(data) // 3])
    with open(f"{root}/train/class_01/notes.txt", "w") as f:
        f.write("not an image")
    with open(f"{root}/train/class_01/.DS_Store", "w") as f:
        f.write("")
    return root


def _config(root, **overrides):
    return digits_file_config(overrides.pop("data.data_dir", "/unused"), {
        "data.source": "folder", "data.folder": root, "data.eval_split": "val", "data.image_size": 16,
        "data.mean": (0.5,) * 3, "data.std": (0.5,) * 3, "data.augment": "crop_flip", "model.variant": "mu/8",
        "batch_size": 32, "eval_batch_size": 32, **overrides})


# --------------------------------------------------------------------------------------------------
# Listing.

def test_classes_are_the_sorted_class_folders_and_files_are_listed_in_order(clean_tree):
    listing = folder_source.list_split(f"{clean_tree}/train")
    assert listing["classes"] == [f"class_{k:02d}" for k in range(10)]
    assert len(listing["files"]) == 200 and listing["files"] == sorted(listing["files"])
    for file, label in zip(listing["files"], listing["labels"]):
        assert file.startswith(listing["classes"][label] + "/")
    assert sum(f.endswith(".png") for f in listing["files"]) == 60


def test_files_that_are_not_images_fail_the_listing_or_are_counted_and_left_out(dirty_tree, capfd):
    with pytest.raises(folder_source.FolderError, match=r"1 file\(s\) in .*train are not images.*notes.txt.*skip"):
        folder_source.list_split(f"{dirty_tree}/train")
    listing = folder_source.list_split(f"{dirty_tree}/train", on_corrupt_image="skip")
    assert listing["skipped"] == ["class_01/notes.txt"]  # the hidden file is not even counted
    assert len(listing["files"]) == 201  # the truncated JPEG is listed: it fails only when decoded
    assert "1 file(s)" in capfd.readouterr().err


def _tree(root, layout: dict) -> str:
    for path, content in layout.items():
        os.makedirs(os.path.dirname(f"{root}/{path}"), exist_ok=True)
        if content is not None:
            with open(f"{root}/{path}", "wb") as f:
                f.write(content)
    return str(root)


JPEG = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()


@pytest.mark.parametrize("layout, split, message", [
    ({}, "train", r"data.folder='.*/nowhere' does not exist"),
    ({"train/a/x.jpg": JPEG}, "training", r"No split folder 'training' in .* \(it holds \['train'\]\)"),
    ({"train/x.jpg": JPEG}, "train", r"has no class folders"),
    ({"train/a/x.jpg": JPEG, "train/b/": None}, "train", r"Class folder .*train/b holds no images"),
])
def test_a_bad_tree_gets_one_message_naming_the_problem(tmp_path, layout, split, message):
    root = _tree(tmp_path / "root", layout) if layout else str(tmp_path / "nowhere")
    with pytest.raises((folder_source.FolderError, types.DataNotFoundError), match=message):
        pipeline.make(_config(root, **{"data.train_split": split}))


def test_an_eval_split_with_a_class_the_train_split_lacks_is_refused_one_with_fewer_is_not(tmp_path):
    root = _tree(tmp_path, {"train/a/x.jpg": JPEG, "train/b/y.jpg": JPEG, "val/a/z.jpg": JPEG, "val/c/w.jpg": JPEG})
    with pytest.raises(folder_source.FolderError, match=r"class folders that the train split has not: \['c'\]"):
        pipeline.make(_config(root, batch_size=2))
    shutil.rmtree(f"{root}/val/c")
    source = pipeline.make(_config(root, batch_size=2))
    assert source.class_names == ["a", "b"] and next(source.eval_batches())["label"][0] == 0


# --------------------------------------------------------------------------------------------------
# Reading.

def test_processes_read_their_slices_of_the_same_global_batch(clean_tree):
    whole = pipeline.make(_config(clean_tree)).train_batches()
    halves = [pipeline.make(_config(clean_tree), p, 2).train_batches() for p in range(2)]
    for _ in range(3):
        batch, parts = next(whole), [next(h) for h in halves]
        np.testing.assert_array_equal(batch["image"], np.concatenate([p["image"] for p in parts]))
        np.testing.assert_array_equal(batch["label"], np.concatenate([p["label"] for p in parts]))
    assert batch["image"].shape == (32, 16, 16, 3)


def test_jpeg_and_png_eval_images_are_the_centre_crops_of_the_files(clean_tree):
    source = pipeline.make(_config(clean_tree))
    listing = folder_source.list_split(f"{clean_tree}/val", source.class_names)
    batch = next(source.eval_batches())
    assert batch["mask"].sum() == 32 and any(f.endswith(".png") for f in listing["files"][:32])
    for i in (0, 2):  # a JPEG and a PNG
        with open(f"{clean_tree}/val/{listing['files'][i]}", "rb") as f:
            want = crop.resize_and_centre_crop(f.read(), size=16, crop_ratio=1.0).numpy()
        np.testing.assert_array_equal(batch["image"][i], want)
        assert batch["label"][i] == listing["labels"][i]


def test_the_file_lists_are_kept_in_the_workdir_and_a_resume_reads_them_back(clean_tree, tmp_path, monkeypatch):
    root = str(tmp_path / "images")
    shutil.copytree(clean_tree, root)
    workdir = str(tmp_path / "run")
    first = pipeline.make(_config(root), workdir=workdir)
    assert json.loads(open(f"{workdir}/classes.json").read()) == first.class_names
    with gzip.open(f"{workdir}/file_lists/train.json.gz") as f:
        assert len(json.load(f)["files"]) == first.num_train_examples == 200
    shutil.copy(f"{root}/train/class_00/train_0000.JPEG", f"{root}/train/class_00/train_9999.JPEG")
    monkeypatch.setattr(folder_source, "list_split", lambda *a, **k: pytest.fail("listed again"))
    resumed = pipeline.make(_config(root), workdir=workdir, resuming=True)
    assert resumed.num_train_examples == 200  # the run's files, not the folder's new one
    monkeypatch.undo()
    assert pipeline.make(_config(root), workdir=workdir).num_train_examples == 201  # a fresh start lists again


def test_prepare_writes_the_tree_as_an_array_record_data_set_with_the_same_examples(clean_tree, tmp_path):
    data_dir = str(tmp_path / "tfds")
    said = prepare.prepare_folder(clean_tree, "my_images", data_dir)
    assert "10 classes; train 200, val 40 images" in said and "--config.data.name=my_images" in said
    folder = pipeline.make(_config(clean_tree))
    tfds_config = _config(clean_tree, **{"data.source": "tfds", "data.name": "my_images", "data.data_dir": data_dir})
    copy = tfds_source.TfdsSource(tfds_config)
    assert copy.class_names == folder.class_names and copy.num_train_examples == 200
    for a, b in zip([next(folder.train_batches()), next(folder.eval_batches())],
                    [next(copy.train_batches()), next(copy.eval_batches())]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_prepare_names_its_own_flag_for_files_that_are_not_images(dirty_tree, tmp_path):
    with pytest.raises(folder_source.FolderError, match=r"notes.txt\. .*set --on_corrupt_image=skip to leave"):
        prepare.prepare_folder(dirty_tree, "dirty_images", str(tmp_path))
    assert not os.path.exists(tmp_path / "dirty_images")


# --------------------------------------------------------------------------------------------------
# The user's story, through the trainer's command line.

def _snapshot(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)),
                   os.path.getmtime(os.path.join(d, f))) for d, _, files in os.walk(root) for f in files)


def test_a_folder_run_learns_survives_kill_9_bit_identically_and_writes_nothing_in_the_data(dirty_tree, tmp_path):
    overrides = {"data.source": "folder", "data.folder": dirty_tree, "data.eval_split": "val", "data.image_size": 16,
                 "data.mean": (0.5,) * 3, "data.std": (0.5,) * 3, "data.augment": "crop_flip",
                 "data.on_corrupt_image": "skip", "data.extra_evals": (f"folder:{dirty_tree}/val",),
                 "model.variant": "mu/8", "ema.decay": 0.9, "batch_size": 32, "eval_batch_size": 32,
                 "total_steps": 30, "checkpoint_every_steps": 5, "log_every_steps": 1, "eval_every_steps": 0,
                 "optim.lr": 2e-3}
    before = _snapshot(dirty_tree)
    reference = str(tmp_path / "reference")
    summary = train.run(digits_file_config("/unused", overrides), reference)
    assert summary["step"] == 30 and summary["eval_examples"] == 40 and summary["val/eval_examples"] == 40
    assert summary["val/top1"] == summary["top1"] and 0 <= summary["ema/top1"] <= 1
    losses = [r["train/loss_main"] for r in summary["history"] if "train/loss_main" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses  # it learns the tinted classes
    assert {"eval/top1", "eval/val/top1", "eval/ema/top1", "eval/ema/val/top1"} <= {
        k for r in summary["history"] for k in r}

    workdir = str(tmp_path / "run")
    command = [*digits_main_command(workdir, "/unused", {}), *(f"--config.{k}={v}" for k, v in overrides.items())]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    wait_for_step(proc, 8)  # killed well before the end, once the step-5 checkpoint is on disk
    deadline = time.monotonic() + 60
    while not checkpoint.manager(workdir, read_only=True).all_steps() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "Resuming from the checkpoint of step" in done.stdout, done.stdout[-3000:]
    for ema in (False, True):
        want, got = checkpoint.load_variables(reference, ema=ema), checkpoint.load_variables(workdir, ema=ema)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    assert json.loads(open(f"{workdir}/classes.json").read()) == [f"class_{k:02d}" for k in range(10)]
    assert _snapshot(dirty_tree) == before  # nothing in the data folder was written

    convert.main(["--to_timm", "--ema", f"--from={workdir}", f"--to={tmp_path / 'ema.npz'}"])
    with np.load(tmp_path / "ema.npz") as exported:
        np.testing.assert_array_equal(exported["head.weight"],
                                      checkpoint.load_variables(workdir, ema=True)["params"]["head"]["kernel"].T)


# --------------------------------------------------------------------------------------------------
# Formats torchvision's ImageFolder reads besides JPEG and PNG, and the mistakes that get their own message.

def _encoded(image, fmt: str, **options) -> bytes:
    import io
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _webp_and_bmp_files(seed: int) -> dict:
    """An RGB and an RGBA WebP, a 24-bit and an 8-bit gray BMP, as PIL writes them."""
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    return {"a/rgb.webp": _encoded(Image.fromarray(pixels[..., :3]), "WEBP", lossless=True),
            "a/rgba.webp": _encoded(Image.fromarray(pixels), "WEBP", quality=80),
            "b/gray.bmp": _encoded(Image.fromarray(pixels[..., 0]), "BMP"),
            "b/rgb.bmp": _encoded(Image.fromarray(pixels[..., :3]), "BMP")}


def test_webp_and_bmp_images_are_read_as_pil_reads_them_and_prepare_takes_them(tmp_path):
    import io

    from PIL import Image
    val = _webp_and_bmp_files(1)
    root = _tree(tmp_path / "root", {**{f"train/{k}": v for k, v in _webp_and_bmp_files(0).items()},
                                     **{f"val/{k}": v for k, v in val.items()}})
    source = pipeline.make(_config(root, batch_size=4))
    batch, d = next(source.eval_batches()), source.config.data
    assert batch["mask"].sum() == 4 and list(batch["label"][:4]) == [0, 0, 1, 1]
    for i, name in enumerate(sorted(val)):  # the listing's order
        rgb = np.asarray(Image.open(io.BytesIO(val[name])).convert("RGB"))
        want = crop.resize_and_centre_crop(tf.io.encode_png(rgb), size=d.image_size, crop_ratio=d.crop_ratio)
        np.testing.assert_array_equal(batch["image"][i], want.numpy(), err_msg=name)
    assert "train 4, val 4 images" in prepare.prepare_folder(root, "webp_bmp", str(tmp_path / "tfds"))


def test_a_bmp_with_a_colour_palette_is_refused_naming_it_and_the_conversion(tmp_path):
    """TensorFlow would read its palette indices as gray levels: wrong pixels, silently."""
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    palette = _encoded(Image.fromarray(pixels).convert("P"), "BMP")
    root = _tree(tmp_path / "root", {"train/a/x.jpg": JPEG, "train/a/palette.bmp": palette, "train/b/y.jpg": JPEG,
                                     "val/a/palette.bmp": palette, "val/b/y.jpg": JPEG})
    with pytest.raises(folder_source.FolderError, match=r"1 image\(s\) in .*/train cannot be decoded: "
                                                        r".*/train/a/palette.bmp. .*colour palette.*PNG"):
        prepare.prepare_folder(root, "palette", str(tmp_path / "tfds"))
    source = pipeline.make(_config(root, batch_size=2))
    with pytest.raises(types.CorruptImageError, match=r"val/a/palette.bmp\. .*colour palette.*PNG"):
        next(source.eval_batches())


def _one_error_line(command: list[str]) -> str:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_a_split_folder_as_the_tree_and_a_tfds_slice_as_a_split_get_their_own_messages(clean_tree, tmp_path):
    common = {"data.source": "folder", "data.eval_split": "val", "data.image_size": 16, "data.mean": (0.5,) * 3,
              "data.std": (0.5,) * 3, "model.variant": "mu/8"}
    split_folder = digits_main_command(str(tmp_path / "a"), "/unused", {**common, "data.folder": f"{clean_tree}/train"})
    assert (f"{clean_tree}/train looks like a split folder: its sub-folders (class_00, class_01, ...) hold images, "
            f"so they are class folders. Set --config.data.folder={clean_tree}, ") in _one_error_line(split_folder)
    line = _one_error_line(digits_main_command(str(tmp_path / "b"), "/unused", {
        **common, "data.folder": clean_tree, "data.train_split": "train[:90%]"}))
    assert "data.train_split='train[:90%]' is a TFDS slice; the folder source reads whole split folders" in line
    assert "['train', 'val']" in line and "heldout" in line and "masksub_jax.data.prepare --folder" in line
    with pytest.raises(folder_source.FolderError, match=rf"train looks like a split folder: .* --folder={clean_tree},"):
        prepare.prepare_folder(f"{clean_tree}/train", "x", str(tmp_path))
