"""DeiT-III Vision Transformer (Touvron et al., 2022) in Flax Linen.

Matches timm's `deit3_*` models: pre-LN blocks with LayerScale, LayerNorm eps 1e-6, qkv bias, exact
GELU, drop-path constant over depth, a position embedding without a cls slot, and the head on the
final-LN cls token.

How MaskSub corrupts the input of this model (the sub-branch forward):
  masking:   `keep_idx` (batch, len_keep) patch indices; the other patch tokens are dropped after the
             position embedding, the cls token is always kept.
  dropout:   `dropout_rate` replaces the dropout of the attention projection and both MLP layers.
  droppath:  `drop_path_rate` replaces the drop-path rate of every block.
`first_example`: the index of images[0] in the step's batch; dropout and drop-path masks are drawn
per example from it, so a batch split into micro-batches draws what the whole batch would.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# name -> (width, depth, heads). Patch size comes after the slash: "B/16".
VARIANTS = {
    "mu": (64, 4, 4),  # the embedded digits default; not a published model
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}

_dense_init = nn.initializers.truncated_normal(0.02)
# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)), which DeiT-III keeps for the patch
# embedding: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def parse_variant(variant: str) -> tuple[int, int, int, int]:
    """'B/16' -> (width, depth, heads, patch). Raises ValueError naming the known variants."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
        raise ValueError(
            f"Unknown ViT variant {variant!r}: use NAME/PATCH with NAME one of "
            f"{sorted(VARIANTS)} and PATCH a positive integer, e.g. 'B/16' or 'H/14'.")
    return (*VARIANTS[name], int(patch))


def num_patches(image_size: int, patch_size: int) -> int:
    return (image_size // patch_size) ** 2


# cuDNN's fused attention takes sequence lengths that are a multiple of this; ViT's (197, 145, and
# the sub-branch's 99) are not, so they are padded and the padding masked out.
CUDNN_SEQ_MULTIPLE = 8


def padded_attention(q, k, v, *, multiple: int, implementation: str | None = None):
    """Softmax attention over (batch, tokens, heads, head_dim), computed on the tokens padded to a
    multiple of `multiple` with the padded keys masked out; equal to attention on the unpadded tokens."""
    batch, tokens = q.shape[:2]
    padded = -(-tokens // multiple) * multiple
    pad = ((0, 0), (0, padded - tokens), (0, 0), (0, 0))
    lengths = jnp.full((batch,), tokens, jnp.int32)
    out = jax.nn.dot_product_attention(*(jnp.pad(x, pad) for x in (q, k, v)), query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :tokens]


def attention(q, k, v):
    """cuDNN's fused (flash) attention on GPUs in 16-bit precision, XLA's attention elsewhere.

    Measured on an H100, ViT-B/16 192 px batch 256 bf16: the whole MaskSub step 1.21x faster and
    3.7 GiB less memory than XLA's attention (BENCHMARKS.md).
    """
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return padded_attention(q, k, v, multiple=CUDNN_SEQ_MULTIPLE, implementation="cudnn")
        except (NotImplementedError, RuntimeError):  # no cuDNN or a GPU it does not support: checked when traced
            pass
    return jax.nn.dot_product_attention(q, k, v)


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


class Attention(nn.Module):
    num_heads: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, kernel_init=_dense_init, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 3, axis=2)
        out = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        out = nn.Dense(width, kernel_init=_dense_init, dtype=self.dtype, name="proj")(out.reshape(batch, tokens, width))
        return Dropout(self.dropout)(out, deterministic, example_ids)


class Mlp(nn.Module):
    hidden: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids):
        width = x.shape[-1]
        x = nn.Dense(self.hidden, kernel_init=_dense_init, dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = Dropout(self.dropout)(x, deterministic, example_ids)
        x = nn.Dense(width, kernel_init=_dense_init, dtype=self.dtype, name="fc2")(x)
        return Dropout(self.dropout)(x, deterministic, example_ids)


class Block(nn.Module):
    """x + drop_path(gamma_1 * attn(norm1(x))), then the same with the MLP."""
    num_heads: int
    mlp_dim: int
    dropout: float
    drop_path: float
    layerscale_init: float
    dtype: Any

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids):
        width = x.shape[-1]
        scale_init = nn.initializers.constant(self.layerscale_init)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, self.dropout, self.dtype, name="attn")(y, deterministic, example_ids)
        y = self.param("gamma_1", scale_init, (width,)).astype(self.dtype) * y
        x = x + DropPath(self.drop_path)(y, deterministic, example_ids)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = Mlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(y, deterministic, example_ids)
        y = self.param("gamma_2", scale_init, (width,)).astype(self.dtype) * y
        return x + DropPath(self.drop_path)(y, deterministic, example_ids)


class ViT(nn.Module):
    """DeiT-III ViT on normalised images (batch, H, W, C); returns float32 logits (batch, num_classes).

    `dtype` is the compute dtype (bfloat16 for mixed precision); parameters stay float32.
    """
    num_classes: int
    variant: str = "S/16"
    drop_path: float = 0.0
    dropout: float = 0.0
    layerscale_init: float = 1e-4
    mlp_ratio: int = 4
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False, keep_idx: Optional[jax.Array] = None,
                 dropout_rate: Optional[float] = None, drop_path_rate: Optional[float] = None, first_example=0):
        width, depth, heads, patch = parse_variant(self.variant)
        if images.shape[1] % patch or images.shape[2] % patch:
            raise ValueError(f"Image size {images.shape[1:3]} is not divisible by the patch size {patch} "
                             f"of ViT-{self.variant}; pick an image size that is a multiple of {patch}.")
        x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                    kernel_init=_conv_init, dtype=self.dtype, name="patch_embed")(images)
        batch = x.shape[0]
        x = x.reshape(batch, -1, width)
        x = x + self.param("pos_embed", _dense_init, (1, x.shape[1], width)).astype(self.dtype)
        if keep_idx is not None:  # MaskSub token dropping: each example keeps its own subset.
            x = jnp.take_along_axis(x, keep_idx[:, :, None], axis=1)
        cls = self.param("cls_token", _dense_init, (1, 1, width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), x], axis=1)

        # Dropout and drop-path draw per example, keyed by its index in the step's batch.
        example_ids = first_example + jnp.arange(batch)
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        dropout = self.dropout if dropout_rate is None else dropout_rate
        drop_path = self.drop_path if drop_path_rate is None else drop_path_rate
        for i in range(depth):
            x = block(heads, self.mlp_ratio * width, dropout, drop_path, self.layerscale_init, self.dtype,
                      name=f"blocks_{i}")(x, not train, example_ids)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        logits = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype, name="head")(x[:, 0])
        return logits.astype(jnp.float32)
