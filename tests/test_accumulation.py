"""Gradient accumulation: a step over 4 micro-batches is the full-batch step."""
import jax
import numpy as np
import pytest

from masksub_jax import step as step_lib
from masksub_jax import train
from tests.conftest import tiny_digits_config


def _one_step(accum_steps: int, memory_lean: bool = False, drop: float = 0.0):
    config = tiny_digits_config("/unused", batch_size=16, loss="bce", label_smoothing=0.0, accum_steps=accum_steps,
                                **{"model.variant": "mu/4", "data.image_size": 16, "data.mean": (0.5,) * 3,
                                   "data.std": (0.5,) * 3, "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0,
                                   "masksub.memory_lean": memory_lean, "optim.name": "lamb",
                                   "model.drop_path": drop, "model.dropout": drop})
    model = step_lib.make_model(config, 10)
    tx, schedule = step_lib.make_optimizer(config, total_steps=10, steps_per_epoch=10)
    state = jax.jit(step_lib.make_init(model, tx, (16, 16, 3)))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    step = jax.jit(step_lib.make_train_step(config, model, tx, schedule, 10))
    return step(state, batch, jax.random.PRNGKey(3))


@pytest.mark.parametrize("accum_steps, memory_lean, drop", [(4, False, 0.0), (2, True, 0.0), (2, False, 0.3)])
def test_accumulated_step_equals_the_full_batch_step(accum_steps, memory_lean, drop):
    """With drop-path and dropout too: each example draws its masks by its index in the whole batch."""
    full_state, full = _one_step(1, drop=drop)
    state, metrics = _one_step(accum_steps, memory_lean, drop)
    for key in ("loss", "loss_main", "loss_sub", "grad_norm", "accuracy"):
        assert float(metrics[key]) == pytest.approx(float(full[key]), rel=1e-5), key
    # LAMB divides by the gradient's running RMS, which turns rounding in a near-zero gradient into
    # an update difference; 1e-6 is 0.02% of this step's update size (about lr = 5e-3).
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(full_state["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_accum_steps_that_do_not_divide_the_batch_are_a_clear_error(digits_dir, tmp_path):
    with pytest.raises(ValueError, match="accum_steps=3 is invalid: must divide batch_size=64"):
        train.run(tiny_digits_config(digits_dir, accum_steps=3), str(tmp_path))


def test_trainer_runs_with_accumulation(digits_dir, tmp_path):
    summary = train.run(tiny_digits_config(digits_dir, accum_steps=2, total_steps=20, batch_size=128), str(tmp_path))
    assert summary["step"] == 20 and summary["top1"] > 0.2  # 10 classes: chance is 0.1
