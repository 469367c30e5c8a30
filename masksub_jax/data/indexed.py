"""Image data sets read by example index, each process reading only its examples: the machinery that
the TFDS source (`tfds_source.py`) and the image-folder source (`folder_source.py`) share. A data
set only says how to fetch the records of some example indices and how to turn a record into
(encoded image, label): a `Split`.

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
"""
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from masksub_jax.augment import host
from masksub_jax.augment.spec import canvas_size, on_device
from masksub_jax.data import crop
from masksub_jax.data.types import Batch, CorruptImageError, capped_eval_batch_size

tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX

STEPS_IN_FLIGHT = 2  # batches read and preprocessed concurrently, beyond the one being consumed


@dataclasses.dataclass(frozen=True)
class Split:
    """A split readable by example index.

    fetch:    int64 indices [n] -> the records of those examples (tensors with leading dimension n),
              inside tf.data; a failed read may raise (the example is then corrupt).
    example:  one record -> {"image": encoded bytes, label_key: its label}.
    describe: indices -> how a message names those examples ("example(s) 3, 7 of split 'train' of ...").
    label_key, label_spec: the label's name in batches ("label": class index; "label_set": ReaL's
              multi-hot set of right answers) and its per-example TensorSpec.
    is_jpeg:  True when every image is a JPEG (decoded only inside the crop); None: sniffed per image.
    """
    size: int
    fetch: Callable
    example: Callable
    describe: Callable[[np.ndarray], str]
    fix: str  # what to do about a corrupt image: "Replace or remove those examples and prepare ... again"
    label_key: str = "label"
    label_spec: tf.TensorSpec = tf.TensorSpec([], tf.int32)
    is_jpeg: bool | None = True


def batch_layout(batch_size: int, repeats: int) -> np.ndarray:
    """layout[slot] = the stream position (within the step) held by batch slot `slot`: positions
    sorted by (position mod repeats, position), so consecutive positions are ~B/repeats slots apart."""
    return np.argsort(np.arange(batch_size) % repeats, kind="stable")


def train_features(data_config) -> dict[str, tf.TensorSpec]:
    """What the train transform gives per example: the image, and with the per-pixel ops on the
    device the flipped crop on a canvas and its size (augment/device.py resizes it there)."""
    d = data_config
    if on_device(d):
        canvas = canvas_size(d)
        return {"image": tf.TensorSpec([canvas, canvas, 3], tf.uint8), "crop_size": tf.TensorSpec([2], tf.int32)}
    return {"image": tf.TensorSpec([d.image_size, d.image_size, 3], tf.uint8)}


def train_transform(data_config):
    """(image bytes, seed) -> `train_features`: the uint8 image of the recipe `data_config.augment`
    names, or with the per-pixel ops on the device only the flipped crop (on a canvas)."""
    d = data_config
    recipe_ops = host.make(d)
    size = d.image_size

    def on_canvas(image, flip):
        """The crop flipped and padded to the canvas; a crop larger than the canvas is resized here
        (as on the host path), and then passes the device's resize unchanged."""
        canvas = canvas_size(d)
        too_large = tf.reduce_max(tf.shape(image)[:2]) > canvas
        image = tf.cond(too_large, lambda: host.to_uint8(host.resize(image, (size, size))), lambda: image)
        image = crop.flip(image, flip)
        crop_size = tf.shape(image)[:2]
        image = tf.pad(image, [[0, canvas - crop_size[0]], [0, canvas - crop_size[1]], [0, 0]])
        return {"image": tf.ensure_shape(image, [canvas, canvas, 3]), "crop_size": crop_size}

    def transform(image_bytes, seed, *, is_jpeg: bool | None):
        crop_seed, flip, recipe = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        image = crop.random_crop(image_bytes, crop_seed, is_jpeg=is_jpeg)
        if on_device(d):
            return on_canvas(image, flip)
        image = crop.flip(host.to_uint8(host.resize(image, (size, size))), flip)
        return {"image": recipe_ops(image, recipe)}
    return transform


class IndexedSource:
    """Train: an endless, deterministic stream of augmented batches. Eval: the split once, padded.
    `train` may be None for an eval-only source (an extra evaluation set)."""

    def __init__(self, config, train: Split | None, evaluation: Split, *, class_names: list[str],
                 process_index: int = 0, process_count: int = 1, batch_multiple: int = 1):
        d = config.data
        self.config, self.process_index, self.process_count = config, process_index, process_count
        self.train, self.evaluation = train, evaluation
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.image_shape = (d.image_size, d.image_size, 3)  # what the model sees
        self.train_features = train_features(d)
        self.num_train_examples = train.size if train else None
        self.num_eval_examples = evaluation.size
        self.eval_batch_size = capped_eval_batch_size(config.eval_batch_size, self.num_eval_examples, batch_multiple)
        if train and train.size < config.batch_size:
            raise ValueError(f"batch_size={config.batch_size} is larger than the {train.size} examples "
                             f"of split {d.train_split!r}; lower batch_size.")
        self.transform = train_transform(d)

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
        transform = functools.partial(self.transform, is_jpeg=self.train.is_jpeg)
        for index, done in self._read_and_preprocess(requests, self.train, transform, self.train_features, local):
            yield self._complete(index, done, local, self.train, self.train_features, train=True)

    def eval_batches(self) -> Iterator[Batch]:
        d = self.config.data
        local = self.eval_batch_size // self.process_count
        indices = self.eval_requests()
        requests = tf.data.Dataset.from_generator(
            lambda: ({"index": i, "seed": np.zeros((len(i), 2), np.int64)} for i in indices),
            output_signature={"index": tf.TensorSpec([None], tf.int64), "seed": tf.TensorSpec([None, 2], tf.int64)})

        def transform(image_bytes, seed):
            del seed
            return {"image": crop.resize_and_centre_crop(image_bytes, size=d.image_size, crop_ratio=d.crop_ratio)}
        features = {"image": tf.TensorSpec(self.image_shape, tf.uint8)}
        for index, done in self._read_and_preprocess(requests, self.evaluation, transform, features, local):
            yield self._complete(index, done, local, self.evaluation, features, train=False)

    def _read_and_preprocess(self, requests, split: Split, transform, features, size):
        """(index, preprocessed) per request, in order. `preprocessed` holds the examples whose
        image decoded, with their `slot` in the request; a failed one is missing, not fatal here."""
        specs = {"slot": tf.TensorSpec([], tf.int32), **features, split.label_key: split.label_spec}
        placeholder = {name: tf.zeros([0, *spec.shape], spec.dtype) for name, spec in specs.items()}

        def preprocess(slot, record, seed):
            example = split.example(record)
            return {"slot": slot, **transform(example["image"], seed), split.label_key: example[split.label_key]}

        def one_batch(request):
            examples = tf.data.Dataset.from_tensor_slices(
                (tf.range(tf.size(request["index"])), split.fetch(request["index"]), request["seed"]))
            done = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
            done = done.batch(size).concatenate(tf.data.Dataset.from_tensors(placeholder)).take(1)
            return tf.data.Dataset.zip(tf.data.Dataset.from_tensors(request["index"]), done)

        ds = requests.interleave(one_batch, cycle_length=STEPS_IN_FLIGHT, num_parallel_calls=STEPS_IN_FLIGHT,
                                 deterministic=True)
        return tfds.as_numpy(ds.prefetch(1))

    def _complete(self, index, done, size: int, split: Split, features, *, train: bool) -> Batch:
        """The preprocessed examples in their slots; a missing (corrupt) one is reported by its index
        and then fails the run, or is masked out (eval) or replaced by another of the batch (train)."""
        specs = {**features, split.label_key: split.label_spec}
        batch = {name: np.zeros((size, *spec.shape), spec.dtype.as_numpy_dtype) for name, spec in specs.items()}
        ok = np.zeros(size, bool)
        for name, values in batch.items():
            values[done["slot"]] = done[name]
        ok[done["slot"]] = True
        bad = np.flatnonzero(~ok[:len(index)])
        if bad.size:
            where = split.describe(np.unique(index[bad]))
            no_donor = train and bad.size == len(index)
            if self.config.data.on_corrupt_image == "fail" or no_donor:
                raise CorruptImageError(
                    f"Corrupt image (it cannot be decoded) in {where}. {split.fix}" +
                    (" (no image of this batch decodes, so none can stand in for them)." if no_donor else
                     ", or set --config.data.on_corrupt_image=skip to leave such examples out."))
            print(f"WARNING: corrupt image (it cannot be decoded) in {where} - skipped.", file=sys.stderr, flush=True)
            if train:
                good = np.flatnonzero(ok[:len(index)])
                donors = good[np.arange(bad.size) % good.size]
                for values in batch.values():
                    values[bad] = values[donors]
        if train:
            return batch
        return {**batch, "mask": (ok & (np.arange(size) < len(index))).astype(np.float32)}
