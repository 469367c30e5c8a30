"""Losses, teachers and mixup / cutmix against direct NumPy computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masksub_jax import losses
from masksub_jax.augment import mixing


def test_bce_is_the_mean_over_batch_and_classes_with_binarised_main_targets():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)
    mixed = np.array([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0]], np.float32)
    bce = losses.LOSSES["bce"]
    binary = np.asarray(bce.main_targets(jnp.asarray(mixed)))
    np.testing.assert_array_equal(binary, [[1, 1, 0], [0, 1, 0]])
    p = 1 / (1 + np.exp(-logits))
    want = np.mean(-(binary * np.log(p) + (1 - binary) * np.log(1 - p)))
    np.testing.assert_allclose(bce.fn(logits, binary), want, rtol=1e-6)
    np.testing.assert_allclose(bce.teacher(logits), p, rtol=1e-6)


def test_soft_target_ce_and_softmax_teacher():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)
    targets = np.array([[0.7, 0.3, 0.0], [0.1, 0.8, 0.1]], np.float32)
    ce = losses.LOSSES["ce"]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(ce.fn(logits, ce.main_targets(targets)), np.mean(-(targets * log_p).sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(ce.teacher(logits), np.exp(log_p), rtol=1e-6)


def test_label_smoothing_values():
    t = np.asarray(mixing.smoothed_one_hot(jnp.array([2]), 5, 0.1))
    np.testing.assert_allclose(t, [[0.02, 0.02, 0.92, 0.02, 0.02]], rtol=1e-6)


def _images(batch=6, size=16):
    # Example i is constant i + 1, so every pixel says where it came from.
    return jnp.broadcast_to(jnp.arange(1, batch + 1, dtype=jnp.float32)[:, None, None, None], (batch, size, size, 3))


def test_mixup_blends_with_the_reversed_batch_with_one_lambda():
    images, labels = _images(), jnp.arange(6)
    mixed, targets = mixing.mix(jax.random.PRNGKey(0), images, labels, num_classes=6, mixup_alpha=0.8,
                                cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.0)
    lam = float(targets[0, 0])
    assert 0 < lam < 1
    want = lam * images + (1 - lam) * images[::-1]
    np.testing.assert_allclose(mixed, want, rtol=1e-5)
    want_targets = lam * np.eye(6) + (1 - lam) * np.eye(6)[::-1]
    np.testing.assert_allclose(targets, want_targets, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_a_box_of_the_partner_and_lambda_is_its_complement(seed):
    images, labels = _images(), jnp.arange(6)
    mixed, targets = mixing.mix(jax.random.PRNGKey(seed), images, labels, num_classes=6, mixup_alpha=0.0,
                                cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0)
    mixed = np.asarray(mixed)
    for i in range(6):
        own = mixed[i] == i + 1
        partner = mixed[i] == 6 - i
        assert np.all(own | partner)
        if i != 5 - i:
            np.testing.assert_allclose(targets[i, i], own.mean(), rtol=1e-5)  # lambda = kept area
            np.testing.assert_allclose(targets[i, 5 - i], partner.mean(), rtol=1e-5)
    # the pasted region is one box, the same for the whole batch
    box = mixed[0, :, :, 0] == 6
    rows, cols = np.where(box)
    if rows.size:
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    np.testing.assert_array_equal(mixed[1, :, :, 0] == 5, box)


def test_switch_chooses_cutmix_with_its_probability():
    images, labels = _images(), jnp.arange(6)
    uses_cutmix = []
    for seed in range(200):
        mixed, _ = mixing.mix(jax.random.PRNGKey(seed), images, labels, num_classes=6, mixup_alpha=0.8,
                              cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0)
        uses_cutmix.append(bool(np.isin(np.asarray(mixed[0]), [1.0, 6.0]).all()))
    assert 0.35 < np.mean(uses_cutmix) < 0.65


def test_no_mixing_gives_smoothed_one_hot():
    images, labels = _images(), jnp.arange(6)
    mixed, targets = mixing.mix(jax.random.PRNGKey(0), images, labels, num_classes=6, mixup_alpha=0.0,
                                cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.1)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_allclose(targets, mixing.smoothed_one_hot(labels, 6, 0.1))
