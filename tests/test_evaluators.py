"""Extra evaluation sets (ImageNet-V2, ImageNet-ReaL) and the moving average of the weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import linen as nn

from masksub_jax import checkpoint, convert, evaluate, sharding, train
from masksub_jax import config as config_lib
from masksub_jax import step as step_lib
from masksub_jax.data import pipeline, types
from tests.conftest import mock_imagenet, tiny_digits_config


class PixelLogits(nn.Module):
    """Logits = the image's first pixels (with mean 0 and std 1/255 the normalised image is the raw one)."""
    num_classes: int

    def __call__(self, images, *, train: bool):
        return images.reshape(images.shape[0], -1)[:, :self.num_classes]


class Batches:
    """A source of one eval batch."""
    num_classes, num_eval_examples = 5, 6

    def __init__(self, batch):
        self.batch = batch

    def eval_batches(self):
        yield self.batch


def test_real_accuracy_counts_a_prediction_in_the_set_and_leaves_out_empty_sets():
    c = tiny_digits_config("/unused", **{"data.mean": (0.0,), "data.std": (1 / 255,)})
    predicted = [2, 0, 4, 1, 3, 1, 0, 0]
    sets = [{2, 3}, {1}, set(), {1}, {0, 1, 2}, {1}, {0}, set()]  # right, wrong, left out, right, wrong, pad, pad
    image = np.zeros((8, 1, 5, 1), np.uint8)
    image[np.arange(8), 0, predicted, 0] = 200
    label_set = np.zeros((8, 5), bool)
    for i, s in enumerate(sets):
        label_set[i, list(s)] = True
    batch = {"image": image, "label_set": label_set, "mask": np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)}
    mesh = sharding.make_mesh(1)
    evaluator = evaluate.make_evaluator(c, PixelLogits(5), Batches(batch), mesh, sharding.replicated(mesh))
    assert evaluator({}) == {"top1": 2 / 4, "eval_examples": 4}  # 2 right of the 4 real images with a set


def _imagenet_config(**overrides):
    c = config_lib.base()
    c.data.image_size, c.model.variant, c.batch_size, c.eval_batch_size = 16, "mu/8", 8, 8
    c.data.augment, c.data.repeated_aug, c.mixup.mixup_alpha, c.mixup.cutmix_alpha = "crop_flip", 1, 0.0, 0.0
    c.total_steps, c.eval_every_steps, c.log_every_steps, c.checkpoint_every_steps = 2, 0, 1, 2
    return config_lib.override(c, overrides) if overrides else c


def test_imagenet_v2_and_real_are_evaluated_beside_the_validation_split_with_the_ema(tmp_path):
    config = _imagenet_config(**{"data.extra_evals": ("imagenet_v2:test", "imagenet2012_real:validation"),
                                 "ema.decay": 0.5})
    with mock_imagenet(num_examples=12):
        real = tfds.builder("imagenet2012_real").as_data_source("validation")
        with_a_set = sum(len(real[i]["real_label"]) > 0 for i in range(len(real)))
        summary = train.run(config, str(tmp_path))
    assert summary["imagenet_v2/eval_examples"] == 12 and summary["imagenet2012_real/eval_examples"] == with_a_set
    assert "imagenet2012_real/top5" not in summary
    logged = {k for record in summary["history"] for k in record}
    for weights in ("", "ema/"):
        for metric in ("top1", "top5", "imagenet_v2/top1", "imagenet_v2/top5", "imagenet2012_real/top1"):
            assert f"eval/{weights}{metric}" in logged and 0 <= summary[weights + metric] <= 1


def test_a_missing_extra_eval_set_is_named_with_how_to_prepare_it_before_anything_compiles(tmp_path, capsys):
    config = tiny_digits_config(str(tmp_path / "digits"), **{"data.extra_evals": ("imagenet_v2:test",),
                                                             "data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(types.DataNotFoundError, match=r"'imagenet_v2/matched-frequency' is not prepared .*"
                                                         r"python -m masksub_jax.data.prepare --name=imagenet_v2"):
        train.run(config, str(tmp_path / "run"))
    assert "compiling" not in capsys.readouterr().out
    with mock_imagenet(num_examples=4), pytest.raises(ValueError, match="has 1000 classes, the model 10"):
        pipeline.make_extra_evals(config, [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="data.extra_evals.*'TFDS_NAME:SPLIT'"):
        config_lib.validate(tiny_digits_config("/unused", **{"data.extra_evals": ("imagenet_v2",)}))


def test_the_moving_average_equals_a_numpy_recursion_over_5_steps_and_skips_a_nonfinite_step():
    decay = 0.8
    c = tiny_digits_config("/unused", batch_size=8, **{"ema.decay": decay})
    model = step_lib.make_model(c, 10)
    tx, schedule = step_lib.make_optimizer(c, total_steps=10, steps_per_epoch=10)
    state = jax.jit(step_lib.make_init(model, tx, (8, 8, 1), ema=True))(jax.random.PRNGKey(0))
    train_step = jax.jit(step_lib.make_train_step(c, model, tx, schedule, 10))
    rng = np.random.default_rng(0)
    want = jax.device_get(state["params"])
    np.testing.assert_array_equal(jax.tree.leaves(state["ema"]["params"])[0], jax.tree.leaves(want)[0])
    for step in range(6):
        batch = {"image": rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8),
                 "label": rng.integers(0, 10, 8).astype(np.int32)}
        if step == 3:  # a NaN loss: neither the weights nor their average move
            poisoned = jax.tree.map(jnp.copy, state)
            poisoned["params"]["head"]["bias"] = poisoned["params"]["head"]["bias"].at[0].set(jnp.nan)
            after, metrics = train_step(poisoned, batch, jax.random.PRNGKey(step))
            assert float(metrics["nonfinite"]) == 1
            for a, b in zip(jax.tree.leaves(after["ema"]), jax.tree.leaves(state["ema"])):
                np.testing.assert_array_equal(a, b)
            continue
        state, _ = train_step(state, batch, jax.random.PRNGKey(step))
        params = jax.device_get(state["params"])
        want = jax.tree.map(lambda e, p: np.float32(decay) * e + np.float32(1 - decay) * p, want, params)
    assert int(state["step"]) == 5
    for got, expected in zip(jax.tree.leaves(state["ema"]["params"]), jax.tree.leaves(want), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(want)[0], jax.tree.leaves(params)[0])  # an average, not the weights


def test_the_average_of_a_run_started_from_other_weights_starts_at_those_weights(digits_dir, tmp_path):
    config = tiny_digits_config(digits_dir, total_steps=1, checkpoint_every_steps=1, **{"ema.decay": 0.25})
    initial = jax.device_get(step_lib.make_model(config, 10).init(jax.random.PRNGKey(5), jnp.zeros((1, 8, 8, 1))))
    convert.save_variables(initial, str(tmp_path / "init"))
    config.init_from = str(tmp_path / "init")
    train.run(config, str(tmp_path / "run"))
    trained, average = (checkpoint.load_variables(str(tmp_path / "run"), ema=ema) for ema in (False, True))
    for got, p0, p1 in zip(*(jax.tree.leaves(v) for v in (average, initial, trained)), strict=True):
        np.testing.assert_allclose(got, 0.25 * p0 + 0.75 * p1, rtol=1e-6, atol=1e-7)
