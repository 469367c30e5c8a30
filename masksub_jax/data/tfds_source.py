"""A TFDS image-classification data set streamed with tf.data, each process reading its own shard.

An image that cannot be decoded stops the run naming its TFDS id (config.data.on_corrupt_image =
"fail"), or is left out with a warning naming it ("skip").
"""
import math
import sys
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from masksub_jax.data.pipeline import Batch, CorruptImageError, DataNotFoundError, pad

tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX


def random_resized_crop(image_bytes, seed, *, size: int, is_jpeg: bool):
    """Crop of 8-100% of the area with aspect ratio 3/4-4/3, resized to size x size (bicubic).
    JPEGs are decoded only inside the crop window."""
    shape = tf.image.extract_jpeg_shape(image_bytes) if is_jpeg else tf.shape(_decode(image_bytes))
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop_size)
    if is_jpeg:
        image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
    else:
        image = _decode(image_bytes)[y:y + h, x:x + w]
    return _to_uint8(tf.image.resize(image, (size, size), method="bicubic"))


def resize_and_centre_crop(image_bytes, *, size: int, crop_ratio: float):
    image = _decode(image_bytes)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / crop_ratio) / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, method="bicubic")
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    return _to_uint8(image[top:top + size, left:left + size])


def _decode(image_bytes):
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


class TfdsSource:
    """Train: shuffled, repeated, augmented batches. Eval: the whole split once, padded."""

    def __init__(self, config, process_index: int = 0, process_count: int = 1):
        d = config.data
        try:
            self.builder = tfds.builder(d.name, data_dir=d.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise DataNotFoundError(f"data.name={d.name!r} is not a TFDS data set ({e.__class__.__name__}); "
                                    "use a name from the TFDS catalogue, e.g. 'imagenet2012'.") from None
        self.config, self.process_index, self.process_count = config, process_index, process_count
        self.num_classes = self.builder.info.features["label"].num_classes
        self.image_shape = (d.image_size, d.image_size, 3)
        self.is_jpeg = getattr(self.builder.info.features["image"], "encoding_format", None) == "jpeg"
        split = self.builder.info.splits.get(d.train_split)
        self.num_train_examples = split.num_examples if split else None
        split = self.builder.info.splits.get(d.eval_split)
        self.num_eval_examples = split.num_examples if split else None
        self._dataset(d.train_split, shuffle_seed=None)  # a missing data set fails here, before compiling

    def _dataset(self, split: str, shuffle_seed: int | None):
        shard = tfds.even_splits(split, n=self.process_count, drop_remainder=False)[self.process_index]
        try:
            return self.builder.as_dataset(
                split=shard, shuffle_files=shuffle_seed is not None,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, add_tfds_id=True))
        except AssertionError as e:  # TFDS's "could not find data"
            d = self.config.data
            raise DataNotFoundError(
                f"TFDS data set {d.name!r} is not prepared in data.data_dir={d.data_dir!r} ({e}). "
                f"Prepare it once with `tfds build {d.name} --data_dir=DIR` (ImageNet: put "
                "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in DIR/downloads/manual first), "
                "then pass --config.data.data_dir=DIR.") from None

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        c = self.config
        seed = c.seed * 1_000_003 + start_step
        size = c.data.image_size

        def preprocess(index, example):
            crop_seed = tf.stack([tf.cast(seed, tf.int64), index])
            image = random_resized_crop(example["image"], crop_seed, size=size, is_jpeg=self.is_jpeg)
            image = tf.image.stateless_random_flip_left_right(image, crop_seed + 1)
            return {"image": image, "label": tf.cast(example["label"], tf.int32)}

        ds = self._dataset(c.data.train_split, shuffle_seed=seed).repeat()
        ds = ds.shuffle(c.data.shuffle_buffer, seed=seed).enumerate()
        ds = self._map_checked(ds, preprocess)
        ds = ds.batch(c.batch_size // self.process_count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        return _reporting_corrupt_images(tfds.as_numpy(ds))

    def _map_checked(self, ds, preprocess):
        """`preprocess` on every element; an example whose image fails it is reported by its id.

        tf.data cannot catch an error per element, so each element becomes a one-element data set
        whose failure is ignored and replaced by a placeholder marked not ok.
        """
        placeholder = {"image": tf.zeros(self.image_shape, tf.uint8), "label": tf.constant(-1, tf.int32)}

        def one(*element):
            tfds_id = element[-1]["tfds_id"]
            done = tf.data.Dataset.from_tensors(element).map(preprocess).ignore_errors()
            failed = tf.data.Dataset.from_tensors(placeholder)
            return done.concatenate(failed).take(1).map(lambda out: {**out, "tfds_id": tfds_id})

        ds = ds.interleave(one, cycle_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if self.config.data.on_corrupt_image == "fail":
            def check(out):
                ok = tf.debugging.Assert(out["label"] >= 0, [_CORRUPT, out["tfds_id"]])
                with tf.control_dependencies([ok]):
                    return {k: tf.identity(v) for k, v in out.items() if k != "tfds_id"}
            return ds.map(check)

        def report(out):
            tf.cond(out["label"] >= 0, tf.no_op, lambda: tf.print(f"WARNING: {_CORRUPT}", out["tfds_id"],
                                                                  "- skipped.", output_stream=sys.stderr))
            return out
        ds = ds.map(report).filter(lambda out: out["label"] >= 0)
        return ds.map(lambda out: {k: v for k, v in out.items() if k != "tfds_id"})

    def eval_batches(self) -> Iterator[Batch]:
        c = self.config
        local = c.eval_batch_size // self.process_count

        def preprocess(example):
            image = resize_and_centre_crop(example["image"], size=c.data.image_size, crop_ratio=c.data.crop_ratio)
            return {"image": image, "label": tf.cast(example["label"], tf.int32)}

        ds = self._map_checked(self._dataset(c.data.eval_split, shuffle_seed=None), preprocess)
        ds = ds.batch(local).prefetch(tf.data.AUTOTUNE)
        steps = None  # every process must run the same number of eval steps
        if self.num_eval_examples is not None:
            steps = math.ceil(math.ceil(self.num_eval_examples / self.process_count) / local)
        count = 0
        for batch in _reporting_corrupt_images(tfds.as_numpy(ds)):
            count += 1
            yield pad({k: batch[k] for k in ("image", "label")}, local)
        while steps is not None and count < steps:
            count += 1
            yield pad({"image": np.zeros((0,) + self.image_shape, np.uint8), "label": np.zeros(0, np.int32)}, local)


_CORRUPT = "Corrupt image (it cannot be decoded) in the TFDS example"


def _reporting_corrupt_images(batches):
    """The batches; tf.data's failed check of a corrupt image becomes a CorruptImageError."""
    batches = iter(batches)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            if _CORRUPT not in e.message:
                raise
            tfds_id = e.message.split(_CORRUPT, 1)[1].split("[", 1)[1].split("]", 1)[0]
            raise CorruptImageError(f"{_CORRUPT} {tfds_id}. Replace or remove that example and rebuild the data set, or set "
                                    "--config.data.on_corrupt_image=skip to leave such examples out.") from None
        yield batch
