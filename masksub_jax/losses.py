"""The two losses of the recipes, each with the teacher that MaskSub's sub-branch learns from.

bce: DeiT-III. Mean binary cross-entropy over batch and classes; the main branch learns the mixup
     target binarised (both mixed classes are 1), the sub-branch the sigmoid of the main logits.
bce_soft: timm's BinaryCrossEntropy as the RSB recipe runs it: the same loss, the main branch learns
     the mixed target as it is (soft), the sub-branch the sigmoid of the main logits.
ce:  soft-target cross-entropy (timm's SoftTargetCrossEntropy); the sub-branch learns the softmax
     of the main logits.
"""
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class Loss(NamedTuple):
    fn: Callable[[jax.Array, jax.Array], jax.Array]  # (logits, soft targets) -> scalar
    main_targets: Callable[[jax.Array], jax.Array]  # mixed label distribution -> main-branch target
    teacher: Callable[[jax.Array], jax.Array]  # main logits -> sub-branch target (before stop_gradient)


def bce(logits, targets):
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def soft_target_ce(logits, targets):
    return jnp.sum(-targets * jax.nn.log_softmax(logits, axis=-1), axis=-1).mean()


LOSSES = {
    "bce": Loss(bce, main_targets=lambda t: (t > 0).astype(t.dtype), teacher=jax.nn.sigmoid),
    "bce_soft": Loss(bce, main_targets=lambda t: t, teacher=jax.nn.sigmoid),
    "ce": Loss(soft_target_ce, main_targets=lambda t: t, teacher=jax.nn.softmax),
}
