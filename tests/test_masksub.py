"""The method: drawing kept tokens, and the fused gradient of 0.5 * main + 0.5 * sub."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masksub_jax import losses, masksub
from masksub_jax.models import vit


def test_keep_indices_count_range_and_uniqueness():
    keep = np.asarray(masksub.keep_indices(jax.random.PRNGKey(0), 16, 196, 0.5))
    assert keep.shape == (16, 98) and keep.dtype == np.int32
    assert keep.min() >= 0 and keep.max() < 196
    assert all(len(set(row)) == 98 for row in keep)
    assert masksub.num_kept(144, 0.5) == 72 and masksub.num_kept(121, 0.5) == 60
    assert masksub.keep_indices(jax.random.PRNGKey(0), 2, 10, 0.75).shape == (2, 2)  # int(10 * 0.25)


def test_keep_indices_differ_across_examples_and_steps_and_repeat_for_a_key():
    seed = jax.random.PRNGKey(0)
    step1 = np.sort(np.asarray(masksub.keep_indices(jax.random.fold_in(seed, 1), 8, 64, 0.5)), axis=1)
    step2 = np.sort(np.asarray(masksub.keep_indices(jax.random.fold_in(seed, 2), 8, 64, 0.5)), axis=1)
    again = np.sort(np.asarray(masksub.keep_indices(jax.random.fold_in(seed, 1), 8, 64, 0.5)), axis=1)
    assert len({tuple(row) for row in step1}) == 8  # every example its own subset
    assert not np.array_equal(step1, step2)
    np.testing.assert_array_equal(step1, again)


def test_keep_indices_are_uniform_over_tokens():
    keep = np.asarray(masksub.keep_indices(jax.random.PRNGKey(0), 4000, 16, 0.5))
    frequency = np.bincount(keep.ravel(), minlength=16) / 4000
    np.testing.assert_allclose(frequency, 0.5, atol=0.03)


def _setup(drop_path=0.1):
    model = vit.ViT(num_classes=6, variant="mu/4", drop_path=drop_path, layerscale_init=0.5)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(0), images)["params"]
    labels = jnp.arange(8) % 6
    targets = 0.7 * jax.nn.one_hot(labels, 6) + 0.3 * jax.nn.one_hot(labels[::-1], 6)

    def logits(p, x, rng, **corruption):
        rngs = {"dropout": jax.random.fold_in(rng, 0), "droppath": jax.random.fold_in(rng, 1)}
        return model.apply({"params": p}, x, train=True, rngs=rngs, **corruption)
    return logits, params, images, targets


def _stateless(logits):
    """The Forward that masksub takes, for a model without state."""
    return lambda p, state, x, rng, **corruption: (logits(p, x, rng, **corruption), state)


@pytest.mark.parametrize("loss_name", ["bce", "ce"])
@pytest.mark.parametrize("mode", ["masking", "droppath"])
def test_fused_gradient_equals_half_main_plus_half_sub_with_fixed_teacher(loss_name, mode):
    forward, params, images, targets = _setup()
    loss = losses.LOSSES[loss_name]
    rng = jax.random.PRNGKey(7)
    (total, aux), grads = jax.value_and_grad(masksub.loss_fn, has_aux=True)(
        params, {}, _stateless(forward), images, targets, rng, loss=loss, mode=mode, ratio=0.5, num_units=16)

    # Independently: two separate gradients, the sub one against a precomputed, constant teacher.
    rng_main, rng_sub, rng_corrupt = jax.random.split(rng, 3)
    corrupt = masksub.corruption(mode, 0.5, rng_corrupt, 8, 16)
    main_target = (targets > 0).astype(jnp.float32) if loss_name == "bce" else targets
    teacher_probs = (jax.nn.sigmoid if loss_name == "bce" else jax.nn.softmax)(forward(params, images, rng_main))
    main_loss, grad_main = jax.value_and_grad(lambda p: loss.fn(forward(p, images, rng_main), main_target))(params)
    sub_loss, grad_sub = jax.value_and_grad(
        lambda p: loss.fn(forward(p, images, rng_sub, **corrupt), teacher_probs))(params)

    np.testing.assert_allclose(aux["loss_main"], main_loss, rtol=1e-6)
    np.testing.assert_allclose(aux["loss_sub"], sub_loss, rtol=1e-6)
    np.testing.assert_allclose(total, 0.5 * main_loss + 0.5 * sub_loss, rtol=1e-6)
    expected = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, grad_main, grad_sub)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # The teacher really is held fixed: its gradient path would change the result.
    probabilities = jax.nn.sigmoid if loss_name == "bce" else jax.nn.softmax
    _, grad_through_teacher = jax.value_and_grad(
        lambda p: 0.5 * loss.fn(forward(p, images, rng_main), main_target)
        + 0.5 * loss.fn(forward(p, images, rng_sub, **corrupt), probabilities(forward(p, images, rng_main))))(params)
    assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(grad_through_teacher)))


@pytest.mark.parametrize("mode,ratio", [("none", 0.5), ("masking", 0.0)])
def test_plain_recipe_has_no_sub_branch(mode, ratio):
    forward, params, images, targets = _setup()
    loss = losses.LOSSES["ce"]
    rng = jax.random.PRNGKey(7)
    total, aux = masksub.loss_fn(params, {}, _stateless(forward), images, targets, rng, loss=loss, mode=mode,
                                 ratio=ratio,
                                 num_units=16)
    rng_main = jax.random.split(rng, 3)[0]
    np.testing.assert_allclose(total, loss.fn(forward(params, images, rng_main), targets), rtol=1e-6)
    assert np.isnan(aux["loss_sub"])


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown MaskSub mode 'mask'"):
        masksub.corruption("mask", 0.5, jax.random.PRNGKey(0), 2, 4)


@pytest.mark.parametrize("mode", ["masking", "dropout"])
def test_memory_lean_order_gives_the_fused_gradient(mode):
    forward, params, images, targets = _setup()
    kwargs = dict(loss=losses.LOSSES["bce"], mode=mode, ratio=0.5, num_units=16)
    rng = jax.random.PRNGKey(3)
    (total, aux), fused = masksub.grads(params, {}, _stateless(forward), images, targets, rng, **kwargs)
    (total_lean, aux_lean), lean = jax.jit(
        lambda p: masksub.grads(p, {}, _stateless(forward), images, targets, rng, memory_lean=True, **kwargs))(params)
    np.testing.assert_allclose(total_lean, total, rtol=1e-6)
    np.testing.assert_allclose(aux_lean["loss_sub"], aux["loss_sub"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(lean), jax.tree.leaves(fused)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
