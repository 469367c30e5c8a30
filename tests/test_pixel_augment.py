"""The per-pixel ops on the device (data.augment_on="device"): each equals its host version (which
tests/test_augment.py checks against PIL), the random choices have the recipe's distribution, an
example's augmentation depends on its index alone, and the host stops after the flip."""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from PIL import Image, ImageFilter

from masksub_jax import sharding, train
from masksub_jax import step as step_lib
from masksub_jax.augment import device as device_ops
from masksub_jax.augment import host as host_ops
from masksub_jax.augment import spec as spec_lib
from masksub_jax.data import generated, pipeline
from tests.conftest import tiny_digits_config
from tests.test_augment import PIL_OPS, _diff, assert_matches_pil_bilinear

IMAGES = generated._colour_field(np.random.default_rng(0), (32, 33), (40, 41))[None].repeat(4, 0)
IMAGES[1:] = np.random.default_rng(1).integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)  # smooth, then noise
FACTORS = np.array([0.7, 0.9, 1.1, 1.3], np.float32)


def _assert_equal_pixels(device, host):
    """Equal, but for a rare pixel one level apart (float sums in another order round the other way);
    tests/test_augment.py holds the host ops to at most one level from PIL's anywhere."""
    diff = np.abs(np.asarray(device, np.int32) - np.asarray(host, np.int32))
    assert diff.max() <= 1 and np.mean(diff > 0) < 5e-3, (diff.max(), np.mean(diff > 0))


@pytest.mark.parametrize("name", ["grayscale", "solarize", "gaussian_blur", "adjust_brightness", "adjust_contrast",
                                  "adjust_saturation"])
@pytest.mark.smoke
def test_each_device_op_equals_its_host_version(name):
    device_op, host_op = getattr(device_ops, name), getattr(host_ops, name)
    x = jnp.asarray(IMAGES, jnp.float32)
    if name == "gaussian_blur":
        sigmas = np.array([0.1, 0.7, 1.3, 2.0], np.float32)
        got = device_op(x, jnp.asarray(sigmas))
        want = [host_op(tf.constant(IMAGES[i]), sigmas[i]) for i in range(4)]
    elif name.startswith("adjust"):
        got = device_op(x, jnp.asarray(FACTORS))
        want = [host_op(tf.constant(IMAGES[i]), FACTORS[i]) for i in range(4)]
    else:
        got, want = device_op(x), [host_op(tf.constant(IMAGES[i])) for i in range(4)]
    _assert_equal_pixels(got, np.stack(want))
    assert not np.array_equal(np.asarray(got), IMAGES)  # it did something


def _keys(n, seed=0):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))


def test_three_augment_picks_each_of_its_ops_for_a_third_of_the_examples():
    n = 600
    x = jnp.asarray(np.repeat(IMAGES[:1], n, 0), jnp.float32)
    out = np.asarray(device_ops.three_augment(x, _keys(n), jitter=0.0))
    gray, solar = np.asarray(device_ops.grayscale(x[:1]))[0], np.asarray(device_ops.solarize(x[:1]))[0]
    is_gray, is_solar = (out == gray).all(axis=(1, 2, 3)), (out == solar).all(axis=(1, 2, 3))
    blurred = out[~is_gray & ~is_solar]
    for count in (is_gray.sum(), is_solar.sum(), len(blurred)):
        assert abs(count - n / 3) < 4 * np.sqrt(n * 2 / 9), (is_gray.sum(), is_solar.sum(), len(blurred))
    # The blurred ones are blurred (no rougher than the image; sigma 0.1 leaves it) with sigmas of their own.
    roughness = lambda a: np.abs(np.diff(a.astype(np.float32), axis=1)).mean(axis=(1, 2, 3))  # noqa: E731
    assert (roughness(blurred) <= roughness(IMAGES[:1])[0]).all()
    assert np.median(roughness(blurred)) < 0.6 * roughness(IMAGES[:1])[0]
    assert len(np.unique(roughness(blurred))) > 0.8 * len(blurred)


def test_jitter_factors_are_uniform_and_its_orders_are_the_six_permutations_alike():
    n = 6000
    factors, order = map(np.asarray, device_ops.jitter_draws(_keys(n), 0.3))
    assert factors.min() >= 0.7 and factors.max() <= 1.3
    for column in factors.T:  # uniform: mean 1, std 0.6 / sqrt(12), each fifth of the range a fifth
        assert abs(column.mean() - 1) < 0.01 and abs(column.std() - 0.6 / np.sqrt(12)) < 0.005
        assert np.allclose(np.histogram(column, 5, (0.7, 1.3))[0] / n, 0.2, atol=0.02)
    assert (np.sort(order, axis=1) == [0, 1, 2]).all()
    _, counts = np.unique(order, axis=0, return_counts=True)
    assert len(counts) == 6 and np.allclose(counts / n, 1 / 6, atol=0.02)


def _device_config(**overrides):
    return tiny_digits_config("/unused", batch_size=8, **{
        "data.source": "tfds", "data.augment_on": "device", "data.image_size": 32, "data.mean": (0.5,) * 3,
        "data.std": (0.5,) * 3, "model.variant": "mu/8", **overrides})


def test_an_example_is_augmented_by_its_index_alone_on_any_number_of_devices():
    config = _device_config()
    augment_fn = jax.jit(step_lib.make_augment(config, 10))
    rng = np.random.default_rng(2)
    batch = {"image": rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), "label": np.arange(8, dtype=np.int32),
             "crop_size": rng.integers(16, 65, (8, 2)).astype(np.int32)}
    one, _, _ = augment_fn(batch, jax.random.PRNGKey(4))
    mesh = sharding.make_mesh(1)
    sharded, _, _ = augment_fn(sharding.to_global(batch, sharding.batch_sharding(mesh)), jax.random.PRNGKey(4))
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(one))
    other = {**batch, "image": batch["image"].copy()}
    other["image"][[0, 1, 2, 4, 5, 6, 7]] = 0  # every example but 3 changed
    changed, _, _ = augment_fn(other, jax.random.PRNGKey(4))
    np.testing.assert_array_equal(np.asarray(changed)[3], np.asarray(one)[3])
    resized = device_ops.resize(jnp.asarray(batch["image"]), jnp.asarray(batch["crop_size"]), 32)
    host, _, _ = jax.jit(step_lib.make_augment(_device_config(**{"data.augment_on": "host"}), 10))(
        {**batch, "image": np.asarray(resized, np.uint8)}, jax.random.PRNGKey(4))
    assert one.shape == host.shape == (8, 32, 32, 3)
    assert not np.allclose(np.asarray(host), np.asarray(one))  # the host path's step leaves the pixels


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("jpegs"))
    return data_dir, generated.prepare("tiny", data_dir)


def test_the_device_resize_equals_the_hosts_on_crops_of_every_size():
    rng = np.random.default_rng(3)
    canvas = np.zeros((5, 64, 64, 3), np.uint8)
    sizes = np.array([[64, 64], [33, 50], [32, 32], [20, 9], [64, 17]], np.int32)  # shrink, keep, enlarge
    want = []
    for i, (h, w) in enumerate(sizes):
        canvas[i, :h, :w] = generated._colour_field(rng, (h, h + 1), (w, w + 1))
        want.append(host_ops.to_uint8(host_ops.resize(tf.constant(canvas[i, :h, :w]), (32, 32))).numpy())
    got = device_ops.resize(jnp.asarray(canvas), jnp.asarray(sizes), 32)
    _assert_equal_pixels(got, np.stack(want))
    np.testing.assert_array_equal(np.asarray(got)[2], canvas[2, :32, :32])  # 32 -> 32 leaves the pixels


def test_with_the_ops_on_the_device_the_host_stops_after_crop_and_flip_and_a_run_trains(jpegs, tmp_path):
    data_dir, name = jpegs
    common = {"data.name": name, "data.data_dir": data_dir, "data.repeated_aug": 1}
    device = pipeline.make(_device_config(**common)).train_batches()
    plain = pipeline.make(_device_config(**common, **{"data.augment_on": "host", "data.augment": "crop_flip",
                                                      "data.color_jitter": 0.0})).train_batches()
    for _ in range(2):
        batch, want = next(device), next(plain)["image"]
        assert batch["image"].shape == (8, 64, 64, 3) and batch["crop_size"].shape == (8, 2)
        assert (batch["crop_size"] <= 64).all() and (batch["crop_size"] > 0).all()
        _assert_equal_pixels(device_ops.resize(jnp.asarray(batch["image"]), jnp.asarray(batch["crop_size"]), 32),
                             want)
    summary = train.run(_device_config(total_steps=3, checkpoint_every_steps=3, log_every_steps=1, **common,
                                       **{"data.image_size": 16}), str(tmp_path))
    assert summary["step"] == 3 and np.isfinite(summary["history"][-2]["train/loss"])


def test_an_input_bound_run_says_how_much_of_the_time_it_waited_for_input(digits_dir, tmp_path, monkeypatch, capsys):
    batches = pipeline.ArraySource.train_batches

    def slow(self, start_step=0):
        for batch in batches(self, start_step):
            time.sleep(0.25)
            yield batch
    monkeypatch.setattr(pipeline.ArraySource, "train_batches", slow)
    config = tiny_digits_config(digits_dir, total_steps=12, log_every_steps=6, checkpoint_every_steps=12)
    summary = train.run(config, str(tmp_path))
    waits = [r["train/input_wait"] for r in summary["history"] if "train/input_wait" in r]
    assert len(waits) == 2 and min(waits) > 0.5, waits
    assert "| input wait " in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# RandAugment.

@pytest.mark.parametrize("name", sorted(host_ops.OP_TABLE))
def test_each_device_randaugment_op_equals_its_host_version(name):
    for i, magnitude in enumerate((3.0, 9.0)):
        for sign in (1.0, -1.0):
            want = host_ops.apply_op(name, tf.constant(IMAGES[i]), magnitude, sign).numpy()
            got = jax.jit(functools.partial(device_ops.apply_op, name))(
                jnp.asarray(IMAGES[i], jnp.float32), magnitude, sign)
            _assert_equal_pixels(got[None], want[None])


def test_randaugment_draws_have_the_specs_distribution():
    spec = spec_lib.parse("rand-m9-mstd0.5-inc1")
    n = 4000
    choices, applied, magnitudes, signs = map(np.asarray, jax.vmap(
        functools.partial(device_ops.draws, spec=spec))(_keys(n)))
    assert choices.shape == (n, 2)
    _, counts = np.unique(choices, return_counts=True)
    assert len(counts) == 15 and np.allclose(counts / (2 * n), 1 / 15, atol=0.01)
    assert abs(applied.mean() - 0.5) < 0.02 and abs((signs > 0).mean() - 0.5) < 0.02
    assert abs(magnitudes.mean() - 9) < 0.03 and abs(magnitudes.std() - 0.5) < 0.03 and magnitudes.max() <= 10


def test_device_randaugment_applies_a_drawn_op_or_none_per_layer():
    spec = spec_lib.parse("rand-m9-n1-p0.5")
    x = jnp.asarray(np.repeat(IMAGES[:1], 64, 0), jnp.float32)
    keys = _keys(64, seed=5)
    out = np.asarray(jax.vmap(functools.partial(device_ops.rand_augment, spec=spec))(x, keys))
    choices, applied, magnitudes, signs = map(np.asarray, jax.vmap(
        functools.partial(device_ops.draws, spec=spec))(keys))
    for i in range(64):
        want = (device_ops.apply_op(spec.ops[choices[i, 0]], x[0], magnitudes[i, 0], signs[i, 0])
                if applied[i, 0] else x[0])
        _assert_equal_pixels(out[i][None], np.asarray(want)[None])


# --------------------------------------------------------------------------------------------------
# The device ops against PIL (what timm runs), with tests/test_augment.py's tolerances for the host ops.

def _photo_batch(photo):
    return jnp.asarray(photo[None], jnp.float32)


def test_device_resize_grayscale_blur_and_jitter_ops_match_pil_and_formulas(photo):
    x, one = _photo_batch(photo), lambda v: jnp.asarray([v], jnp.float32)  # noqa: E731
    canvas = jnp.zeros((1, 160, 160, 3), jnp.float32).at[:, :60, :80].set(x)
    resized = device_ops.resize(canvas, jnp.asarray([[60, 80]]), 40)[0]  # to 40x40: both axes shrink
    assert _diff(resized, Image.fromarray(photo).resize((40, 40), Image.BICUBIC)).max() <= 1
    assert _diff(device_ops.grayscale(x)[0, ..., 0], Image.fromarray(photo).convert("L")).max() <= 1
    for sigma in (0.1, 1.3, 2.0):
        expected = scipy.ndimage.gaussian_filter(photo.astype(np.float64), (sigma, sigma, 0), mode="reflect",
                                                 truncate=6 / sigma)
        assert _diff(device_ops.gaussian_blur(x, one(sigma))[0], np.round(expected)).max() <= 1
    pil_blur = Image.fromarray(photo).filter(ImageFilter.GaussianBlur(1.3))
    assert _diff(device_ops.gaussian_blur(x, one(1.3))[0], pil_blur).mean() < 0.5
    f = photo.astype(np.float64)
    gray = f @ np.array(host_ops.GRAY_WEIGHTS)
    rounded = lambda v: np.clip(np.round(v), 0, 255)  # noqa: E731
    assert _diff(device_ops.adjust_brightness(x, one(1.3))[0], rounded(1.3 * f)).max() <= 1
    assert _diff(device_ops.adjust_contrast(x, one(0.7))[0], rounded(0.7 * f + 0.3 * gray.mean())).max() <= 1
    assert _diff(device_ops.adjust_saturation(x, one(1.2))[0], rounded(1.2 * f - 0.2 * gray[..., None])).max() <= 1


@pytest.mark.parametrize("name", sorted(PIL_OPS))
def test_device_randaugment_op_matches_pil(name, photo):
    argument, pil_op = PIL_OPS[name]
    got = device_ops.OP_TABLE[name][0](jnp.asarray(photo, jnp.float32), jnp.float32(argument))
    assert _diff(got, pil_op(Image.fromarray(photo))).max() <= 1


@pytest.mark.parametrize("name,argument,matrix", [
    ("Rotate", 20.0, None), ("ShearX", 0.2, (1, 0.2, 0, 0, 1, 0)), ("ShearY", -0.2, (1, 0, 0, -0.2, 1, 0))])
def test_device_randaugment_geometric_op_matches_pil_bilinear(name, argument, matrix, photo):
    ours = device_ops.OP_TABLE[name][0](jnp.asarray(photo, jnp.float32), jnp.float32(argument))
    assert_matches_pil_bilinear(ours, photo, argument, matrix)
