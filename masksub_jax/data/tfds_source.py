"""A TFDS image-classification data set read by example index, each process reading only its examples.

Train order. Epoch e is a permutation of the N training examples seeded by (seed, e), computed per
position (tf.random.experimental.index_shuffle: no table, no shuffle buffer). With repeated
augmentation R, each permuted example appears R times in a row and an epoch is the first N of that
stream (about N/R distinct images, as DeiT's RASampler). The global batch of step s is positions
[qB, (q+1)B) of its epoch's stream (q = s mod steps per epoch), laid out so that the R copies of an
image sit B/R slots apart (`batch_layout`): cut into R or more contiguous shards (devices,
processes), the copies land on different shards. Process p reads only the slots of its shard.
The example at stream position t of the run is augmented with the seed (seed, t).

So the batch of step s is a function of (seed, s), the data set and the config alone, whatever the
number of processes or devices: a run resumed at step s reads exactly the batches an uninterrupted
run reads from s on, and the checkpoint's step is all the state there is. Host memory holds only
the records of the steps in flight (nothing is cached).

Eval: process p evaluates the p-th of P contiguous ranges of the split, in batches padded with
mask = 0; every process runs the same number of batches; each example counts exactly once.

An image that cannot be decoded stops the run naming the example (config.data.on_corrupt_image =
"fail"), or is left out with a warning naming it ("skip"; in training its slot gets a copy of
another example of the same batch, so the batch and all later ones stay as they were).

Random access needs the data set in TFDS's array_record format; see `prepare_command`.
"""
import functools
import math
import sys
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from masksub_jax.data import augment, randaugment
from masksub_jax.data.pipeline import Batch, CorruptImageError, DataNotFoundError, capped_eval_batch_size

tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX

STEPS_IN_FLIGHT = 2  # batches read and preprocessed concurrently, beyond the one being consumed


class DataFormatError(ValueError):
    """The data set is prepared, but not in a format that can be read by index."""


def prepare_command(name: str, data_dir: str | None) -> str:
    return f"python -m masksub_jax.data.prepare --name={name}" + (f" --data_dir={data_dir}" if data_dir else "")


def batch_layout(batch_size: int, repeats: int) -> np.ndarray:
    """layout[slot] = the stream position (within the step) held by batch slot `slot`: positions
    sorted by (position mod repeats, position), so consecutive positions are ~B/repeats slots apart."""
    return np.argsort(np.arange(batch_size) % repeats, kind="stable")


def train_transform(data_config):
    """(image bytes, seed) -> uint8 image for the recipe `data_config.augment` names."""
    d = data_config
    spec = randaugment.parse(d.augment) if d.augment.startswith("rand") else None

    def transform(image_bytes, seed, *, is_jpeg: bool):
        crop, flip, recipe = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        image = augment.random_resized_crop(image_bytes, crop, size=d.image_size, is_jpeg=is_jpeg)
        image = augment.flip(image, flip)
        if d.augment == "3augment":
            return augment.three_augment(image, recipe, jitter=d.color_jitter)
        if spec is not None:
            return randaugment.rand_augment(image, recipe, spec)
        return augment.color_jitter(image, recipe, d.color_jitter) if d.color_jitter > 0 else image
    return transform


class TfdsSource:
    """Train: an endless, deterministic stream of augmented batches. Eval: the split once, padded."""

    def __init__(self, config, process_index: int = 0, process_count: int = 1, batch_multiple: int = 1):
        d = config.data
        try:
            builder = tfds.builder(d.name, data_dir=d.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise DataNotFoundError(f"data.name={d.name!r} is not a TFDS data set ({e.__class__.__name__}); "
                                    "use a name from the TFDS catalogue, e.g. 'imagenet2012'.") from None
        self.config, self.process_index, self.process_count = config, process_index, process_count
        self.features = builder.info.features
        self.num_classes = self.features["label"].num_classes
        self.image_shape = (d.image_size, d.image_size, 3)
        self.is_jpeg = getattr(self.features["image"], "encoding_format", None) == "jpeg"
        self.train_records = _records(builder, d.train_split, d)
        self.eval_records = _records(builder, d.eval_split, d)
        self.num_train_examples, self.num_eval_examples = len(self.train_records), len(self.eval_records)
        self.eval_batch_size = capped_eval_batch_size(config.eval_batch_size, self.num_eval_examples, batch_multiple)
        if self.num_train_examples < config.batch_size:
            raise ValueError(f"batch_size={config.batch_size} is larger than the {self.num_train_examples} examples "
                             f"of split {d.train_split!r}; lower batch_size.")
        self.transform = functools.partial(train_transform(d), is_jpeg=self.is_jpeg)

    # ----------------------------------------------------------------------------------------------
    # Which examples, with which seeds.

    def train_request(self, step):
        """This process's share of the batch of `step`: {"index": example indices, "seed": [n, 2]}."""
        c, d = self.config, self.config.data
        batch, repeats, n = c.batch_size, d.repeated_aug, self.num_train_examples
        local = batch // self.process_count
        positions = tf.constant(batch_layout(batch, repeats)[self.process_index * local:][:local], tf.int64)
        step = tf.cast(step, tf.int64)
        epoch, step_in_epoch = step // (n // batch), step % (n // batch)
        permuted = (step_in_epoch * batch + positions) // repeats
        index = tf.random.experimental.index_shuffle(permuted, tf.stack([tf.constant(c.seed, tf.int64), epoch]),
                                                     max_index=n - 1)
        seed = tf.stack([tf.fill([local], tf.constant(c.seed, tf.int64)), step * batch + positions], axis=1)
        return {"index": index, "seed": seed}

    def eval_requests(self) -> list[np.ndarray]:
        """This process's eval batches as example indices; as many batches on every process."""
        n, count = self.num_eval_examples, self.process_count
        local = self.eval_batch_size // count
        lo, hi = self.process_index * n // count, (self.process_index + 1) * n // count
        steps = math.ceil(math.ceil(n / count) / local)
        return [np.arange(min(hi, lo + i * local), min(hi, lo + (i + 1) * local)) for i in range(steps)]

    # ----------------------------------------------------------------------------------------------
    # Batches.

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        requests = tf.data.Dataset.range(start_step, 2**62).map(self.train_request)
        local = self.config.batch_size // self.process_count
        for index, done in self._read_and_preprocess(requests, self.train_records, self.transform, local):
            yield self._complete(index, done, local, self.config.data.train_split, train=True)

    def eval_batches(self) -> Iterator[Batch]:
        d = self.config.data
        local = self.eval_batch_size // self.process_count
        indices = self.eval_requests()
        requests = tf.data.Dataset.from_generator(
            lambda: ({"index": i, "seed": np.zeros((len(i), 2), np.int64)} for i in indices),
            output_signature={"index": tf.TensorSpec([None], tf.int64), "seed": tf.TensorSpec([None, 2], tf.int64)})

        def transform(image_bytes, seed):
            del seed
            return augment.resize_and_centre_crop(image_bytes, size=d.image_size, crop_ratio=d.crop_ratio)
        for index, done in self._read_and_preprocess(requests, self.eval_records, transform, local):
            yield self._complete(index, done, local, d.eval_split, train=False)

    def _read_and_preprocess(self, requests, records, transform, size):
        """(index, preprocessed) per request, in order. `preprocessed` holds the examples whose
        image decoded, with their `slot` in the request; a failed one is missing, not fatal here."""
        placeholder = {"slot": tf.zeros([0], tf.int32), "image": tf.zeros((0,) + self.image_shape, tf.uint8),
                       "label": tf.zeros([0], tf.int32)}

        def preprocess(slot, record, seed):
            example = self.features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()})
            return {"slot": slot, "image": transform(example["image"], seed),
                    "label": tf.cast(example["label"], tf.int32)}

        def one_batch(request):
            data = tf.numpy_function(functools.partial(_read, records), [request["index"]], tf.string, stateful=False)
            examples = tf.data.Dataset.from_tensor_slices(
                (tf.range(tf.size(request["index"])), tf.reshape(data, [-1]), request["seed"]))
            done = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
            done = done.batch(size).concatenate(tf.data.Dataset.from_tensors(placeholder)).take(1)
            return tf.data.Dataset.zip(tf.data.Dataset.from_tensors(request["index"]), done)

        ds = requests.interleave(one_batch, cycle_length=STEPS_IN_FLIGHT, num_parallel_calls=STEPS_IN_FLIGHT,
                                 deterministic=True)
        return tfds.as_numpy(ds.prefetch(1))

    def _complete(self, index, done, size: int, split: str, *, train: bool) -> Batch:
        """The preprocessed examples in their slots; a missing (corrupt) one is reported by its index
        and then fails the run, or is masked out (eval) or replaced by another of the batch (train)."""
        image = np.zeros((size,) + self.image_shape, np.uint8)
        label = np.zeros(size, np.int32)
        ok = np.zeros(size, bool)
        image[done["slot"]], label[done["slot"]], ok[done["slot"]] = done["image"], done["label"], True
        bad = np.flatnonzero(~ok[:len(index)])
        if bad.size:
            examples = ", ".join(map(str, np.unique(index[bad])))
            where = f"example(s) {examples} of split {split!r} of {self.config.data.name!r}"
            no_donor = train and bad.size == len(index)
            if self.config.data.on_corrupt_image == "fail" or no_donor:
                raise CorruptImageError(
                    f"Corrupt image (it cannot be decoded) in {where} (indices in the data set's TFDS order). "
                    "Replace or remove those examples and prepare the data set again" +
                    (" (no image of this batch decodes, so none can stand in for them)." if no_donor else
                     ", or set --config.data.on_corrupt_image=skip to leave such examples out."))
            print(f"WARNING: corrupt image (it cannot be decoded) in {where} - skipped.", file=sys.stderr, flush=True)
            if train:
                good = np.flatnonzero(ok[:len(index)])
                donors = good[np.arange(bad.size) % good.size]
                image[bad], label[bad] = image[donors], label[donors]
        if train:
            return {"image": image, "label": label}
        return {"image": image, "label": label, "mask": (ok & (np.arange(size) < len(index))).astype(np.float32)}


def _read(records, index: np.ndarray) -> np.ndarray:
    out = np.empty(len(index), dtype=object)  # not a bytes array: numpy would strip trailing zero bytes
    out[:] = records.__getitems__(index.tolist()) if len(index) else []
    return out


def _records(builder, split: str, d):
    """The split's serialized examples, by index (an array_record data source)."""
    array_record = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
    try:
        return builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
                                      file_format=array_record)
    except (NotImplementedError, ValueError, KeyError, FileNotFoundError, AssertionError) as e:
        cause = e
    if not builder.is_prepared():
        raise DataNotFoundError(
            f"TFDS data set {d.name!r} is not prepared in data.data_dir={d.data_dir!r}. Prepare it once with "
            f"`{prepare_command(d.name, d.data_dir or 'DIR')}` (ImageNet: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in DIR/downloads/manual first), then pass --config.data.data_dir=DIR. "
            "To try a config without the data, train on generated images: --config.data.source=synthetic "
            "(README: Try it without ImageNet).")
    if array_record not in (builder.info.file_format, *builder.info.alternative_file_formats):
        raise DataFormatError(
            f"TFDS data set {d.name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, which "
            "cannot be read by example index (needed for the deterministic order and exact resumption). Add "
            f"an array_record copy once: `{prepare_command(d.name, d.data_dir)}` (it converts the prepared "
            "files; no download).")
    raise DataNotFoundError(f"Cannot read split {split!r} of TFDS data set {d.name!r} ({cause}); its splits: "
                            f"{sorted(builder.info.splits)}. Set data.train_split / data.eval_split.")
