"""MaskSub: the main branch learns the labels, a corrupted sub-branch of the same network learns the
main branch's (stop-gradient) predictions; one gradient of 0.5 * main + 0.5 * sub per step.

This module knows no model. A model's forward takes the corruption as keyword arguments
(masksub_jax/models/__init__.py); `corruption` draws them over the model's masking units (ViT's patch
tokens, Swin's blocks of pixels, ResNet's squares of pixels). A model with state that training
updates (ResNet's BatchNorm statistics) gets it from the main branch, then from the sub-branch.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

from masksub_jax.losses import Loss

MODES = ("none", "masking", "dropout", "droppath")

# (params, model_state, images, rng, **corruption) -> (logits, updated model_state), in training mode.
# model_state: the model's collections other than params ({} for a stateless model).
Forward = Callable[..., tuple]


def num_kept(num_units: int, ratio: float) -> int:
    return int(num_units * (1 - ratio))


def keep_indices(rng, batch_size: int, num_units: int, ratio: float, first_example=0) -> jax.Array:
    """Per example, an independent uniformly random subset of `int(L * (1 - ratio))` token indices
    (MAE's argsort of uniform noise). Static shape (batch_size, len_keep).

    Example j's noise comes from fold_in(rng, first_example + j), so a batch split into micro-batches
    (with their offsets) gets the same subsets as the whole batch."""
    keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(first_example + jnp.arange(batch_size))
    noise = jax.vmap(lambda key: jax.random.uniform(key, (num_units,)))(keys)
    return jnp.argsort(noise, axis=1)[:, :num_kept(num_units, ratio)].astype(jnp.int32)


def corruption(mode: str, ratio: float, rng, batch_size: int, num_units: int, first_example=0) -> dict:
    """The forward's keyword arguments that turn the main branch into the sub-branch."""
    if mode == "masking":
        return {"keep_idx": keep_indices(rng, batch_size, num_units, ratio, first_example)}
    if mode == "dropout":
        return {"dropout_rate": ratio}
    if mode == "droppath":
        return {"drop_path_rate": ratio}
    raise ValueError(f"Unknown MaskSub mode {mode!r}; use one of {MODES}.")


def branch_rngs(rng):
    """The (main, sub, corruption) keys that `branches` draws from the step's loss key `rng`."""
    return jax.random.split(rng, 3)


def branches(forward: Forward, images, targets, rng, *, loss: Loss, mode: str, ratio: float, num_units: int,
             first_example=0):
    """The two branches' losses as functions of the parameters, with the step's randomness fixed:
    main(params, model_state) -> (loss_main, (logits_main, model_state)) and
    sub(params, model_state, teacher) -> (loss_sub, model_state). `first_example`: the index of
    images[0] in the step's batch (see `keep_indices`)."""
    rng_main, rng_sub, rng_corrupt = branch_rngs(rng)

    def main(params, model_state):
        logits, model_state = forward(params, model_state, images, rng_main)
        return loss.fn(logits, loss.main_targets(targets)), (logits, model_state)

    def sub(params, model_state, teacher):
        corrupt = corruption(mode, ratio, rng_corrupt, images.shape[0], num_units, first_example)
        logits, model_state = forward(params, model_state, images, rng_sub, **corrupt)
        return loss.fn(logits, teacher), model_state
    return main, sub


def _is_plain(mode: str, ratio: float) -> bool:
    return mode == "none" or ratio == 0


def loss_fn(params, model_state, forward: Forward, images, targets, rng, *, loss: Loss, mode: str, ratio: float,
            num_units: int, first_example=0):
    """The step's loss. Returns (loss, aux) with aux = dict(logits_main, loss_main, loss_sub, model_state)."""
    main, sub = branches(forward, images, targets, rng, loss=loss, mode=mode, ratio=ratio, num_units=num_units,
                         first_example=first_example)
    loss_main, (logits_main, model_state) = main(params, model_state)
    if _is_plain(mode, ratio):
        return loss_main, dict(logits_main=logits_main, loss_main=loss_main, loss_sub=jnp.nan, model_state=model_state)
    teacher = jax.lax.stop_gradient(loss.teacher(logits_main))
    loss_sub, model_state = sub(params, model_state, teacher)
    return 0.5 * loss_main + 0.5 * loss_sub, dict(logits_main=logits_main, loss_main=loss_main, loss_sub=loss_sub,
                                                  model_state=model_state)


def grads(params, model_state, forward: Forward, images, targets, rng, *, loss: Loss, mode: str, ratio: float,
          num_units: int, memory_lean: bool = False, first_example=0):
    """((loss, aux), gradient) of `loss_fn`.

    memory_lean: the official order instead of one fused backward. The main branch's gradient is
    computed first, then the sub-branch's; an optimization barrier keeps XLA from starting the sub
    forward before the main backward, so the main activations are freed first and peak memory is
    about that of the plain recipe. Same result, up to float rounding.
    """
    kwargs = dict(loss=loss, mode=mode, ratio=ratio, num_units=num_units, first_example=first_example)
    if not memory_lean or _is_plain(mode, ratio):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, forward, images, targets, rng, **kwargs)

    main, sub = branches(forward, images, targets, rng, **kwargs)
    (loss_main, (logits_main, model_state)), grad_main = jax.value_and_grad(main, has_aux=True)(params, model_state)
    teacher = jax.lax.stop_gradient(loss.teacher(logits_main))
    grad_main, params, model_state, teacher = jax.lax.optimization_barrier((grad_main, params, model_state, teacher))
    (loss_sub, model_state), grad_sub = jax.value_and_grad(sub, has_aux=True)(params, model_state, teacher)
    grad = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, grad_main, grad_sub)
    aux = dict(logits_main=logits_main, loss_main=loss_main, loss_sub=loss_sub, model_state=model_state)
    return (0.5 * loss_main + 0.5 * loss_sub, aux), grad
