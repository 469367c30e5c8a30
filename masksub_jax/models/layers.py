"""Layers that several families share: dense/conv inits, per-example dropout and drop-path, the MLP."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

dense_init = nn.initializers.truncated_normal(0.02)
# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)), which DeiT-III and timm's Swin keep
# for the patch embedding: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def per_example_mask(key, example_ids, keep_prob: float, shape) -> jax.Array:
    """Bernoulli(keep_prob) masks of `shape` (batch first), example j's drawn from
    fold_in(key, example_ids[j]): the same whether the batch is whole or split into micro-batches."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
    return jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, shape[1:]))(keys)


class Dropout(nn.Module):
    """Elementwise dropout whose mask is drawn per example (see `per_example_mask`)."""
    rate: float
    rng_collection = "dropout"

    def mask_shape(self, x):
        return x.shape

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        mask = per_example_mask(self.make_rng(self.rng_collection), example_ids, keep_prob, self.mask_shape(x))
        return jnp.where(mask, x / keep_prob, 0.0).astype(x.dtype)


class DropPath(Dropout):
    """Stochastic depth: drops the whole residual branch per example, rescales the kept ones."""
    rng_collection = "droppath"

    def mask_shape(self, x):
        return (x.shape[0],) + (1,) * (x.ndim - 1)


def quick_gelu(x):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=False), "quick_gelu": quick_gelu}


class Mlp(nn.Module):
    """fc1 -> activation (exact GELU, or CLIP's QuickGELU) -> dropout -> fc2 -> dropout, on the last axis."""
    hidden: int
    dropout: float
    dtype: Any
    act: str = "gelu"

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids):
        width = x.shape[-1]
        x = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[self.act](x)
        x = Dropout(self.dropout)(x, deterministic, example_ids)
        x = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="fc2")(x)
        return Dropout(self.dropout)(x, deterministic, example_ids)


def keep_blocks(x, keep_idx, block: int, fill):
    """x (B, H, W, C) with every position of the `block` x `block` squares not in `keep_idx` (B, kept;
    row-major over the grid of squares) set to `fill` (C,): Swin's mask tokens, ResNet's zeros."""
    batch, h, w, _ = x.shape
    rows, cols = h // block, w // block
    kept = jnp.zeros((batch, rows * cols), bool).at[jnp.arange(batch)[:, None], keep_idx].set(True)
    kept = jnp.broadcast_to(kept.reshape(batch, rows, 1, cols, 1), (batch, rows, block, cols, block))
    return jnp.where(kept.reshape(batch, h, w, 1), x, jnp.asarray(fill, x.dtype))
