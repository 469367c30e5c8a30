"""BEiT v2 (Peng et al., 2022) fine-tuning ViT in Flax Linen, as timm's `Beit` (timm/models/beit.py)
with beitv2_base_patch16_224's layout.

Pre-LN blocks with LayerScale (gamma_1 / gamma_2), LayerNorm eps 1e-6, exact GELU, a qkv projection
without bias plus separate q_bias and v_bias (the key has none), a relative position bias in every
block's attention (a (num_relative_distance, heads) table per block, with three extra rows for
cls-to-token, token-to-cls and cls-to-cls; the index into it is computed, not a parameter), no
absolute position embedding, a cls token, the mean of the patch tokens, fc_norm, the head.
Drop-path rises linearly over depth from 0 to `drop_path` (BEiT's and timm's rule).

How MaskSub corrupts the input of this model (the sub-branch forward):
  masking:   `keep_idx` (batch, kept) patch indices; the other patch tokens are dropped after the
             patch embedding (there is no position embedding), the cls token is always kept. Each
             block's relative position bias is gathered for [cls] + the kept positions of each
             example, so a kept token keeps its bias towards every other kept token; the mean pool
             averages the kept tokens.
  dropout:   `dropout_rate` replaces the dropout of the attention projection and both MLP layers.
  droppath:  `drop_path_rate` replaces the drop-path rate of every block (constant over depth).
`first_example`: the index of images[0] in the step's batch; dropout and drop-path masks are drawn
per example from it, so a batch split into micro-batches draws what the whole batch would.
"""
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax.models import vit
from masksub_jax.models.layers import Dropout, DropPath, Mlp, conv_init, dense_init
from masksub_jax.models.weights import ConversionError, flatten, linear_to_ours, linear_to_timm, listed, nest

# The sizes are ViT's (models/vit.py VARIANTS): "B/16" is beitv2_base_patch16_224, "mu/8" a tiny one.
VARIANTS = vit.VARIANTS


def parse_variant(variant: str) -> tuple[int, int, int, int]:
    """'B/16' -> (width, depth, heads, patch). Raises ValueError naming the known variants."""
    try:
        return vit.parse_variant(variant)
    except ValueError:
        raise ValueError(f"Unknown BEiT variant {variant!r}: use NAME/PATCH with NAME one of {sorted(VARIANTS)} "
                         "and PATCH a positive integer, e.g. 'B/16'.") from None


def num_relative_distances(grid: int) -> int:
    """Rows of a relative position bias table for a grid x grid patch grid: the (2g-1)^2 offsets and
    three for cls-to-token, token-to-cls and cls-to-cls."""
    return (2 * grid - 1) ** 2 + 3


@functools.lru_cache(maxsize=8)
def relative_position_index(grid: int) -> np.ndarray:
    """(g*g + 1, g*g + 1) rows of the bias table for each (query, key) pair, token 0 the cls token;
    timm's gen_relative_position_index (and BEiT's) for a square window."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    coords = np.stack([rows.ravel(), cols.ravel()])  # (2, g*g), row-major as the patch tokens
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (grid - 1)
    size = num_relative_distances(grid)
    index = np.zeros((grid * grid + 1,) * 2, np.int32)
    index[1:, 1:] = relative[..., 0] * (2 * grid - 1) + relative[..., 1]
    index[0, :] = size - 3  # cls to token
    index[:, 0] = size - 2  # token to cls
    index[0, 0] = size - 1  # cls to cls
    return index


def kept_positions(keep_idx) -> jax.Array:
    """(batch, kept + 1): the token positions of [cls] + each example's kept patches (cls is 0)."""
    return jnp.concatenate([jnp.zeros((keep_idx.shape[0], 1), keep_idx.dtype), keep_idx + 1], axis=1)


def relative_position_bias(table, grid: int, positions=None) -> jax.Array:
    """The attention bias (1 or batch, heads, n, n) from a (num_relative_distance, heads) table: all
    tokens', or between the `positions` (batch, n) of each example. Gathered in two steps (the full
    (g*g+1)^2 bias, then each example's rows and columns), so that the gradient's scatter-add spreads
    over the full bias rather than piling every example's pairs onto the few table rows."""
    full = table[jnp.asarray(relative_position_index(grid))]  # (g*g + 1, g*g + 1, heads)
    bias = full[None] if positions is None else full[positions[:, :, None], positions[:, None, :]]
    return bias.transpose(0, 3, 1, 2)


class Attention(nn.Module):
    """Softmax attention with a learned relative position bias; `positions` (batch, n): the tokens'
    places among [cls] + the patch grid (None: all of them, in order)."""
    num_heads: int
    grid: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, positions, deterministic: bool, example_ids):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        table = self.param("relative_position_bias_table", nn.initializers.zeros,
                           (num_relative_distances(self.grid), self.num_heads))
        q_bias = self.param("q_bias", nn.initializers.zeros, (width,))
        v_bias = self.param("v_bias", nn.initializers.zeros, (width,))
        qkv = nn.Dense(3 * width, use_bias=False, kernel_init=dense_init, dtype=self.dtype, name="qkv")(x)
        qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        q, k, v = jnp.split(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 3, axis=2)
        bias = relative_position_bias(table, self.grid, positions).astype(self.dtype)  # (1 or batch, heads, n, n)
        out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], bias=bias)
        out = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="proj")(out.reshape(batch, tokens, width))
        return Dropout(self.dropout)(out, deterministic, example_ids)


class Block(nn.Module):
    """x + drop_path(gamma_1 * attn(norm1(x))), then the same with the MLP; no gammas when
    layerscale_init is 0."""
    num_heads: int
    grid: int
    mlp_dim: int
    dropout: float
    drop_path: float
    layerscale_init: float
    dtype: Any

    @nn.compact
    def __call__(self, x, positions, deterministic: bool, example_ids):
        width = x.shape[-1]
        scale_init = nn.initializers.constant(self.layerscale_init)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, self.grid, self.dropout, self.dtype, name="attn")(
            y, positions, deterministic, example_ids)
        if self.layerscale_init:
            y = self.param("gamma_1", scale_init, (width,)).astype(self.dtype) * y
        x = x + DropPath(self.drop_path)(y, deterministic, example_ids)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = Mlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(y, deterministic, example_ids)
        if self.layerscale_init:
            y = self.param("gamma_2", scale_init, (width,)).astype(self.dtype) * y
        return x + DropPath(self.drop_path)(y, deterministic, example_ids)


class Beit(nn.Module):
    """BEiT v2's fine-tuning ViT on normalised images (batch, H, W, C); float32 logits (batch, classes).

    `dtype` is the compute dtype (bfloat16 for mixed precision); parameters stay float32. Weights
    initialised here are timm's except that the blocks' proj / fc2 are not rescaled by depth
    (fix_init_weight): fine-tuning always starts from pretrained weights (config.init_from).
    """
    num_classes: int
    variant: str = "B/16"
    drop_path: float = 0.0  # the last block's; rising linearly from 0
    dropout: float = 0.0
    layerscale_init: float = 0.1  # 0: no LayerScale
    head_init_std: float = 2e-5  # BEiT's trunc_normal(0.02) * init_scale 0.001
    mlp_ratio: int = 4
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False, keep_idx: jax.Array | None = None,
                 dropout_rate: float | None = None, drop_path_rate: float | None = None, first_example=0):
        width, depth, heads, patch = parse_variant(self.variant)
        if images.shape[1] != images.shape[2] or images.shape[1] % patch:
            raise ValueError(f"Image size {images.shape[1:3]} is not a square multiple of the patch size {patch} "
                             f"of BEiT-{self.variant}; pick a square image size that is a multiple of {patch}.")
        grid = images.shape[1] // patch
        x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                    kernel_init=conv_init, dtype=self.dtype, name="patch_embed")(images)
        batch = x.shape[0]
        x = x.reshape(batch, -1, width)
        positions = None
        if keep_idx is not None:  # MaskSub token dropping: each example keeps its own subset...
            x = jnp.take_along_axis(x, keep_idx[:, :, None], axis=1)
            positions = kept_positions(keep_idx)  # ...and the biases between those tokens
        cls = self.param("cls_token", dense_init, (1, 1, width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), x], axis=1)

        # Dropout and drop-path draw per example, keyed by its index in the step's batch.
        example_ids = first_example + jnp.arange(batch)
        block = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        dropout = self.dropout if dropout_rate is None else dropout_rate
        rates = (np.full(depth, drop_path_rate) if drop_path_rate is not None
                 else np.linspace(0.0, self.drop_path, depth))
        for i in range(depth):
            x = block(heads, grid, self.mlp_ratio * width, dropout, float(rates[i]), self.layerscale_init,
                      self.dtype, name=f"blocks_{i}")(x, positions, not train, example_ids)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="fc_norm")(x[:, 1:].mean(axis=1))
        head_init = nn.initializers.truncated_normal(self.head_init_std)
        logits = nn.Dense(self.num_classes, kernel_init=head_init, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# The family interface (masksub_jax/models/__init__.py).
# BEiT v2's fine-tuning (unilm beit2/run_class_finetuning.py) exempts only cls_token (and pos_embed,
# which this model lacks) besides the 1-D parameters: the relative position tables are decayed unless
# --disable_weight_decay_on_rel_pos_bias, which the published command does not pass.
NO_DECAY = ("cls_token",)
SUB_BRANCHES = ("masking", "dropout", "droppath")


def describe(config) -> str:
    return f"BEiT-{config.model.variant}"


def check(config) -> None:
    try:
        patch = parse_variant(config.model.variant)[3]
    except ValueError as e:
        raise ValueError(f"Config model.variant={config.model.variant!r} is invalid: {e}") from None
    if config.model.pool != "avg":
        raise ValueError(f"Config model.pool={config.model.pool!r} is invalid: BEiT v2 pools the mean of the patch "
                         "tokens into fc_norm; set model.pool='avg'.")
    size = config.data.image_size
    if size <= 0 or size % patch:
        raise ValueError(f"Config data.image_size={size!r} is invalid: must be a positive multiple of the patch "
                         f"size {patch} of model.variant={config.model.variant!r}.")


def build(config, num_classes: int) -> Beit:
    m = config.model
    return Beit(num_classes=num_classes, variant=m.variant, drop_path=m.drop_path, dropout=m.dropout,
                layerscale_init=m.layerscale_init, head_init_std=m.head_init_std, remat=m.remat,
                dtype=jnp.dtype(m.dtype))


def num_units(config) -> int:
    """MaskSub's masking keeps or drops patch tokens."""
    return vit.num_patches(config.data.image_size, parse_variant(config.model.variant)[3])


# BEiT's get_num_layer_for_vit (unilm beit2/optim_factory.py) is ViT's: 0 cls_token and patch_embed, i + 1
# block i, depth + 1 the rest (fc_norm, head); and its matmuls are ViT's (the relative position bias is an add).
layer_ids = vit.layer_ids
forward_flops = vit.forward_flops


# --------------------------------------------------------------------------------------------------
# timm weights. Layouts read: timm's beitv2_* (and the official fine-tuned beitv2_*_ft*.pth, the same
# names), with or without relative_position_index buffers and `module.` prefixes; the official BEiT v2
# pretraining checkpoints (beitv2_*_pt1k.pth): their one shared rel_pos_bias table is copied into every
# block, as unilm beit2/run_class_finetuning.py does, and mask_token, lm_head, cls_pt_layers and the
# final norm (a mean-pool model has none) are dropped.
_BLOCK = {
    "norm1/scale": "norm1.weight", "norm1/bias": "norm1.bias",
    "norm2/scale": "norm2.weight", "norm2/bias": "norm2.bias",
    "attn/qkv/kernel": "attn.qkv.weight", "attn/q_bias": "attn.q_bias", "attn/v_bias": "attn.v_bias",
    "attn/relative_position_bias_table": "attn.relative_position_bias_table",
    "attn/proj/kernel": "attn.proj.weight", "attn/proj/bias": "attn.proj.bias",
    "mlp/fc1/kernel": "mlp.fc1.weight", "mlp/fc1/bias": "mlp.fc1.bias",
    "mlp/fc2/kernel": "mlp.fc2.weight", "mlp/fc2/bias": "mlp.fc2.bias",
    "gamma_1": "gamma_1", "gamma_2": "gamma_2",
}
_TOP = {"fc_norm/scale": "fc_norm.weight", "fc_norm/bias": "fc_norm.bias", "head/kernel": "head.weight",
        "head/bias": "head.bias", "patch_embed/kernel": "patch_embed.proj.weight",
        "patch_embed/bias": "patch_embed.proj.bias", "cls_token": "cls_token"}
_IGNORED = re.compile(r"relative_position_index$|^(mask_token|lm_head\.|cls_pt_layers\.|norm\.)|"
                      r"\.num_batches_tracked$")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_TABLE = re.compile(r"^blocks\.\d+\.attn\.relative_position_bias_table$")


def _names(depth: int) -> dict[str, str]:
    names = dict(_TOP)
    for i in range(depth):
        names.update({f"blocks_{i}/{ours}": f"blocks.{i}.{theirs}" for ours, theirs in _BLOCK.items()})
    return names


def _canonical(state_dict) -> dict:
    """timm's names: `module.` prefixes and dropped keys out, a shared table copied into every block."""
    sd = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if not _IGNORED.search(key):
            sd[key] = np.asarray(value)
    if _SHARED_TABLE in sd:
        table = sd.pop(_SHARED_TABLE)
        for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}):
            sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", table)
    return sd


def _grid_of_table(rows: int) -> int | None:
    """The square patch grid a bias table of `rows` rows was made for, or None."""
    side = int(round(np.sqrt(rows - 3)))
    return (side + 1) // 2 if side * side == rows - 3 and side % 2 == 1 else None


def _shape_variant(sd: dict) -> tuple[str | None, tuple[int, int, int], int | None]:
    """(our variant whose width and depth the weights have, or None; their (width, depth, patch); the
    image size their relative position tables were made for, or None)."""
    width, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    tables = [v for k, v in sd.items() if _TABLE.match(k)]
    grid = _grid_of_table(tables[0].shape[0]) if tables else None
    names = [name for name, (w, d, _) in VARIANTS.items() if (w, d) == (width, depth)]
    return (f"{names[0]}/{patch}" if names else None), (width, depth, patch), (grid * patch if grid else None)


# timm model names, e.g. beitv2_base_patch16_224, as variant and image size.
_TIMM_NAME = re.compile(r"^beit(?:v2)?_(base|large)_patch(\d+)_(\d+)")
_TIMM_SIZES = {"base": "B", "large": "L"}


def resolve_variant(variant: str | None, sd: dict) -> tuple[str, int | None]:
    """(our variant, the image size the weights' tables were made for) from a variant ('B/16'), a timm
    model name ('beitv2_base_patch16_224') or, if None, the weights' shapes."""
    found, (width, depth, patch), made_for = _shape_variant(sd)
    if variant is None:
        if found is None:
            raise ConversionError(f"BEiT weights of width {width}, depth {depth}, patch {patch} are none of our "
                                  f"variants {sorted(VARIANTS)}; add the size to models/vit.py VARIANTS.")
        return found, made_for
    match = _TIMM_NAME.match(variant)
    if match:
        variant = f"{_TIMM_SIZES[match.group(1)]}/{match.group(2)}"
    w, d, _, p = parse_variant(variant)
    if (w, d, p) != (width, depth, patch):
        raise ConversionError(f"The checkpoint does not fit BEiT-{variant}: the weights have width {width}, depth "
                              f"{depth}, patch {patch}. Leave out --variant to read it from the weights.")
    return variant, made_for


def detect(state_dict) -> dict | None:
    """What a state dict says of itself if its key names are BEiT's (cls_token, patch_embed,
    blocks.N.attn.q_bias and a relative position table per block or shared), else None."""
    sd = _canonical(state_dict)
    if not ({"cls_token", "patch_embed.proj.weight"} <= set(sd)
            and any(k.endswith(".attn.q_bias") for k in sd) and any(map(_TABLE.match, sd))):
        return None
    variant, image_size = resolve_variant(None, sd)
    head = sd.get("head.weight")
    config = {"model.pool": "avg",
              "model.layerscale_init": 0.1 if "blocks.0.gamma_1" in sd else 0.0}
    return {"variant": variant, "image_size": image_size, "num_classes": 0 if head is None else head.shape[0],
            "config": config, "notes": _notes(state_dict)}


def _notes(state_dict) -> list[str]:
    """What conversion leaves out of, or copies within, BEiT v2 pretraining weights (said by convert)."""
    keys = [k.removeprefix("module.") for k in state_dict]
    dropped = sorted({k.split(".")[0] for k in keys if _IGNORED.search(k) and "relative_position_index" not in k})
    notes = [f"Left out, as BEiT v2's fine-tuning does: {', '.join(dropped)}."] if dropped else []
    if _SHARED_TABLE in keys:
        notes.append("The shared relative position table (rel_pos_bias) is copied into every block, as BEiT v2's "
                     "fine-tuning does.")
    return notes


def from_timm(state_dict, *, variant: str | None = None, image_size: int | None = None,
              num_classes: int | None = None) -> dict:
    """A timm beitv2_* / official BEiT v2 state dict (name -> array) as our parameter tree.

    `image_size` must be the one the relative position tables were made for (default): resampling
    them (BEiT's geometric-progression interpolation) is not implemented. The head is left out when the
    checkpoint has none or `num_classes` differs; fc_norm when it has none (pretraining weights): the
    trainer then keeps its freshly initialised ones. Raises ConversionError naming missing, unexpected
    and misshapen keys.
    """
    sd = _canonical(state_dict)
    if "pos_embed" in sd:
        raise ConversionError("The checkpoint has an absolute position embedding (pos_embed), which BEiT v2 "
                              "(use_abs_pos_emb=False) has not; these are BEiT v1 weights, which this family "
                              "does not read.")
    variant, made_for = resolve_variant(variant, sd)
    width, depth, heads, patch = parse_variant(variant)
    if image_size is not None and made_for is not None and image_size != made_for:
        raise ConversionError(f"The relative position tables were made for {made_for} px ({made_for // patch}x"
                              f"{made_for // patch} patches), not {image_size} px; resampling them is not "
                              f"implemented: use --image_size={made_for}.")
    image_size = image_size or made_for
    names = _names(depth)
    has = {"layerscale": "blocks.0.gamma_1" in sd, "fc_norm": "fc_norm.weight" in sd,
           "head": "head.weight" in sd and (num_classes is None or sd["head.weight"].shape[0] == num_classes)}

    def in_checkpoint(ours: str) -> bool:
        if ours.endswith(("gamma_1", "gamma_2")):
            return has["layerscale"]
        return has.get(ours.split("/")[0], True)
    expected = {theirs for ours, theirs in names.items() if in_checkpoint(ours)}
    missing = expected - set(sd)
    unexpected = set(sd) - expected - ({"head.weight", "head.bias"} if not has["head"] else set())
    if missing or unexpected:
        raise ConversionError(f"The checkpoint does not fit BEiT-{variant}: missing keys {listed(missing)}, "
                              f"unexpected keys {listed(unexpected)}. Check --variant (width {width}, depth "
                              f"{depth}, patch {patch}), or leave it out to read it from the weights.")
    params = {ours: linear_to_ours(ours, sd[theirs]).astype(np.float32) for ours, theirs in names.items()
              if theirs in expected}
    wanted = _expected_shapes(width, depth, heads, patch, params["patch_embed/kernel"].shape[2],
                              params.get("head/kernel", np.zeros((1, 0))).shape[1], image_size // patch)
    wrong = [f"{k}: {params[k].shape} (BEiT-{variant} wants {s})" for k, s in wanted.items()
             if k in params and params[k].shape != s]
    if wrong:
        raise ConversionError(f"Shapes do not fit BEiT-{variant}: {'; '.join(wrong[:6])}.")
    return nest(params)


def _expected_shapes(width, depth, heads, patch, channels, num_classes, grid) -> dict[str, tuple]:
    shapes = {"patch_embed/kernel": (patch, patch, channels, width), "patch_embed/bias": (width,),
              "cls_token": (1, 1, width), "fc_norm/scale": (width,), "fc_norm/bias": (width,),
              "head/kernel": (width, num_classes), "head/bias": (num_classes,)}
    block = {"norm1/scale": (width,), "norm1/bias": (width,), "norm2/scale": (width,), "norm2/bias": (width,),
             "attn/qkv/kernel": (width, 3 * width), "attn/q_bias": (width,), "attn/v_bias": (width,),
             "attn/relative_position_bias_table": (num_relative_distances(grid), heads),
             "attn/proj/kernel": (width, width), "attn/proj/bias": (width,),
             "mlp/fc1/kernel": (width, 4 * width), "mlp/fc1/bias": (4 * width,),
             "mlp/fc2/kernel": (4 * width, width), "mlp/fc2/bias": (width,), "gamma_1": (width,), "gamma_2": (width,)}
    for i in range(depth):
        shapes.update({f"blocks_{i}/{k}": v for k, v in block.items()})
    return shapes


def to_timm(params) -> dict[str, np.ndarray]:
    """Our parameters as a timm Beit state dict (`timm.create_model('beitv2_...')` loads it with
    load_state_dict(strict=True); timm's relative_position_index buffers are not persistent)."""
    flat = flatten(params)
    depth = len({k.split("/")[0] for k in flat if k.startswith("blocks_")})
    names = _names(depth)
    unknown = set(flat) - set(names)
    if unknown:
        raise ConversionError(f"Not parameters of our BEiT: {listed(unknown)}.")
    return {names[k]: np.ascontiguousarray(linear_to_timm(k, v)) for k, v in flat.items()}


_TIMM_MODELS = {"B": "beitv2_base_patch16_224", "L": "beitv2_large_patch16_224"}


def timm_model(state_dict: dict, variant: str, image_size: int | None, config: dict | None = None) -> tuple[str, dict]:
    """The `timm.create_model` name and keyword arguments (besides num_classes) of the model that
    `state_dict` (to_timm's) loads into: a beitv2_* model, with what differs from it."""
    width, depth, heads, patch = parse_variant(variant)
    name = _TIMM_MODELS.get(variant.split("/")[0], _TIMM_MODELS["B"])
    timm_width, timm_depth, timm_heads = VARIANTS[_TIMM_SIZES[_TIMM_NAME.match(name).group(1)]]
    kwargs = {}
    if (width, depth, heads) != (timm_width, timm_depth, timm_heads):
        kwargs.update(embed_dim=width, depth=depth, num_heads=heads)
    if patch != 16:
        kwargs["patch_size"] = patch
    tables = [v for k, v in state_dict.items() if _TABLE.match(k)]
    grid = _grid_of_table(tables[0].shape[0]) if tables else None
    kwargs["img_size"] = image_size or (grid * patch if grid else 224)
    channels = state_dict["patch_embed.proj.weight"].shape[1]
    if channels != 3:
        kwargs["in_chans"] = channels
    if "blocks.0.gamma_1" not in state_dict:
        kwargs["init_values"] = 0  # no LayerScale
    return name, kwargs


def fit(loaded: dict, initial: dict, say) -> dict:
    """config.init_from: pretraining weights (no fc_norm) get the fresh fc_norm, as BEiT's fine-tuning
    starts it; a relative position table of another grid is an error naming the fix (a head of another
    size is re-initialised by the trainer)."""
    out = dict(loaded)
    if "fc_norm/scale" in initial and "fc_norm/scale" not in out:
        out.update({k: v for k, v in initial.items() if k.startswith("fc_norm/")})
        say("init_from: the weights have no fc_norm (pretraining weights); it starts fresh, as BEiT's fine-tuning.")
    for name, value in initial.items():
        if name.endswith("relative_position_bias_table") and name in out and out[name].shape != value.shape:
            raise ConversionError(
                f"init_from: {name} was made for another image size ({out[name].shape} vs {value.shape}); resampling "
                "relative position tables is not implemented: train at the size the weights were made for.")
    return out
