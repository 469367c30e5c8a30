"""MaskSub: the main branch learns the labels, a corrupted sub-branch of the same network learns the
main branch's (stop-gradient) predictions; one gradient of 0.5 * main + 0.5 * sub per step.

This module knows no model. A model's forward takes the corruption as keyword arguments
(see `models/vit.py`); `corruption` draws them.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from masksub_jax.losses import Loss

MODES = ("none", "masking", "dropout", "droppath")

# (params, images, rng, **corruption) -> logits, in training mode.
Forward = Callable[..., jax.Array]


def num_kept(num_tokens: int, ratio: float) -> int:
    return int(num_tokens * (1 - ratio))


def keep_indices(rng, batch_size: int, num_tokens: int, ratio: float) -> jax.Array:
    """Per example, an independent uniformly random subset of `int(L * (1 - ratio))` token indices
    (MAE's argsort of uniform noise). Static shape (batch_size, len_keep)."""
    noise = jax.random.uniform(rng, (batch_size, num_tokens))
    return jnp.argsort(noise, axis=1)[:, :num_kept(num_tokens, ratio)].astype(jnp.int32)


def corruption(mode: str, ratio: float, rng, batch_size: int, num_tokens: int) -> dict:
    """The forward's keyword arguments that turn the main branch into the sub-branch."""
    if mode == "masking":
        return {"keep_idx": keep_indices(rng, batch_size, num_tokens, ratio)}
    if mode == "dropout":
        return {"dropout_rate": ratio}
    if mode == "droppath":
        return {"drop_path_rate": ratio}
    raise ValueError(f"Unknown MaskSub mode {mode!r}; use one of {MODES}.")


def loss_fn(params, forward: Forward, images, targets, rng, *, loss: Loss, mode: str, ratio: float,
            num_tokens: int):
    """The step's loss. Returns (loss, aux) with aux = dict(logits_main, loss_main, loss_sub)."""
    rng_main, rng_sub, rng_corrupt = jax.random.split(rng, 3)
    logits_main = forward(params, images, rng_main)
    loss_main = loss.fn(logits_main, loss.main_targets(targets))
    if mode == "none" or ratio == 0:  # the plain recipe
        return loss_main, dict(logits_main=logits_main, loss_main=loss_main, loss_sub=jnp.nan)

    corrupt = corruption(mode, ratio, rng_corrupt, images.shape[0], num_tokens)
    logits_sub = forward(params, images, rng_sub, **corrupt)
    teacher = jax.lax.stop_gradient(loss.teacher(logits_main))
    loss_sub = loss.fn(logits_sub, teacher)
    total = 0.5 * loss_main + 0.5 * loss_sub
    return total, dict(logits_main=logits_main, loss_main=loss_main, loss_sub=loss_sub)
