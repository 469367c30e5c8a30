"""Your own images as an image-folder tree, the layout the official PyTorch code reads ImageNet in:

    ROOT/train/<class>/*.JPEG     ROOT/val/<class>/*.png     (data.folder=ROOT, data.train_split=train,
                                                              data.eval_split=val)

Class index = position of the class folder's name in the sorted names of the train split's class
folders; an eval split may have fewer classes, not others. Files are images by their name (.jpg,
.jpeg, .png, .webp, .bmp in any case: what torchvision's ImageFolder reads, less formats that
TensorFlow cannot decode), in the class folder or below it; hidden files are ignored and any other
file is not an image: an error naming it (data.on_corrupt_image="fail") or left out and counted
("skip"). An image file that does not decode is handled as in a TFDS data set; so is a BMP that
TensorFlow would read wrong (a colour palette: it takes the indices for gray levels) or not at all
(under 8 bits per pixel), and an animated WebP: those read once converted to PNG.

Listing a large tree on a network file system takes minutes, so a training run lists each split
once and keeps the list in its workdir (`WORKDIR/file_lists/`, with `WORKDIR/classes.json`, the
class map): a resume, an evaluation or an export of the run uses exactly those files and classes,
even if the folder has changed since. Examples are read by their index in the list, as a TFDS data
set's (`indexed.py`: the order, repeated augmentation, per-process slices, exact resume). Nothing in
the data folder is ever written.
"""
import gzip
import json
import os
import sys

import numpy as np
import tensorflow as tf

from masksub_jax import workdir as workdir_lib
from masksub_jax.data import crop, indexed
from masksub_jax.data.types import DataNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CONVERSION = ("a BMP with a colour palette or under 8 bits per pixel, or an animated WebP, decodes only once "
              "converted to PNG, e.g. `mogrify -format png FILE`")
LISTS = "file_lists"  # in the workdir
CLASSES = "classes.json"  # in the workdir: the class names, index = position
BMP_MAGIC = b"BM"


class FolderError(ValueError):
    """The image-folder tree is not laid out as a split folder of class folders of images."""


# --------------------------------------------------------------------------------------------------
# Listing.

def _scan(path: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of `path`, unsorted; local paths through os.scandir (no stat
    per file), others (gs://) through tf.io.gfile."""
    if "://" not in path:
        dirs, files = [], []
        with os.scandir(path) as entries:
            for entry in entries:
                (dirs if entry.is_dir() else files).append(entry.name)
        return dirs, files
    names = tf.io.gfile.listdir(path)
    return [n.rstrip("/") for n in names if n.endswith("/")], [n for n in names if not n.endswith("/")]


def _isdir(path: str) -> bool:
    return os.path.isdir(path) if "://" not in path else tf.io.gfile.isdir(path)


def _images_below(folder: str, prefix: str, images: list[str], others: list[str]) -> None:
    """Appends the relative paths (under `prefix`) of the images in `folder` and its sub-folders to
    `images` and of the other files to `others`, in sorted order."""
    dirs, files = _scan(folder)
    entries = sorted([(name, False) for name in files] + [(name, True) for name in dirs])
    for name, is_dir in entries:
        if name.startswith("."):
            continue
        relative = f"{prefix}/{name}"
        if is_dir:
            _images_below(f"{folder}/{name}", relative, images, others)
        elif name.lower().endswith(IMAGE_EXTENSIONS):
            images.append(relative)
        else:
            others.append(relative)


def split_names(root: str) -> list[str]:
    """The split folders of an image-folder tree, sorted."""
    if not _isdir(root):
        raise DataNotFoundError(f"data.folder={root!r} does not exist (or is not a folder). Point "
                                "--config.data.folder (prepare: --folder) at the folder that holds one sub-folder "
                                "per split (e.g. train/ and val/), each with one sub-folder of images per class.")
    splits = sorted(d for d in _scan(root)[0] if not d.startswith("."))
    if not splits:
        raise FolderError(f"{root} holds no split folders (e.g. train/ and val/, each with a sub-folder per class).")
    return splits


def refuse_a_split_folder(root: str, flag: str) -> None:
    """Raises when `root` is itself a split folder (its first sub-folders hold images: they are class
    folders), as data.folder=ROOT/train is; `flag` names where to set ROOT."""
    if not _isdir(root):
        return
    sub_folders = sorted(d for d in _scan(root)[0] if not d.startswith("."))[:2]
    if sub_folders and all(any(f.lower().endswith(IMAGE_EXTENSIONS) for f in _scan(f"{root}/{d}")[1])
                           for d in sub_folders):
        parent = root.rstrip("/").rpartition("/")[0] or "."
        raise FolderError(f"{root} looks like a split folder: its sub-folders ({', '.join(sub_folders)}, ...) hold "
                          f"images, so they are class folders. Set {flag}={parent}, the folder that holds the split "
                          "folders (e.g. train/ and val/), each with a sub-folder of images per class.")


def refuse_slices(config) -> None:
    """A TFDS slice ("train[:90%]") as a split of the folder source gets a message of its own."""
    d = config.data
    for key in ("train_split", "eval_split"):
        split = getattr(d, key)
        if "[" in split or "+" in split:
            raise FolderError(
                f"data.{key}={split!r} is a TFDS slice; the folder source reads whole split folders, by their names "
                f"(in {d.folder}: {split_names(d.folder.rstrip('/'))}). For a held-out set, put its images in a split "
                f"folder of their own ({d.folder}/heldout/<class>/*) and set --config.data.{key}=heldout, or write "
                "the tree as a TFDS data set (`python -m masksub_jax.data.prepare --folder=ROOT --name=NAME "
                "--data_dir=DIR`) and train with --config.data.source=tfds --config.data.name=NAME, where slices "
                "work (e.g. --config.data.train_split='train[:90%]' --config.data.eval_split='train[90%:]').")


def list_split(split_dir: str, classes: list[str] | None = None, *, on_corrupt_image: str = "fail",
               skip_flag: str = "--config.data.on_corrupt_image=skip") -> dict:
    """{"split_dir", "classes", "files", "labels", "skipped"}: every image of a split folder, sorted,
    `files` relative to it. `classes`: the train split's (an eval split's must be among them);
    None: this split's class folders, sorted. `skip_flag`: what the error says to leave non-images out."""
    if not _isdir(split_dir):
        root, _, split = split_dir.rstrip("/").rpartition("/")
        refuse_a_split_folder(root, "--config.data.folder")
        raise DataNotFoundError(f"No split folder {split!r} in {root} (it holds {split_names(root)}). Set "
                                "--config.data.train_split / --config.data.eval_split to one of them.")
    dirs, loose = _scan(split_dir)
    found = sorted(d for d in dirs if not d.startswith("."))
    if not found:
        raise FolderError(f"{split_dir} has no class folders: put each class's images in a sub-folder "
                          f"named after the class ({split_dir}/<class>/*.JPEG).")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise FolderError(f"{split_dir} has class folders that the train split has not: {unknown[:10]}"
                          f"{' ...' if len(unknown) > 10 else ''} ({len(unknown)}). An eval split's classes "
                          "must be the train split's (the class index is the position among the train "
                          "split's sorted class names).")
    index = {name: i for i, name in enumerate(classes)}
    files, labels, others = [], [], [name for name in loose if not name.startswith(".")]
    for name in found:
        before = len(files)
        _images_below(f"{split_dir}/{name}", name, files, others)
        if len(files) == before:
            raise FolderError(f"Class folder {split_dir}/{name} holds no images (files named "
                              f"{', '.join(IMAGE_EXTENSIONS)}). Remove it, or add its images.")
        labels += [index[name]] * (len(files) - before)
    if others:
        shown = ", ".join(f"{split_dir}/{o}" for o in others[:5]) + (" ..." if len(others) > 5 else "")
        if on_corrupt_image == "fail":
            raise FolderError(f"{len(others)} file(s) in {split_dir} are not images (by their name: "
                              f"{', '.join(IMAGE_EXTENSIONS)}): {shown}. Move them out of the data folder, or "
                              f"set {skip_flag} to leave them out.")
        print(f"WARNING: {len(others)} file(s) in {split_dir} are not images and are left out: {shown}",
              file=sys.stderr, flush=True)
    return {"split_dir": split_dir, "classes": list(classes), "files": files, "labels": labels,
            "skipped": others}


def file_list(split_dir: str, name: str, workdir: str | None, *, classes=None, on_corrupt_image="fail",
              reuse: bool = True, write: bool = True) -> dict:
    """`list_split`, kept in WORKDIR/file_lists/NAME.json.gz: read from there when `reuse` and it
    lists the same folder, else listed and (when `write`: process 0) written there, atomically."""
    cached = workdir_lib.path(workdir) / LISTS / f"{name}.json.gz" if workdir else None
    if cached is not None and reuse and cached.exists():
        listing = json.loads(gzip.decompress(cached.read_bytes()))
        if listing["split_dir"] == split_dir:
            return listing
    listing = list_split(split_dir, classes, on_corrupt_image=on_corrupt_image)
    if cached is not None and write:
        cached.parent.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_bytes(cached, gzip.compress(json.dumps(listing).encode(), compresslevel=1))
    return listing


# --------------------------------------------------------------------------------------------------
# Reading.

def split_of(listing: dict) -> indexed.Split:
    """The listed images as a Split: a record is (path, label); the file is read inside tf.data."""
    split_dir = listing["split_dir"]
    paths = tf.constant([f"{split_dir}/{f}" for f in listing["files"]])
    labels = tf.constant(np.asarray(listing["labels"], np.int32))

    def fetch(index):
        return tf.gather(paths, index), tf.gather(labels, index)

    check_bmp = any(f.lower().endswith(".bmp") for f in listing["files"])  # else JPEGs pay nothing for it
    converts = any(f.lower().endswith((".bmp", ".webp")) for f in listing["files"])

    def example(record):
        path, label = record
        return {"image": read_image_file(path) if check_bmp else tf.io.read_file(path), "label": label}

    def describe(index: np.ndarray) -> str:
        return ", ".join(f"{split_dir}/{listing['files'][i]}" for i in index)
    return indexed.Split(size=len(listing["files"]), fetch=fetch, example=example, describe=describe,
                         fix="Replace or remove those files" + (f" ({CONVERSION})" if converts else ""), is_jpeg=None)


def read_image_file(path):
    """The file's bytes; an error (the image counts as undecodable) for a BMP that TensorFlow would
    read wrong."""
    data = tf.io.read_file(path)
    check = tf.debugging.Assert(bmp_reads_right(data), [path, "is a BMP with a colour palette"])
    with tf.control_dependencies([check]):
        return tf.identity(data)


def bmp_reads_right(data) -> tf.Tensor:
    """False for an 8-bit BMP whose palette is not the gray levels in order: TensorFlow's BMP decoder
    takes the palette indices for gray levels (it refuses BMPs under 8 bits per pixel itself)."""
    def gray_palette():
        header_size = tf.io.decode_raw(tf.strings.substr(data, 14, 4), tf.int32)[0]
        used = tf.io.decode_raw(tf.strings.substr(data, 46, 4), tf.int32)[0]
        used = tf.where(used == 0, 256, used)
        palette = tf.io.decode_raw(tf.strings.substr(data, 14 + header_size, 4 * used), tf.uint8)
        palette = tf.reshape(palette, [-1, 4])[:, :3]
        levels = tf.cast(tf.range(tf.shape(palette)[0]), tf.uint8)
        return (tf.shape(palette)[0] == used) & tf.reduce_all(palette == levels[:, None])

    def bits_per_pixel():
        return tf.io.decode_raw(tf.strings.substr(data, 28, 2), tf.uint16)[0]
    is_bmp = tf.strings.substr(data, 0, 2) == BMP_MAGIC
    return tf.cond(is_bmp & (tf.strings.length(data) >= 54),
                   lambda: tf.cond(bits_per_pixel() == 8, gray_palette, lambda: tf.constant(True)),
                   lambda: tf.constant(True))


def undecodable(paths: list[str]) -> list[int]:
    """Indices of the files in `paths` that the trainer cannot read or decode, found by decoding
    them all, in parallel."""
    if not paths:
        return []
    files = tf.constant(paths)

    def decoded(i):
        return i, tf.shape(crop.decode(read_image_file(files[i])))
    ds = tf.data.Dataset.range(len(paths)).map(decoded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ok = np.zeros(len(paths), bool)
    for index, _ in ds.ignore_errors().batch(4096).as_numpy_iterator():
        ok[index] = True
    return np.flatnonzero(~ok).tolist()


def eval_split(split_dir: str, classes: list[str], workdir: str | None, *, on_corrupt_image: str, reuse: bool,
               write: bool) -> tuple[str, indexed.Split]:
    """(name, Split) of a split folder as an extra evaluation set of a model with `classes`; its list
    is kept in the workdir as extra_NAME, NAME the folder's name."""
    split_dir = split_dir.rstrip("/")
    name = split_dir.rpartition("/")[2]
    listing = file_list(split_dir, f"extra_{name}", workdir, classes=classes, on_corrupt_image=on_corrupt_image,
                        reuse=reuse, write=write)
    return name, split_of(listing)


def FolderSource(config, process_index: int = 0, process_count: int = 1, batch_multiple: int = 1,  # noqa: N802
                 workdir: str | None = None, resuming: bool = False, write_lists: bool = True):
    """The train and eval splits of the image-folder tree `config.data.folder`. With a workdir, the
    lists and the class map are kept there (by process 0, when `write_lists`); a resumed run
    (`resuming`) reads them back."""
    d = config.data
    root = d.folder.rstrip("/")
    refuse_slices(config)
    write = write_lists and process_index == 0
    common = dict(on_corrupt_image=d.on_corrupt_image, reuse=resuming, write=write)
    train = file_list(f"{root}/{d.train_split}", "train", workdir, **common)
    evaluation = file_list(f"{root}/{d.eval_split}", "eval", workdir, classes=train["classes"], **common)
    classes_file = workdir_lib.path(workdir) / CLASSES if workdir else None
    if classes_file is not None and write and not (resuming and classes_file.exists()):
        workdir_lib.write_text(classes_file, json.dumps(train["classes"]))
    return indexed.IndexedSource(config, split_of(train), split_of(evaluation), class_names=train["classes"],
                                 process_index=process_index, process_count=process_count,
                                 batch_multiple=batch_multiple)
