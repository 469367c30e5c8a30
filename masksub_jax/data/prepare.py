"""Prepares a data set in TFDS's array_record format, which the trainer reads by example index.

  python -m masksub_jax.data.prepare --name=imagenet2012 --data_dir=DIR
  python -m masksub_jax.data.prepare --folder=/data/imagenet --name=imagenet_folder --data_dir=DIR

A TFDS data set not prepared yet: TFDS builds it straight into array_record (ImageNet: put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in DIR/downloads/manual first). Already prepared
as tfrecord (as `tfds build` writes by default): an array_record copy of each shard is written next
to it, in parallel, without a download. TFDS's converter imports Apache Beam, so that case needs
`pip install apache-beam` first.

An image-folder tree (`--folder=ROOT`, ROOT/<split>/<class>/*.JPEG, see data/folder_source.py):
every split folder becomes a split of TFDS data set NAME, with the class map of the "train" split,
the examples in the order the folder source lists them and the image files' bytes as they are (no
re-encoding; TFDS's Image feature stores any format that TensorFlow decodes). NAME must be a name
that TFDS loads (lower snake_case, e.g. imagenet_folder); another is refused before any work. Every
image is first decoded as the trainer decodes it, in parallel: one that does not decode stops it,
naming it (--on_corrupt_image=fail), or is left out and counted (skip; the indices after it then
differ from the folder source's). TFDS's own builder (`store_as_tfds_dataset`) writes it, its
messages, warnings and progress bars kept off the console, into a staging folder in DIR that
replaces NAME/VERSION only once complete (--overwrite; without it an existing NAME/VERSION is an
error). It prints the training command, data flags included.
"""
from masksub_jax import cli  # noqa: I001  (first: it quiets TensorFlow's C++ logging before TF loads)

import contextlib
import io
import os
import re
import shlex
import shutil
import sys
import time

from absl import app, flags

VERSION = "1.0.0"  # of a data set written from an image folder
EVAL_SPLITS = ("validation", "val", "test")  # the eval split of a tree, by preference


def prepare(name: str, data_dir: str | None, num_workers: int = 8) -> str:
    """Makes `name` readable by index in `data_dir`; returns what it did."""
    import tensorflow_datasets as tfds
    array_record = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        tfds.builder(name, data_dir=data_dir, file_format=array_record).download_and_prepare()
        return f"Prepared {name} in array_record format in {builder.data_dir}."
    if array_record in (builder.info.file_format, *builder.info.alternative_file_formats):
        return f"{name} in {builder.data_dir} is already readable by index (array_record). Nothing to do."
    try:
        from tensorflow_datasets.scripts.cli import convert_format_utils
    except ImportError as e:
        raise cli.CommandError(f"Converting {builder.data_dir} needs TFDS's converter, which failed to import ({e}). "
                               "Run `pip install apache-beam` and try again.") from None
    convert_format_utils.convert_dataset(out_dir=None, out_file_format=array_record,
                                         dataset_version_dir=str(builder.data_dir), num_workers=num_workers)
    return (f"Wrote an array_record copy of {name} next to its {builder.info.file_format.value} files in "
            f"{builder.data_dir}.")


# --------------------------------------------------------------------------------------------------
# An image-folder tree.

def prepare_folder(folder: str, name: str, data_dir: str | None, on_corrupt_image: str = "fail",
                   overwrite: bool = False) -> str:
    """Writes the image-folder tree `folder` as TFDS data set `name` (array_record) in `data_dir`,
    its images checked first; returns what it did and the command that trains on it."""
    check_name(name)
    root = folder.rstrip("/")
    data_dir = os.path.abspath(data_dir) if data_dir and "://" not in data_dir else data_dir
    target = version_dir(name, data_dir)
    if _exists(target) and not overwrite:
        raise cli.CommandError(f"Data set {name} is already prepared in {target}. Pass --overwrite to replace it (the "
                               "old one is kept until the new one is complete), delete that folder, or pick another "
                               "--name.")
    listings = list_tree(root, on_corrupt_image)
    print(f"Decoding the {sum(len(listing['files']) for listing in listings.values())} images of {root} ...",
          flush=True)
    started = time.monotonic()
    left_out = sum(check_images(listing, on_corrupt_image) for listing in listings.values())
    checked = time.monotonic() - started
    print(f"Writing them as TFDS data set {name} ...", flush=True)
    _write(root, name, data_dir, listings, replace=_exists(target))
    classes = next(iter(listings.values()))["classes"]
    counts = ", ".join(f"{split} {len(listing['files'])}" for split, listing in listings.items())
    skipped = f" {left_out} image(s) that do not decode were left out." if left_out else ""
    return (f"Wrote {root} as TFDS data set {name} ({len(classes)} classes; {counts} images; every image decoded in "
            f"{checked:.1f} s) in {target}.{skipped}\nTrain on it:\n  {train_command(name, data_dir, list(listings))}")


def check_name(name: str) -> None:
    """Refuses a data-set name that TFDS would not load back (`tfds.builder(name)`): by TFDS's own
    parser, a plain name (no /config, :version or namespace) that it reads as itself, lower snake_case."""
    from tensorflow_datasets.core import naming
    try:
        dataset, kwargs = naming.parse_builder_name_kwargs(name)
        valid = not kwargs and dataset.namespace is None and dataset.name == name
    except ValueError:
        valid = False
    if not valid:
        suggestion = re.sub(r"[^0-9a-z]+", "_", naming.camelcase_to_snakecase(name).lower()).strip("_")
        suggestion = suggestion if suggestion[:1].isalpha() else f"images_{suggestion}".rstrip("_")
        raise cli.CommandError(f"--name={name} is not a data-set name that TFDS loads: use lower snake_case, a letter "
                               f"then letters, digits and underscores, e.g. --name={suggestion}.")


def version_dir(name: str, data_dir: str | None) -> str:
    """Where TFDS keeps version VERSION of data set `name`."""
    if data_dir is None:
        import tensorflow_datasets as tfds
        data_dir = tfds.core.constants.DATA_DIR
    return os.path.join(data_dir, name, VERSION)


def _exists(path: str) -> bool:
    """Local paths without importing TensorFlow (a rerun's error comes at once)."""
    if "://" not in path:
        return os.path.exists(path)
    import tensorflow as tf
    return tf.io.gfile.exists(path)


def list_tree(root: str, on_corrupt_image: str) -> dict:
    """{split: folder_source listing} of every split folder, the train split ("train", else the
    first) first: its classes are every split's."""
    from masksub_jax.data import folder_source
    splits = folder_source.split_names(root)
    if "train" not in splits:
        folder_source.refuse_a_split_folder(root, "--folder")
    first = "train" if "train" in splits else splits[0]
    listings = {}
    for split in [first, *(s for s in splits if s != first)]:
        listings[split] = folder_source.list_split(f"{root}/{split}", listings[first]["classes"] if listings else None,
                                                   on_corrupt_image=on_corrupt_image,
                                                   skip_flag="--on_corrupt_image=skip")
    return listings


def check_images(listing: dict, on_corrupt_image: str) -> int:
    """Decodes every image of a split as the trainer does; one that does not decode fails (naming up
    to 5 and the count) or is removed from `listing` (skip). Returns how many were removed."""
    from masksub_jax.data import folder_source
    split_dir = listing["split_dir"]
    bad = folder_source.undecodable([f"{split_dir}/{f}" for f in listing["files"]])
    if not bad:
        return 0
    paths = [f"{split_dir}/{listing['files'][i]}" for i in bad]
    shown = ", ".join(paths[:5]) + (" ..." if len(paths) > 5 else "")
    note = f" ({folder_source.CONVERSION})" if any(p.lower().endswith((".bmp", ".webp")) for p in paths) else ""
    if on_corrupt_image == "fail":
        raise folder_source.FolderError(f"{len(bad)} image(s) in {split_dir} cannot be decoded: {shown}. Replace or "
                                        f"remove them{note}, or pass --on_corrupt_image=skip to leave them out.")
    print(f"WARNING: {len(bad)} image(s) in {split_dir} cannot be decoded and are left out: {shown}{note}",
          file=sys.stderr, flush=True)
    keep = sorted(set(range(len(listing["files"]))) - set(bad))
    listing["files"] = [listing["files"][i] for i in keep]
    listing["labels"] = [listing["labels"][i] for i in keep]
    return len(bad)


def _write(root: str, name: str, data_dir: str | None, listings: dict, *, replace: bool) -> None:
    """Writes the data set into a staging data dir next to NAME, then moves it into place (replacing
    the old version only then): a failed run leaves the old data set as it was. On a bucket, where
    folders cannot be renamed, the old version is deleted and the new one written in its place (the
    images are all checked by then)."""
    import tensorflow as tf
    target = version_dir(name, data_dir)
    if "://" in target:
        if replace:
            tf.io.gfile.rmtree(target)
        _store(root, name, data_dir, listings)
        return
    staging = os.path.join(os.path.dirname(os.path.dirname(target)), f".{name}.incomplete-{os.getpid()}")
    try:
        _store(root, name, staging, listings)
        old = f"{staging}/replaced"
        if replace:
            os.rename(target, old)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.rename(version_dir(name, staging), target)
        except OSError:
            if replace:
                os.rename(old, target)
            raise
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


@contextlib.contextmanager
def _quiet_tfds():
    """Keeps what TFDS's builder says off the console: its `Downloading and preparing ...` and
    `Dataset ... downloaded and prepared to STAGING` (printed to stdout), its absl warnings (`Variant
    folder ... has no dataset_info.json`) and its tqdm progress bars (left disabled in this process).
    Its errors still show."""
    import tensorflow_datasets as tfds
    from absl import logging
    tfds.disable_progress_bar()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.set_verbosity(verbosity)


def _store(root: str, name: str, data_dir: str, listings: dict) -> None:
    """TFDS's own builder writes the listed images (their files' bytes) as NAME/VERSION in `data_dir`."""
    import tensorflow_datasets as tfds
    classes = next(iter(listings.values()))["classes"]

    def examples(listing):
        for file, label in zip(listing["files"], listing["labels"]):
            yield file, {"image": f"{listing['split_dir']}/{file}", "label": label, "file_name": file}
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),  # the files' bytes as they are
        "label": tfds.features.ClassLabel(names=classes), "file_name": tfds.features.Text()})
    with _quiet_tfds():
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name, version=VERSION, features=features, data_dir=data_dir, file_format="array_record",
            split_datasets={split: examples(listing) for split, listing in listings.items()}, disable_shuffling=True,
            description=f"The image-folder tree {root} ({len(classes)} classes), by masksub_jax.data.prepare.")


def train_command(name: str, data_dir: str | None, splits: list[str]) -> str:
    """The trainer's command line for a prepared tree (`splits`: the train split first): its data
    flags, with the splits where they are not the config's defaults."""
    from masksub_jax import config as config_lib
    default = config_lib.base().data
    train_split, others = splits[0], splits[1:]
    eval_split = next((s for s in EVAL_SPLITS if s in others), others[0] if others else train_split)
    data = {"source": "tfds", "name": name, "data_dir": data_dir,
            "train_split": train_split if train_split != default.train_split else None,
            "eval_split": eval_split if eval_split != default.eval_split else None}
    return shlex.join(["python", "-m", "masksub_jax.main", "--config=vit_b", f"--workdir=runs/{name}",
                       *(f"--config.data.{key}={value}" for key, value in data.items() if value is not None)])


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.errors_in_one_line(None):
        if f.folder:
            print(prepare_folder(f.folder, f.name, f.data_dir, f.on_corrupt_image, f.overwrite))
        else:
            print(prepare(f.name, f.data_dir, f.num_workers))


if __name__ == "__main__":  # flags only here: importing this module must not define them
    flags.DEFINE_string("name", None, "TFDS data set name, e.g. imagenet2012 (with --folder: the new set's name).",
                        required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS's, ~/tensorflow_datasets).")
    flags.DEFINE_integer("num_workers", 8, "Shards converted in parallel.")
    flags.DEFINE_string("folder", None, "An image-folder tree ROOT/<split>/<class>/* to write as TFDS data set NAME.")
    flags.DEFINE_enum("on_corrupt_image", "fail", ["fail", "skip"], "With --folder: files that are not images, or "
                      "images that do not decode, stop it naming them (fail), or are left out and counted (skip).")
    flags.DEFINE_bool("overwrite", False, "With --folder: replace an existing NAME/VERSION in DATA_DIR (only once the "
                      "new one is written completely).")
    app.run(main, flags_parser=cli.parse_flags)
