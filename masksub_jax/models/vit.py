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
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax.models.layers import Dropout, DropPath, Mlp, conv_init, dense_init
from masksub_jax.models.weights import ConversionError, flatten, linear_to_ours, linear_to_timm, listed, nest

# name -> (width, depth, heads). Patch size comes after the slash: "B/16".
VARIANTS = {
    "mu": (64, 4, 4),  # the embedded digits default; not a published model
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}



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


class Attention(nn.Module):
    num_heads: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, kernel_init=dense_init, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 3, axis=2)
        out = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        out = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="proj")(out.reshape(batch, tokens, width))
        return Dropout(self.dropout)(out, deterministic, example_ids)


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
                    kernel_init=conv_init, dtype=self.dtype, name="patch_embed")(images)
        batch = x.shape[0]
        x = x.reshape(batch, -1, width)
        x = x + self.param("pos_embed", dense_init, (1, x.shape[1], width)).astype(self.dtype)
        if keep_idx is not None:  # MaskSub token dropping: each example keeps its own subset.
            x = jnp.take_along_axis(x, keep_idx[:, :, None], axis=1)
        cls = self.param("cls_token", dense_init, (1, 1, width))
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
        logits = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name="head")(x[:, 0])
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# The family interface (masksub_jax/models/__init__.py).
NO_DECAY = ("pos_embed", "cls_token")


def describe(config) -> str:
    return f"ViT-{config.model.variant}"


def check(config) -> None:
    try:
        patch = parse_variant(config.model.variant)[3]
    except ValueError as e:
        raise ValueError(f"Config model.variant={config.model.variant!r} is invalid: {e}") from None
    size = config.data.image_size
    if size <= 0 or size % patch:
        raise ValueError(f"Config data.image_size={size!r} is invalid: must be a positive multiple of the patch "
                         f"size {patch} of model.variant={config.model.variant!r}.")


def build(config, num_classes: int) -> ViT:
    m = config.model
    return ViT(num_classes=num_classes, variant=m.variant, drop_path=m.drop_path, dropout=m.dropout,
               layerscale_init=m.layerscale_init, remat=m.remat, dtype=jnp.dtype(m.dtype))


def num_units(config) -> int:
    """MaskSub's masking keeps or drops patch tokens."""
    return num_patches(config.data.image_size, parse_variant(config.model.variant)[3])


def forward_flops(config, num_classes: int, kept_units: int | None = None) -> float:
    """Matmul FLOPs of one image's forward pass; `kept_units` patch tokens enter the blocks."""
    width, depth, _, patch = parse_variant(config.model.variant)
    patches = num_units(config)
    n = 1 + (patches if kept_units is None else kept_units)
    embed = 2 * patches * patch * patch * len(config.data.mean) * width
    block = 24 * n * width * width + 4 * n * n * width  # qkv, proj, mlp; scores and weighted sum
    return embed + depth * block + 2 * width * num_classes


# --------------------------------------------------------------------------------------------------
# timm weights: DeiT-III (timm deit3_*: pos_embed without a cls slot, LayerScale `ls1.gamma`), MAE and
# augreg (pos_embed with a cls slot, folded into our cls token, which is exact since the slot is only
# ever added to it; no LayerScale, our gammas are 1).
_BLOCK = {
    "norm1/scale": "norm1.weight", "norm1/bias": "norm1.bias",
    "norm2/scale": "norm2.weight", "norm2/bias": "norm2.bias",
    "attn/qkv/kernel": "attn.qkv.weight", "attn/qkv/bias": "attn.qkv.bias",
    "attn/proj/kernel": "attn.proj.weight", "attn/proj/bias": "attn.proj.bias",
    "mlp/fc1/kernel": "mlp.fc1.weight", "mlp/fc1/bias": "mlp.fc1.bias",
    "mlp/fc2/kernel": "mlp.fc2.weight", "mlp/fc2/bias": "mlp.fc2.bias",
    "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma",
}
_TOP = {"norm/scale": "norm.weight", "norm/bias": "norm.bias", "head/kernel": "head.weight",
        "head/bias": "head.bias", "patch_embed/kernel": "patch_embed.proj.weight",
        "patch_embed/bias": "patch_embed.proj.bias", "cls_token": "cls_token", "pos_embed": "pos_embed"}
# Keys of timm checkpoints that carry no parameters of this architecture and are dropped silently.
_IGNORED = re.compile(r"^(pos_drop|patch_drop|norm_pre|fc_norm)\.|\.num_batches_tracked$")


def _names(depth: int) -> dict[str, str]:
    names = dict(_TOP)
    for i in range(depth):
        names.update({f"blocks_{i}/{ours}": f"blocks.{i}.{theirs}" for ours, theirs in _BLOCK.items()})
    return names


def resize_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
    """(1, g*g, D) patch position embeddings resampled to (1, grid*grid, D) as timm does (bicubic,
    antialiased when shrinking)."""
    old = int(round(np.sqrt(pos_embed.shape[1])))
    if old * old != pos_embed.shape[1]:
        raise ConversionError(f"pos_embed has {pos_embed.shape[1]} patch positions, not a square grid.")
    if old == grid:
        return pos_embed
    table = jnp.asarray(pos_embed.reshape(old, old, -1), jnp.float32)
    resized = jax.image.resize(table, (grid, grid, table.shape[-1]), "bicubic", antialias=True)
    return np.asarray(resized).reshape(1, grid * grid, -1).astype(pos_embed.dtype)


def from_timm(state_dict, *, variant: str, image_size: int, num_classes: int | None = None) -> dict:
    """A timm ViT / DeiT-III / MAE / augreg state dict (name -> array) as our parameter tree.

    The head is left out when the checkpoint has none or `num_classes` differs from it; the trainer
    then keeps its freshly initialised head. Raises ConversionError naming missing, unexpected and
    misshapen keys.
    """
    width, depth, _, patch = parse_variant(variant)
    sd = {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not _IGNORED.search(k)}
    if "fc_norm.weight" in state_dict or "fc_norm.bias" in state_dict:
        raise ConversionError("This checkpoint pools tokens with fc_norm (global pooling); our ViT reads the "
                              "cls token. Use a cls-token checkpoint (DeiT-III, MAE pretraining, augreg).")
    names = _names(depth)
    has_layerscale = "blocks.0.ls1.gamma" in sd
    has_head = "head.weight" in sd and (num_classes is None or sd["head.weight"].shape[0] == num_classes)
    expected = {theirs for ours, theirs in names.items()
                if (has_layerscale or not ours.startswith("blocks_") or "gamma" not in ours)
                and (has_head or not ours.startswith("head/"))}
    missing = set(expected) - set(sd)
    unexpected = set(sd) - expected - ({"head.weight", "head.bias"} if not has_head else set())
    if missing or unexpected:
        raise ConversionError(f"The checkpoint does not fit ViT-{variant}: missing keys {listed(missing)}, "
                              f"unexpected keys {listed(unexpected)}. Check --variant (width {width}, "
                              f"depth {depth}, patch {patch}).")
    params = {}
    for ours, theirs in names.items():
        if ours.startswith("head/") and not has_head:
            continue
        if theirs not in sd:
            if "gamma" in ours:  # no LayerScale: a gamma of 1 is the identity
                params[ours] = np.ones(width, np.float32)
            continue
        params[ours] = linear_to_ours(ours, sd[theirs]).astype(np.float32)

    pos, cls = params["pos_embed"], params["cls_token"]
    grid = image_size // patch
    if pos.shape[1] == int(round(np.sqrt(pos.shape[1] - 1))) ** 2 + 1:  # a cls slot (MAE, augreg)
        params["cls_token"] = cls + pos[:, :1]
        pos = pos[:, 1:]
    params["pos_embed"] = resize_pos_embed(pos, grid)
    wanted = _expected_shapes(width, depth, patch, params.get("patch_embed/kernel", np.zeros((1, 1, 3))).shape[2],
                              params.get("head/kernel", np.zeros((1, 0))).shape[1], grid)
    wrong = [f"{k}: {params[k].shape} (ViT-{variant} wants {s})" for k, s in wanted.items()
             if k in params and params[k].shape != s]
    if wrong:
        raise ConversionError(f"Shapes do not fit ViT-{variant}: {'; '.join(wrong[:6])}.")
    return nest(params)


def _expected_shapes(width, depth, patch, channels, num_classes, grid) -> dict[str, tuple]:
    shapes = {"patch_embed/kernel": (patch, patch, channels, width), "patch_embed/bias": (width,),
              "cls_token": (1, 1, width), "pos_embed": (1, grid * grid, width), "norm/scale": (width,),
              "norm/bias": (width,), "head/kernel": (width, num_classes), "head/bias": (num_classes,)}
    block = {"norm1/scale": (width,), "norm1/bias": (width,), "norm2/scale": (width,), "norm2/bias": (width,),
             "attn/qkv/kernel": (width, 3 * width), "attn/qkv/bias": (3 * width,),
             "attn/proj/kernel": (width, width), "attn/proj/bias": (width,),
             "mlp/fc1/kernel": (width, 4 * width), "mlp/fc1/bias": (4 * width,),
             "mlp/fc2/kernel": (4 * width, width), "mlp/fc2/bias": (width,), "gamma_1": (width,), "gamma_2": (width,)}
    for i in range(depth):
        shapes.update({f"blocks_{i}/{k}": v for k, v in block.items()})
    return shapes


def to_timm(params) -> dict[str, np.ndarray]:
    """Our parameters as a timm DeiT-III state dict (`timm.create_model('deit3_...')` loads it with
    `load_state_dict`; pos_embed without a cls slot)."""
    flat = flatten(params)
    depth = len({k.split("/")[0] for k in flat if k.startswith("blocks_")})
    names = _names(depth)
    unknown = set(flat) - set(names)
    if unknown:
        raise ConversionError(f"Not parameters of our ViT: {listed(unknown)}.")
    return {names[k]: np.ascontiguousarray(linear_to_timm(k, v)) for k, v in flat.items()}


def adapt(name: str, loaded: np.ndarray, initial: np.ndarray, say) -> np.ndarray | None:
    """config.init_from: pos_embed is resampled to the configured grid."""
    if name == "pos_embed" and loaded.shape != initial.shape:
        resized = resize_pos_embed(loaded, int(round(np.sqrt(initial.shape[1]))))
        say(f"init_from: resampled pos_embed from {loaded.shape} to {resized.shape}.")
        return resized
    return loaded if loaded.shape == initial.shape else None
