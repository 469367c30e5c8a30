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
re-encoding); TFDS's own builder (`store_as_tfds_dataset`) writes it and shows its progress. Train
on it with --config.data.source=tfds --config.data.name=NAME --config.data.data_dir=DIR: the same
examples under the same indices as --config.data.source=folder, read faster from a network disk.
"""
import functools

from absl import app, flags


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
        raise SystemExit(f"Converting {builder.data_dir} needs TFDS's converter, which failed to import ({e}). "
                         "Run `pip install apache-beam` and try again.") from None
    convert_format_utils.convert_dataset(out_dir=None, out_file_format=array_record,
                                         dataset_version_dir=str(builder.data_dir), num_workers=num_workers)
    return (f"Wrote an array_record copy of {name} next to its {builder.info.file_format.value} files in "
            f"{builder.data_dir}.")


def prepare_folder(folder: str, name: str, data_dir: str | None, on_corrupt_image: str = "fail") -> str:
    """Writes the image-folder tree `folder` as TFDS data set `name` (array_record) in `data_dir`."""
    import tensorflow_datasets as tfds

    from masksub_jax.data import folder_source
    root = folder.rstrip("/")
    splits = folder_source.split_names(root)
    first = "train" if "train" in splits else splits[0]
    list_split = functools.partial(folder_source.list_split, on_corrupt_image=on_corrupt_image,
                                   skip_flag="--on_corrupt_image=skip")
    listings = {first: list_split(f"{root}/{first}")}
    classes = listings[first]["classes"]
    for split in splits:
        if split != first:
            listings[split] = list_split(f"{root}/{split}", classes)

    def examples(listing):
        for file, label in zip(listing["files"], listing["labels"]):
            yield file, {"image": f"{listing['split_dir']}/{file}", "label": label, "file_name": file}
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),  # the files' bytes, JPEG or PNG, as they are
        "label": tfds.features.ClassLabel(names=classes), "file_name": tfds.features.Text()})
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", features=features, data_dir=data_dir, file_format="array_record",
        split_datasets={split: examples(listing) for split, listing in listings.items()}, disable_shuffling=True,
        description=f"The image-folder tree {root} ({len(classes)} classes), by masksub_jax.data.prepare.")
    counts = ", ".join(f"{split} {len(listing['files'])}" for split, listing in listings.items())
    return (f"Wrote {root} as TFDS data set {name} ({len(classes)} classes; {counts} images) in "
            f"{builder.data_dir}. Train on it with --config.data.source=tfds --config.data.name={name}"
            + (f" --config.data.data_dir={data_dir}" if data_dir else "") + ".")


def main(argv):
    del argv
    f = flags.FLAGS
    if f.folder:
        from masksub_jax.data import folder_source, pipeline
        try:
            print(prepare_folder(f.folder, f.name, f.data_dir, f.on_corrupt_image))
        except (folder_source.FolderError, pipeline.DataNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
    else:
        print(prepare(f.name, f.data_dir, f.num_workers))


if __name__ == "__main__":  # flags only here: importing this module must not define them
    flags.DEFINE_string("name", None, "TFDS data set name, e.g. imagenet2012 (with --folder: the new set's name).",
                        required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS's, ~/tensorflow_datasets).")
    flags.DEFINE_integer("num_workers", 8, "Shards converted in parallel.")
    flags.DEFINE_string("folder", None, "An image-folder tree ROOT/<split>/<class>/* to write as TFDS data set NAME.")
    flags.DEFINE_enum("on_corrupt_image", "fail", ["fail", "skip"], "With --folder: files that are not images "
                      "stop it naming them (fail), or are left out and counted (skip).")
    app.run(main)
