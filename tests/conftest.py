"""Shared test set-up: 8 simulated CPU devices (set before jax is imported) and small configs."""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache for the whole run, shared by the test workers and the trainer
# processes that the tests start (they inherit the environment): the same small programs, compiled
# again by every resumed or restarted process, compile once. Keyed by the program, flags and jax
# version, so a hit is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "masksub_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import contextlib

import pytest

from masksub_jax import config as config_lib
from masksub_jax.data import digits


def pytest_configure(config):
    """Registers the `smoke` marker: the few fast tests CI runs on the oldest versions setup.py accepts."""
    config.addinivalue_line("markers", "smoke: a fast test of one part (train loop, resume, TFDS digits, evaluate, "
                                       "convert, augmentation); `pytest -m smoke` runs them on constraints-min.txt")
    config.addinivalue_line("markers", "libtpu: compiles for a TPU slice with libtpu (the `tpu` extra); CI job 3 "
                                       "runs `pytest -m libtpu` with it installed")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A TFDS data dir with the digits data set prepared (once per test process)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits.builder(data_dir)
    return data_dir


def tiny_digits_config(data_dir: str, **overrides):
    """configs/digits.py, shortened: a few steps, frequent logs and checkpoints."""
    c = config_lib.base()
    c.data.source = "digits"
    c.data.data_dir = data_dir
    c.data.image_size = 8
    c.data.mean, c.data.std = (0.5,), (0.5,)
    c.model.variant = "mu/2"
    c.loss, c.label_smoothing = "ce", 0.1
    c.mixup.mixup_alpha, c.mixup.cutmix_alpha = 0.0, 0.0
    c.optim.name, c.optim.lr, c.optim.warmup_epochs = "adamw", 5e-3, 0.0
    c.model.layerscale_init = 0.1  # learns faster from the start than DeiT-III's 1e-4
    c.batch_size, c.eval_batch_size = 64, 64
    c.total_steps = 60
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 0, 20
    return config_lib.override(c, overrides)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_file_config(data_dir: str, overrides: dict):
    """configs/digits.py with `overrides` (dotted keys), as the command line would give it."""
    from masksub_jax import configs
    return configs.get("digits", **overrides, **{"data.data_dir": data_dir})


def digits_main_command(workdir: str, data_dir: str, overrides: dict) -> list[str]:
    """The command line that trains `digits_file_config(data_dir, overrides)` in a new process."""
    import sys
    flags = [f"--config.{k}={v}" for k, v in {**overrides, "data.data_dir": data_dir}.items()]
    return [sys.executable, "-m", "masksub_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", *flags]


def wait_for_step(proc, step: int) -> list[str]:
    """Reads a trainer process's output until it reports a step >= `step`; returns the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return lines
    raise AssertionError(f"the run ended before step {step}:\n{''.join(lines[-30:])}")


@contextlib.contextmanager
def mock_imagenet(num_examples: int):
    """tfds.testing.mock_data's imagenet2012 (random JPEGs of any shape, 1000 classes), read by index.

    TFDS 4.9.10's mock sets `__getitems__` on a MagicMock instance, where it is not bound as a
    method; here batches are read one example at a time instead.
    """
    import tensorflow_datasets as tfds
    with pytest.MonkeyPatch.context() as patch, tfds.testing.mock_data(num_examples=num_examples):
        patch.setattr(tfds.core.data_sources.base.BaseDataSource, "__getitems__",
                      lambda self, keys: [self[k] for k in keys])
        yield


def flip_one_bit(step_dir: str) -> None:
    """Flips one bit in the middle of a checkpoint's largest data file: bit rot as a disk makes it.
    What Orbax then reads depends on where the bit lands (Orbax groups and compresses arrays
    differently from run to run): an unreadable chunk, a NaN, or silently wrong values."""
    import glob
    largest = max(glob.glob(os.path.join(step_dir, "default", "**", "d", "*"), recursive=True), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def flip_one_bit_in_an_array(step_dir: str) -> None:
    """Rewrites a checkpoint's arrays with one bit of the largest array flipped, keeping the step's
    metadata (and so the checksums written with it): damage that only the checksums can see, always."""
    damage_an_array(step_dir, "flip")


def damage_an_array(step_dir: str, how: str, collection: str = "") -> None:
    """Rewrites a checkpoint with its largest array (under the top-level `collection`, e.g. "ema",
    if given) changed: "flip" one bit or "nan" everywhere, keeping the step's metadata and the
    checksums written with it."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    item = os.path.join(step_dir, "default")
    checkpointer = ocp.StandardCheckpointer()
    shapes = checkpointer.metadata(item).item_metadata.tree
    state = checkpointer.restore(item, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), shapes))
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = [x for _, x in with_paths]
    largest = max((i for i, (path, _) in enumerate(with_paths)
                   if jax.tree_util.keystr(path).startswith(f"['{collection}']" if collection else "")),
                  key=lambda i: leaves[i].size)
    x = np.array(leaves[largest])
    if how == "flip":
        bits = x.reshape(-1).view(f"uint{x.dtype.itemsize * 8}")
        bits[bits.size // 2] ^= 0x10
    else:
        x[...] = np.nan
    leaves[largest] = x
    rewritten = step_dir + ".rewritten"
    checkpointer.save(rewritten, jax.tree.unflatten(treedef, leaves))
    checkpointer.wait_until_finished()
    shutil.rmtree(item)
    os.rename(rewritten, item)


@pytest.fixture(scope="module")
def photo():
    """A 60x80 smooth colour field with pixel noise, like a small photo (the augmentation tests')."""
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    field = tf.image.resize(rng.uniform(0, 255, (5, 5, 3)), (60, 80), method="bicubic").numpy()
    return np.clip(field + rng.normal(0, 10, (60, 80, 3)), 0, 255).astype(np.uint8)
