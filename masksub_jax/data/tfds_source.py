"""A TFDS image-classification data set read by example index (`indexed.py` says how and in which
order). Random access needs the data set in TFDS's array_record format; see `prepare_command`.

Besides the train and eval splits, any split of another TFDS data set can be an extra evaluation set
(`eval_split`): ImageNet-V2 (`imagenet_v2`, ImageNet's class indices) or ImageNet-ReaL
(`imagenet2012_real`, whose `real_label` sets become a multi-hot `label_set`).
"""
import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from masksub_jax.data import indexed
from masksub_jax.data.types import DataNotFoundError

REAL_LABELS = "real_label"  # imagenet2012_real's set of right answers per image (Beyer et al. 2020)


class DataFormatError(ValueError):
    """The data set is prepared, but not in a format that can be read by index."""


def prepare_command(name: str, data_dir: str | None) -> str:
    return f"python -m masksub_jax.data.prepare --name={name}" + (f" --data_dir={data_dir}" if data_dir else "")


def TfdsSource(config, process_index: int = 0, process_count: int = 1, batch_multiple: int = 1):  # noqa: N802
    """The train and eval splits of TFDS data set `config.data.name`."""
    d = config.data
    builder = _builder(d.name, d.data_dir)
    return indexed.IndexedSource(config, _split(builder, d.train_split, d.data_dir),
                                 _split(builder, d.eval_split, d.data_dir),
                                 class_names=builder.info.features["label"].names,
                                 process_index=process_index, process_count=process_count,
                                 batch_multiple=batch_multiple)


def eval_split(name: str, split: str, data_dir: str | None, num_classes: int) -> indexed.Split:
    """Split `split` of TFDS data set `name` as an extra evaluation set of a `num_classes`-way model."""
    builder = _builder(name, data_dir)
    readable = _split(builder, split, data_dir)
    theirs = _num_classes(builder)
    if theirs != num_classes:
        raise ValueError(f"Extra eval set {name}:{split} has {theirs} classes, the model {num_classes}; "
                         "an extra eval set must use the training data's class indices.")
    return readable


def _num_classes(builder) -> int:
    label = builder.info.features[REAL_LABELS if REAL_LABELS in builder.info.features else "label"]
    return (label.feature if isinstance(label, tfds.features.Sequence) else label).num_classes


def _builder(name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataNotFoundError(_not_found(name, data_dir, e)) from None


def _not_found(name: str, data_dir: str | None, error: Exception) -> str:
    """Why `name` was not found: a data_dir that does not exist, or one without it (what it holds)."""
    if not data_dir:
        return (f"{name!r} is not a TFDS data set ({error.__class__.__name__}); use a name from the TFDS "
                "catalogue, e.g. 'imagenet2012', or give data.data_dir, the folder that holds a prepared one.")
    from etils import epath
    folder = epath.Path(data_dir)
    if not folder.exists():
        return (f"data.data_dir={data_dir!r} does not exist; give the folder that holds the prepared data set "
                f"{name!r} (the --data_dir given to `python -m masksub_jax.data.prepare` or `tfds build`).")
    held = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    return (f"{name!r} is neither in data.data_dir={data_dir!r} (it holds {held or 'no data set'}) nor in the TFDS "
            f"catalogue; fix data.name or data.data_dir, or prepare it there (`python -m masksub_jax.data.prepare "
            f"--folder=ROOT --name={name} --data_dir={data_dir}` for an image folder).")


def _split(builder, split: str, data_dir: str | None) -> indexed.Split:
    features = builder.info.features
    records = _records(builder, split, data_dir)
    decoders = {"image": tfds.decode.SkipDecoding()}
    if REAL_LABELS in features:  # ReaL: the set of right answers as a multi-hot vector (may be empty)
        num_classes = _num_classes(builder)

        def example(record):
            e = features.deserialize_example(record, decoders=decoders)
            return {"image": e["image"],
                    "label_set": tf.reduce_any(tf.one_hot(e[REAL_LABELS], num_classes, on_value=True,
                                                          off_value=False), axis=0)}
        label = {"label_key": "label_set", "label_spec": tf.TensorSpec([num_classes], tf.bool)}
    else:
        def example(record):
            e = features.deserialize_example(record, decoders=decoders)
            return {"image": e["image"], "label": tf.cast(e["label"], tf.int32)}
        label = {}

    def fetch(index):
        data = tf.numpy_function(functools.partial(_read, records), [index], tf.string, stateful=False)
        return tf.reshape(data, [-1])

    def describe(index: np.ndarray) -> str:
        return f"example(s) {', '.join(map(str, index))} of split {split!r} of {_full_name(builder)!r}"
    return indexed.Split(size=len(records), fetch=fetch, example=example, describe=describe,
                         fix="(Indices in the data set's TFDS order.) Replace or remove those examples and prepare the "
                         "data set again",
                         is_jpeg=True if getattr(features["image"], "encoding_format", None) == "jpeg" else None,
                         **label)


def _full_name(builder) -> str:
    return f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name


def _read(records, index: np.ndarray) -> np.ndarray:
    out = np.empty(len(index), dtype=object)  # not a bytes array: numpy would strip trailing zero bytes
    out[:] = records.__getitems__(index.tolist()) if len(index) else []
    return out


def _records(builder, split: str, data_dir: str | None):
    """The split's serialized examples, by index (an array_record data source)."""
    array_record = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
    name = _full_name(builder)
    try:
        return builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
                                      file_format=array_record)
    except (NotImplementedError, ValueError, KeyError, FileNotFoundError, AssertionError) as e:
        cause = e
    if not builder.is_prepared():
        where = (f"data.data_dir={data_dir!r}" if data_dir else
                 "TFDS's default folder (data.data_dir unset: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
        then = "" if data_dir else ", then pass --config.data.data_dir=DIR"
        raise DataNotFoundError(
            f"TFDS data set {name!r} is not prepared in {where}. Prepare it once with "
            f"`{prepare_command(name, data_dir or 'DIR')}`" + (
                f" (ImageNet: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {data_dir or 'DIR'}"
                "/downloads/manual first)" if name.startswith("imagenet2012") else "") + f"{then}. "
            "To try a config without the data, train on generated images: --config.data.source=synthetic "
            "(README: Try it without ImageNet).")
    if array_record not in (builder.info.file_format, *builder.info.alternative_file_formats):
        raise DataFormatError(
            f"TFDS data set {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, which "
            "cannot be read by example index (needed for the deterministic order and exact resumption). Add "
            f"an array_record copy once: `{prepare_command(name, data_dir)}` (it converts the prepared "
            "files; no download).")
    raise DataNotFoundError(f"Cannot read split {split!r} of TFDS data set {name!r} ({cause}); its splits: "
                            f"{sorted(builder.info.splits)}. Set data.train_split / data.eval_split.")
