"""SHA-256 digests of the first train batches of a few tiny configs, as the input pipeline gives them
and as the train step's augmentation turns them into what the model sees (the recipe's per-pixel
ops when they run on the device, random erasing, mixup / cutmix and their targets).

tools/make_batch_fingerprints.py writes them to tests/fixtures/batch_fingerprints.json and
tests/test_batches_unchanged.py recomputes them: a change that moves or tidies the augmentation
code must leave every batch bit for bit as it was. The digests hold for the library versions that
`environment` names (TensorFlow's and XLA's kernels decide the last bit of a float); elsewhere each
field's shape and its sum and sum of squares (`statistics`) are compared within a tolerance that a
last-bit difference stays inside and a changed op does not."""
import hashlib
import os
import platform

import jax
import numpy as np

from masksub_jax import config as config_lib
from masksub_jax import step as step_lib
from masksub_jax.data import generated, pipeline

NUM_BATCHES = 2

# name: (source, data.augment_on, data.augment, other overrides). Each covers recipe ops, erasing and mixing.
CASES = {
    "tfds_host_rand_inc": ("tfds", "host", "rand-m9-mstd0.5-inc1", {"data.repeated_aug": 3}),
    "tfds_device_rand": ("tfds", "device", "rand-m7-mstd0.5-n3-p0.8", {"mixup.mixup_alpha": 0.0}),
    "folder_host_3augment": ("folder", "host", "3augment", {"mixup.cutmix_alpha": 0.0}),
    "folder_device_3augment": ("folder", "device", "3augment", {}),
}


def environment() -> dict:
    """The versions and the CPU's vector width that the digests depend on."""
    import PIL
    import tensorflow as tf
    return {"tensorflow": tf.__version__, "jax": jax.__version__, "jaxlib": jax.lib.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "machine": platform.machine(),
            "vector_isa": _vector_isa()}


def _vector_isa() -> str:
    """The widest x86 vector extension of the CPU: XLA compiles for it and oneDNN picks its kernels
    by it, which can change the order of a float sum."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return next((isa for isa in ("avx512f", "avx2", "avx") if isa in flags), "other")


def write_data(root: str) -> dict:
    """The data sets the cases read: generated_jpegs/tiny (TFDS, array_record) and an image folder
    (JPEGs and PNGs). Returns their config overrides by source."""
    tfds_dir, folder = os.path.join(root, "tfds"), os.path.join(root, "folder")
    name = generated.prepare("tiny", tfds_dir)
    generated.image_folder(folder, num_classes=3, per_class={"train": 6, "val": 2}, seed=5)
    return {"tfds": {"data.name": name, "data.data_dir": tfds_dir},
            "folder": {"data.folder": folder, "data.train_split": "train", "data.eval_split": "val"}}


def case_config(source: str, augment_on: str, augment: str, overrides: dict, data: dict):
    c = config_lib.base()
    c.seed = 7
    c.batch_size, c.eval_batch_size = 12, 8
    c.data.image_size, c.data.mean, c.data.std = 16, (0.5,) * 3, (0.25,) * 3
    c.data.repeated_aug, c.data.random_erasing, c.loss, c.label_smoothing = 1, 0.5, "ce", 0.1
    c.model.variant = "mu/8"
    config_lib.override(c, {"data.source": source, "data.augment_on": augment_on, "data.augment": augment,
                            **data[source], **overrides})
    config_lib.validate(c)
    return c


def _digest(array) -> str:
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def _statistics(array) -> dict:
    array = np.asarray(array, np.float64)
    return {"shape": list(array.shape), "sum": float(array.sum()), "sum_sq": float(np.square(array).sum())}


def fingerprints(root: str) -> tuple[dict, dict]:
    """({case: [per batch {field: digest}]}, the same with each field's `_statistics`): the
    pipeline's fields (image, label, crop_size with the ops on the device) and the train step's
    images and targets, for the first NUM_BATCHES steps."""
    data = write_data(root)
    digests, statistics = {}, {}
    for name, (source, augment_on, augment, overrides) in CASES.items():
        config = case_config(source, augment_on, augment, overrides, data)
        batches = pipeline.make(config).train_batches()
        augment_fn = jax.jit(step_lib.make_augment(config, 3))
        digests[name], statistics[name] = [], []
        for step in range(NUM_BATCHES):
            batch = next(batches)
            images, targets, _ = augment_fn(batch, jax.random.fold_in(jax.random.PRNGKey(config.seed), step))
            fields = {**dict(sorted(batch.items())), "step_images": images, "step_targets": targets}
            digests[name].append({k: _digest(v) for k, v in fields.items()})
            statistics[name].append({k: _statistics(v) for k, v in fields.items()})
    return digests, statistics
