"""Input pipelines: global-batch-sized, process-local numpy batches of uint8 images and int32 labels.

Images stay uint8 on the host; the train step normalises them on the device (4x less to transfer).
Sources:
  digits:    the embedded data set (`data/digits.py`), in memory.
  synthetic: a deterministic learnable data set of any image size and class count, in memory, for
             smoke tests and benchmarks.
  tfds:      any TFDS image-classification data set by name, read by example index with tf.data
             (`tfds_source.py`, `indexed.py`), cropped (`crop.py`) and augmented by the recipe
             (`masksub_jax/augment/`), with repeated augmentation.
  folder:    an image-folder tree (ROOT/<split>/<class>/*.JPEG; `folder_source.py`), read as a TFDS
             data set is.
Extra evaluation sets (config.data.extra_evals): `make_extra_evals`, with the robustness sets'
protocols (`robustness.py`: ImageNet-A / R on their 200 classes, ImageNet-C's corruptions and mCE).
This module alone knows which sources exist; the batch type and the errors they share are `types.py`'s.

Every source gives the batch of step k as a function of (seed, k): a resumed run sees exactly the
batches an uninterrupted run sees. Eval batches are padded to full size with `mask` = 0 so every
example counts exactly once.
"""
import collections
import copy
import itertools
import math
from collections.abc import Iterator

import numpy as np

from masksub_jax.data import digits, robustness
from masksub_jax.data.types import Batch, DataNotFoundError, capped_eval_batch_size


class ArraySource:
    """Train and eval examples held in memory as uint8 arrays."""

    def __init__(self, train: tuple[np.ndarray, np.ndarray], evaluation: tuple[np.ndarray, np.ndarray], *,
                 num_classes: int, seed: int, batch_size: int, eval_batch_size: int,
                 process_index: int = 0, process_count: int = 1, batch_multiple: int = 1):
        self.train_images, self.train_labels = train
        self.eval_images, self.eval_labels = evaluation
        self.num_classes, self.class_names = num_classes, [str(i) for i in range(num_classes)]
        self.num_train_examples, self.num_eval_examples = len(self.train_labels), len(self.eval_labels)
        self.image_shape = self.train_images.shape[1:]
        self.seed, self.batch_size = seed, batch_size
        self.eval_batch_size = capped_eval_batch_size(eval_batch_size, self.num_eval_examples, batch_multiple)
        self.process_index, self.process_count = process_index, process_count
        if batch_size > self.num_train_examples:
            raise ValueError(f"batch_size={batch_size} is larger than the {self.num_train_examples} "
                             "training examples; lower batch_size.")

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch of `step`: a seeded permutation per epoch."""
        steps_per_epoch = self.num_train_examples // self.batch_size
        epoch, position = divmod(step, steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_train_examples)
        return order[position * self.batch_size:(position + 1) * self.batch_size]

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        local = self.batch_size // self.process_count
        for step in range(start_step, 2**62):
            idx = self.global_indices(step)[self.process_index * local:(self.process_index + 1) * local]
            yield {"image": self.train_images[idx], "label": self.train_labels[idx]}

    def eval_batches(self) -> Iterator[Batch]:
        idx = np.arange(self.process_index, len(self.eval_labels), self.process_count)
        local = self.eval_batch_size // self.process_count
        steps = math.ceil(math.ceil(len(self.eval_labels) / self.process_count) / local)
        for i in range(steps):
            chunk = idx[i * local:(i + 1) * local]
            yield pad({"image": self.eval_images[chunk], "label": self.eval_labels[chunk]}, local)


def prefetch(items: Iterator, size: int) -> Iterator:
    """`items` in order, keeping `size` of them produced ahead. For device batches placed with
    jax.make_array_from_process_local_data (asynchronous), their transfers overlap the steps."""
    items = iter(items)
    queue = collections.deque(itertools.islice(items, size))
    while queue:
        queue.extend(itertools.islice(items, 1))
        yield queue.popleft()


def pad(batch: Batch, size: int) -> Batch:
    """Pads a batch to `size` examples with zeros and adds `mask` (1 = real example)."""
    n = len(batch["label"])
    out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    out["mask"] = (np.arange(size) < n).astype(np.float32)
    return out


def synthetic_examples(num: int, *, image_size: int, num_classes: int, seed: int, noise_seed: int | None = None,
                       channels: int = 3):
    """Example i has label i % num_classes and image = its class's template (drawn from `seed`)
    blended with noise (drawn from `noise_seed`; None: after the templates, from `seed`): the eval
    split has the training split's templates and noise of its own."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (num_classes, image_size, image_size, channels))
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
    labels = (np.arange(num) % num_classes).astype(np.int32)
    noise = rng.integers(0, 256, (num, image_size, image_size, channels))
    return ((templates[labels] + noise) // 2).astype(np.uint8), labels


def make(config, process_index: int = 0, process_count: int = 1, batch_multiple: int = 1,
         workdir: str | None = None, resuming: bool = False, write_lists: bool = True):
    """The source that `config.data.source` names. `batch_multiple`: the device count, which every
    global batch is a multiple of. `workdir`, `resuming`, `write_lists`: where a folder source keeps
    its file lists, whether to read them back, and whether it may write them."""
    d = config.data
    common = dict(seed=config.seed, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                  process_index=process_index, process_count=process_count, batch_multiple=batch_multiple)
    if d.source == "synthetic":
        size = dict(image_size=d.image_size, num_classes=d.num_classes, channels=len(d.mean))
        return ArraySource(synthetic_examples(d.num_train_examples, seed=config.seed, **size),
                           synthetic_examples(d.num_eval_examples, seed=config.seed, noise_seed=config.seed + 1,
                                              **size),
                           num_classes=d.num_classes, **common)
    if d.source == "digits":
        builder = digits.builder(d.data_dir)  # splits train (1497) and test (300); slices work: "train[:500]"
        arrays = [_as_arrays(builder, split) for split in (d.train_split, "test")]
        if arrays[0][0].shape[1] != d.image_size:
            raise ValueError(f"data.image_size={d.image_size} but the digits images are 8x8; set 8.")
        return ArraySource(*arrays, num_classes=10, **common)
    processes = dict(process_index=process_index, process_count=process_count, batch_multiple=batch_multiple)
    if d.source == "folder":
        from masksub_jax.data import folder_source
        return folder_source.FolderSource(config, workdir=workdir, resuming=resuming, write_lists=write_lists,
                                          **processes)
    from masksub_jax.data import tfds_source
    return tfds_source.TfdsSource(config, **processes)


def make_extra_evals(config, class_names: list[str], process_index: int = 0, process_count: int = 1,
                     batch_multiple: int = 1, workdir: str | None = None, resuming: bool = False,
                     write_lists: bool = True) -> dict:
    """{name: eval-only source} for config.data.extra_evals, in the model's `class_names`' indices:
    "folder:PATH" (name: the folder's) or "TFDS_NAME:SPLIT" (name: TFDS_NAME, e.g. imagenet_v2 or
    imagenet_v2/threshold-0.7). imagenet_a and imagenet_r are scored on their 200 classes' logits
    (`robustness.ClassSubset`); imagenet2012_corrupted[/CORRUPTIONS[/SEVERITIES]] is ImageNet-C, one
    set of many TFDS configs (`robustness.CorruptionSuite`). Every set that is not prepared is named,
    with how to prepare it, in one DataNotFoundError."""
    from masksub_jax.data import folder_source
    d = config.data
    processes = dict(process_index=process_index, process_count=process_count, batch_multiple=batch_multiple)
    specs = [spec.split(":", 1) for spec in d.extra_evals]
    for kind, _ in specs:  # spelling mistakes before any data is read
        if kind.partition("/")[0] == robustness.CORRUPTED:
            robustness.parse_corrupted(kind)
    sources, missing = {}, []
    for kind, where in specs:
        if kind == "folder":
            name, split = folder_source.eval_split(where, class_names, workdir, on_corrupt_image=d.on_corrupt_image,
                                                   reuse=resuming, write=write_lists and process_index == 0)
            source = _eval_source(config, split, class_names, processes)
        else:
            name = robustness.CORRUPTED if kind.partition("/")[0] == robustness.CORRUPTED else kind
            try:
                source = _tfds_eval_source(config, kind, where, class_names, processes)
            except DataNotFoundError as e:
                missing.append(str(e))
                continue
        if name in sources or name in ("ema",):
            raise ValueError(f"data.extra_evals names {name!r} twice (or a reserved name); each extra eval set "
                             "needs a name of its own (its TFDS name, or its folder's name).")
        sources[name] = source
    if missing:
        raise DataNotFoundError(missing[0] if len(missing) == 1 else
                                f"{len(missing)} extra eval sets are not prepared: " + " ".join(
                                    f"({i}) {message}" for i, message in enumerate(missing, 1)))
    return sources


def _eval_source(config, split, class_names, processes):
    from masksub_jax.data import indexed
    return indexed.IndexedSource(config, None, split, class_names=class_names, **processes)


def _tfds_eval_source(config, kind: str, split: str, class_names: list[str], processes: dict):
    """The extra eval source of TFDS name `kind`, split `split`, with its robustness protocol."""
    import tensorflow_datasets as tfds

    from masksub_jax.data import tfds_source
    data_dir = config.data.data_dir
    if kind.partition("/")[0] == robustness.CORRUPTED:
        corruptions, severities = robustness.parse_corrupted(kind)
        parts, unprepared = {}, []
        # ImageNet-C's images are already the 224 px centre crops (Hendrycks' test.py feeds them as they
        # are): resized to the model's size whole, never cropped again by data.crop_ratio.
        config = copy.deepcopy(config)
        config.data.crop_ratio = 1.0
        for c in corruptions:
            for s in severities:
                name = robustness.corruption_config(c, s)
                try:
                    parts[c, s] = _eval_source(config, tfds_source.eval_split(name, split, data_dir, len(class_names)),
                                               class_names, processes)
                except DataNotFoundError:
                    if tfds.builder(name, data_dir=data_dir).is_prepared():
                        raise  # prepared, but not that split
                    unprepared.append(name)
        if unprepared:
            raise DataNotFoundError(_corruptions_not_prepared(kind, unprepared, len(corruptions) * len(severities),
                                                              data_dir))
        return robustness.CorruptionSuite(parts)
    source = _eval_source(config, tfds_source.eval_split(kind, split, data_dir, len(class_names)), class_names,
                          processes)
    if kind in robustness.SUBSET_SETS:
        label_names = tfds.builder(kind, data_dir=data_dir).info.features["label"].names
        return robustness.ClassSubset(source, robustness.class_subset(kind, label_names))
    return source


def _corruptions_not_prepared(kind: str, unprepared: list[str], chosen: int, data_dir: str | None) -> str:
    """Which ImageNet-C configs are not prepared, and the commands that prepare them (TFDS corrupts
    ImageNet's validation images itself)."""
    from masksub_jax.data import tfds_source
    folder = data_dir or "DIR"
    configs = " ".join(name.partition("/")[2] for name in unprepared)
    shown = ", ".join(unprepared[:3]) + (f" and {len(unprepared) - 3} more" if len(unprepared) > 3 else "")
    return (f"ImageNet-C ({kind}): {len(unprepared)} of its {chosen} TFDS configs are not prepared in "
            f"data.data_dir={data_dir!r} ({shown}). TFDS makes them from ImageNet's validation images: put "
            f"ILSVRC2012_img_val.tar in {folder}/downloads/manual, `pip install opencv-python-headless scikit-image "
            f"scipy` (TFDS's corruption code), then `for c in {configs}; do "
            f"{tfds_source.prepare_command(robustness.CORRUPTED + '/$c', folder)}; done` (each config reads the "
            f"50,000 images again), then pass --config.data.data_dir={folder}.")


def _as_arrays(builder, split):
    import tensorflow_datasets as tfds
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return data["image"], data["label"].astype(np.int32)
