"""Prepares a TFDS data set in the array_record format, which the trainer reads by example index.

  python -m masksub_jax.data.prepare --name=imagenet2012 --data_dir=DIR

Not prepared yet: TFDS builds it straight into array_record (ImageNet: put ILSVRC2012_img_train.tar
and ILSVRC2012_img_val.tar in DIR/downloads/manual first). Already prepared as tfrecord (as
`tfds build` writes by default): an array_record copy of each shard is written next to it, in
parallel, without a download. TFDS's converter imports Apache Beam, so that case needs
`pip install apache-beam` first.
"""
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


def main(argv):
    del argv
    f = flags.FLAGS
    print(prepare(f.name, f.data_dir, f.num_workers))


if __name__ == "__main__":  # flags only here: importing this module must not define them
    flags.DEFINE_string("name", None, "TFDS data set name, e.g. imagenet2012.", required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS's, ~/tensorflow_datasets).")
    flags.DEFINE_integer("num_workers", 8, "Shards converted in parallel.")
    app.run(main)
