"""Swin Transformer (Liu et al., 2021) in Flax Linen, with MaskSub's mask-token sub-branch.

Matches timm's `swin_*_patch4_window7_224`: patch embedding with LayerNorm, stages of pre-LN blocks
with (shifted) window attention and a relative position bias, patch merging at the start of every
stage but the first, LayerNorm eps 1e-5, exact GELU, drop-path rising linearly over all blocks from 0
to `drop_path`, mean pool, head. As in timm, a stage whose grid is no larger than the window attends
over the whole grid and does not shift.

How MaskSub corrupts the input of this model (the sub-branch forward):
  masking:   windows need the full grid, so no token is dropped: the image is split into
             `block_size`-pixel square blocks (32 px = 8x8 tokens at patch 4, the official choice);
             `keep_idx` (batch, kept) are the kept blocks (row-major), every token of the others is
             replaced by the learned `mask_token`, after the patch embedding and its norm.
  dropout:   `dropout_rate` replaces the dropout of the attention projection and both MLP layers.
  droppath:  `drop_path_rate` replaces the drop-path rate of every block (constant over depth).
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax.models.layers import Dropout, DropPath, Mlp, conv_init, dense_init, keep_blocks
from masksub_jax.models.weights import ConversionError, flatten, linear_to_ours, linear_to_timm, listed, nest

# name -> (embed dim, depth of each stage, heads of each stage, window). Patch size after the slash: "T/4".
VARIANTS = {
    "mu": (32, (2, 2), (2, 4), 4),  # digits-sized; not a published model
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
}
LAYERNORM_EPS = 1e-5


def parse_variant(variant: str) -> tuple[int, tuple, tuple, int, int]:
    """'T/4' -> (embed dim, depths, heads, window, patch). Raises ValueError naming the known variants."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"Unknown Swin variant {variant!r}: use NAME/PATCH with NAME one of {sorted(VARIANTS)} "
                         "and PATCH a positive integer, e.g. 'T/4'.")
    return (*VARIANTS[name], int(patch))


def stage_geometry(variant: str, image_size: int) -> list[tuple[int, int, int]]:
    """(grid side, window, shift) of each stage. Raises ValueError if the image does not tile."""
    _, depths, _, window, patch = parse_variant(variant)
    reduction = patch * 2 ** (len(depths) - 1)
    if image_size <= 0 or image_size % reduction:
        raise ValueError(f"Image size {image_size} does not fit Swin-{variant}: it must be a multiple of {reduction} "
                         f"(patch {patch}, halved {len(depths) - 1} times by patch merging).")
    stages = []
    for i in range(len(depths)):
        grid = image_size // patch // 2 ** i
        if grid <= window:
            stages.append((grid, grid, 0))
        elif grid % window:
            raise ValueError(f"Image size {image_size} does not fit Swin-{variant}: stage {i}'s {grid}x{grid} tokens "
                             f"do not split into {window}x{window} windows; use a multiple of {reduction * window}.")
        else:
            stages.append((grid, window, window // 2))
    return stages


def relative_position_index(window: int) -> np.ndarray:
    """(N, N) index into the ((2w-1)^2, heads) bias table for each pair of a window's N = w*w tokens."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def window_partition(x, window: int):
    """(B, H, W, C) -> (B, windows, window*window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows, window: int, h: int, w: int):
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(grid: int, window: int, shift: int) -> np.ndarray:
    """(windows, N, N): 0 between tokens of the same region of the cyclically shifted grid, -100
    between tokens that the shift brought together from different regions."""
    regions = np.zeros((1, grid, grid, 1), np.float32)
    bounds = ((0, grid - window), (grid - window, grid - shift), (grid - shift, grid))
    label = 0
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            regions[:, h0:h1, w0:w1] = label
            label += 1
    labels = window_partition(regions, window)[0, :, :, 0]  # (windows, N)
    return np.where(labels[:, None, :] != labels[:, :, None], -100.0, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window, with a learned relative position bias."""
    num_heads: int
    window: int
    dtype: Any

    @nn.compact
    def __call__(self, windows, mask: np.ndarray | None):
        batch, num_windows, tokens, width = windows.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, kernel_init=dense_init, dtype=self.dtype, name="qkv")(windows)
        qkv = qkv.reshape(batch, num_windows, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        table = self.param("relative_position_bias_table", dense_init, ((2 * self.window - 1) ** 2, self.num_heads))
        bias = table[relative_position_index(self.window).reshape(-1)].reshape(tokens, tokens, self.num_heads)
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q * head_dim ** -0.5, k).astype(jnp.float32)
        logits = logits + bias.transpose(2, 0, 1)
        if mask is not None:
            logits = logits + mask[None, :, None]
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v).reshape(batch, num_windows, tokens, width)
        return nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="proj")(out)


class Block(nn.Module):
    """x + drop_path(window_attention(norm1(x))), then x + drop_path(mlp(norm2(x))), on (B, H, W, C)."""
    num_heads: int
    window: int
    shift: int
    dropout: float
    drop_path: float
    dtype: Any

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids):
        _, h, w, width = x.shape
        y = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype, name="norm1")(x)
        if self.shift:
            y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
        mask = shifted_window_mask(h, self.window, self.shift) if self.shift else None
        attention = WindowAttention(self.num_heads, self.window, self.dtype, name="attn")
        y = attention(window_partition(y, self.window), mask)
        y = window_reverse(y, self.window, h, w)
        if self.shift:
            y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
        y = Dropout(self.dropout)(y, deterministic, example_ids)  # the attention projection's dropout
        x = x + DropPath(self.drop_path)(y, deterministic, example_ids)
        y = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype, name="norm2")(x)
        y = Mlp(4 * width, self.dropout, self.dtype, name="mlp")(y, deterministic, example_ids)
        return x + DropPath(self.drop_path)(y, deterministic, example_ids)


class PatchMerging(nn.Module):
    """Each 2x2 neighbourhood concatenated (timm's channel order), normalised, projected to 2C."""
    dtype: Any

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        x = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype, name="norm")(x)
        return nn.Dense(2 * c, use_bias=False, kernel_init=dense_init, dtype=self.dtype, name="reduction")(x)


class PatchEmbed(nn.Module):
    width: int
    patch: int
    dtype: Any

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                    kernel_init=conv_init, dtype=self.dtype, name="proj")(images)
        return nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype, name="norm")(x)


class Swin(nn.Module):
    """Swin on normalised images (batch, H, W, C); returns float32 logits (batch, num_classes).

    `dtype` is the compute dtype (bfloat16 for mixed precision); parameters stay float32.
    """
    num_classes: int
    variant: str = "T/4"
    drop_path: float = 0.0
    dropout: float = 0.0
    block_size: int = 32
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False, keep_idx: jax.Array | None = None,
                 dropout_rate: float | None = None, drop_path_rate: float | None = None, first_example=0):
        width, depths, heads, _, patch = parse_variant(self.variant)
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"Swin takes square images, not {images.shape[1:3]}.")
        stages = stage_geometry(self.variant, images.shape[1])
        x = PatchEmbed(width, patch, self.dtype, name="patch_embed")(images)
        mask_token = self.param("mask_token", dense_init, (1, 1, width))
        if keep_idx is not None:
            x = keep_blocks(x, keep_idx, self.block_size // patch, fill=mask_token.reshape(-1))

        example_ids = first_example + jnp.arange(x.shape[0])
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        dropout = self.dropout if dropout_rate is None else dropout_rate
        rates = (np.full(sum(depths), drop_path_rate) if drop_path_rate is not None
                 else np.linspace(0.0, self.drop_path, sum(depths)))
        index = 0
        for i, ((_, window, shift), depth, num_heads) in enumerate(zip(stages, depths, heads)):
            if i > 0:
                x = PatchMerging(self.dtype, name=f"layers_{i}_downsample")(x)
            for j in range(depth):
                x = block(num_heads, window, shift if j % 2 else 0, dropout, float(rates[index]), self.dtype,
                          name=f"layers_{i}_blocks_{j}")(x, not train, example_ids)
                index += 1
        x = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype, name="norm")(x)
        logits = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name="head")(x.mean(axis=(1, 2)))
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# The family interface (masksub_jax/models/__init__.py).
NO_DECAY = ("mask_token", "relative_position_bias_table", "absolute_pos_embed")
SUB_BRANCHES = ("masking", "dropout", "droppath")


def describe(config) -> str:
    return f"Swin-{config.model.variant}"


def check(config) -> None:
    try:
        _, _, _, _, patch = parse_variant(config.model.variant)
    except ValueError as e:
        raise ValueError(f"Config model.variant={config.model.variant!r} is invalid: {e}") from None
    size, block = config.data.image_size, config.masksub.block_size
    try:
        stage_geometry(config.model.variant, size)
    except ValueError as e:
        raise ValueError(f"Config data.image_size={size!r} is invalid: {e}") from None
    if block < 1 or block % patch or size % block:
        raise ValueError(f"Config masksub.block_size={block!r} is invalid: the masking blocks must be a multiple "
                         f"of the patch size {patch} that divides data.image_size={size}.")


def build(config, num_classes: int) -> Swin:
    m = config.model
    return Swin(num_classes=num_classes, variant=m.variant, drop_path=m.drop_path, dropout=m.dropout,
                block_size=config.masksub.block_size, remat=m.remat, dtype=jnp.dtype(m.dtype))


def num_units(config) -> int:
    """MaskSub's masking keeps or masks blocks of block_size x block_size pixels."""
    return (config.data.image_size // config.masksub.block_size) ** 2


def forward_flops(config, num_classes: int, kept_units: int | None = None) -> float:
    """Matmul FLOPs of one image's forward pass. Mask tokens keep every token: `kept_units` costs nothing less."""
    del kept_units
    width, depths, _, _, patch = parse_variant(config.model.variant)
    flops = 2 * (config.data.image_size // patch) ** 2 * patch * patch * len(config.data.mean) * width
    for i, ((grid, window, _), depth) in enumerate(zip(stage_geometry(config.model.variant, config.data.image_size),
                                                        depths)):
        dim, tokens = width * 2 ** i, grid * grid
        if i > 0:
            flops += 2 * tokens * (2 * dim) * dim  # merging: tokens x (4 * dim/2) -> dim
        flops += depth * (24 * tokens * dim * dim + 4 * tokens * window * window * dim)
    return flops + 2 * width * 2 ** (len(depths) - 1) * num_classes


# --------------------------------------------------------------------------------------------------
# timm weights. Our names are timm's with "/" for ".": layers_1_downsample/reduction/kernel is
# layers.1.downsample.reduction.weight. The original layout (Microsoft's Swin, augsub) merges at the
# end of a stage (layers.0.downsample is timm's layers.1.downsample) and names the head head.*; its
# relative_position_index and attn_mask buffers are checked against ours and dropped.
_LEAF_TO_TIMM = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _timm_name(ours: str) -> str:
    if ours == "mask_token":
        return ours
    *path, leaf = ours.split("/")
    if path == ["head"]:
        return f"head.fc.{_LEAF_TO_TIMM[leaf]}"
    module = ".".join(path)
    for prefix in ("layers_", "blocks_"):
        module = module.replace(prefix, prefix[:-1] + ".")
    module = module.replace("_downsample", ".downsample").replace("_blocks", ".blocks")
    return f"{module}.{_LEAF_TO_TIMM.get(leaf, leaf)}"


def _expected_shapes(variant: str, image_size: int, channels: int, num_classes: int) -> dict[str, tuple]:
    width, depths, heads, _, patch = parse_variant(variant)
    shapes = {"patch_embed/proj/kernel": (patch, patch, channels, width), "patch_embed/proj/bias": (width,),
              "patch_embed/norm/scale": (width,), "patch_embed/norm/bias": (width,), "mask_token": (1, 1, width)}
    for i, ((_, window, _), depth) in enumerate(zip(stage_geometry(variant, image_size), depths)):
        dim = width * 2 ** i
        if i > 0:
            shapes.update({f"layers_{i}_downsample/norm/scale": (2 * dim,),
                           f"layers_{i}_downsample/norm/bias": (2 * dim,),
                           f"layers_{i}_downsample/reduction/kernel": (2 * dim, dim)})
        for j in range(depth):
            block = {"norm1/scale": (dim,), "norm1/bias": (dim,), "norm2/scale": (dim,), "norm2/bias": (dim,),
                     "attn/qkv/kernel": (dim, 3 * dim), "attn/qkv/bias": (3 * dim,),
                     "attn/proj/kernel": (dim, dim), "attn/proj/bias": (dim,),
                     "attn/relative_position_bias_table": ((2 * window - 1) ** 2, heads[i]),
                     "mlp/fc1/kernel": (dim, 4 * dim), "mlp/fc1/bias": (4 * dim,),
                     "mlp/fc2/kernel": (4 * dim, dim), "mlp/fc2/bias": (dim,)}
            shapes.update({f"layers_{i}_blocks_{j}/{k}": v for k, v in block.items()})
    final = width * 2 ** (len(depths) - 1)
    shapes.update({"norm/scale": (final,), "norm/bias": (final,), "head/kernel": (final, num_classes),
                   "head/bias": (num_classes,)})
    return shapes


def _to_timm_layout(sd: dict, variant: str, image_size: int) -> dict:
    """The original layout renamed to timm's; its buffers checked against our geometry and dropped."""
    windows = [window for _, window, _ in stage_geometry(variant, image_size)]
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[-1] in ("relative_position_index", "attn_mask"):
            if parts[-1] == "relative_position_index":
                window = windows[int(parts[1])]
                if value.shape != (window ** 2,) * 2 or not np.array_equal(value, relative_position_index(window)):
                    raise ConversionError(f"{key} is not the relative position index of a {window}x{window} "
                                          f"window; these weights were made for another window size or image size.")
            continue
        if "head.fc." not in key and key.startswith("head."):
            key = "head.fc." + key.removeprefix("head.")
        out[key] = value
    if "layers.0.downsample.reduction.weight" in out:  # the original layout: merging ends a stage
        out = {(f"layers.{int(k.split('.')[1]) + 1}.downsample." + k.split(".downsample.", 1)[1]
                if ".downsample." in k else k): v for k, v in out.items()}
    return out


_TABLE = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")


def _shape_variant(sd: dict) -> tuple[str | None, str, int | None]:
    """(our variant whose embed dim, depths, heads and windows the weights have, or None; what the
    shapes say; the image size they were made for: the smallest whose stages fill the windows, as
    timm's swin_*_window7_224). The relative position tables give each stage's window (or its grid,
    where that is smaller) and heads; the original layout has the same tables as timm's."""
    tables = {(int(m[1]), int(m[2])): sd[k].shape for k in sd if (m := _TABLE.match(k))}
    if not tables or "patch_embed.proj.weight" not in sd:
        return None, "no relative position tables or patch_embed.proj.weight", None
    stages = 1 + max(i for i, _ in tables)
    if any((stage, 0) not in tables for stage in range(stages)):
        return None, f"relative position tables of blocks {sorted(tables)}", None
    depths = tuple(sum(1 for i, _ in tables if i == stage) for stage in range(stages))
    heads = tuple(tables[stage, 0][1] for stage in range(stages))
    windows = [(int(round(np.sqrt(tables[stage, 0][0]))) + 1) // 2 for stage in range(stages)]
    width, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
    image_size = windows[-1] * patch * 2 ** (stages - 1)
    shapes = f"embed dim {width}, depths {depths}, heads {heads}, windows {windows}, patch {patch}"
    for name, (w, d, h, _) in VARIANTS.items():
        if (w, d, h) == (width, depths, heads):
            try:
                fits = [window for _, window, _ in stage_geometry(f"{name}/{patch}", image_size)] == windows
            except ValueError:
                fits = False
            if fits:
                return f"{name}/{patch}", shapes, image_size
    return None, shapes, None


def _canonical(state_dict) -> dict:
    return {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}


def resolve_variant(variant: str | None, image_size: int | None, state_dict) -> tuple[str, int]:
    """(our variant, image size): the given ones, else the weights' (see _shape_variant). A variant of
    other shapes than the weights' is an error naming both."""
    found, shapes, made_for = _shape_variant(_canonical(state_dict))
    if variant is None and found is None:
        raise ConversionError(f"Swin weights of {shapes} are none of our Swin variants {sorted(VARIANTS)}; add "
                              "the size to models/swin.py VARIANTS.")
    if variant is not None and found is not None and parse_variant(variant) != parse_variant(found):
        raise ConversionError(f"The checkpoint does not fit Swin-{variant}: the weights are Swin-{found} ({shapes}). "
                              "Leave out --variant to read it from the weights.")
    variant = variant or found
    if image_size is None and made_for is None:  # weights of no variant of ours: the given variant's size
        _, depths, _, window, patch = parse_variant(variant)
        made_for = window * patch * 2 ** (len(depths) - 1)
    return variant, image_size or made_for


def detect(state_dict) -> dict | None:
    """What a state dict says of itself if its key names are a Swin's (layers.N.blocks.M.attn.
    relative_position_bias_table, timm's layout or the original one), else None: {"variant",
    "image_size", "num_classes" (0: no head), "config": {}}."""
    sd = _canonical(state_dict)
    if "patch_embed.proj.weight" not in sd or not any(map(_TABLE.match, sd)):
        return None
    variant, image_size = resolve_variant(None, None, sd)
    head = sd.get("head.fc.weight", sd.get("head.weight"))
    return {"variant": variant, "image_size": image_size, "num_classes": 0 if head is None else head.shape[0],
            "config": {}}


def from_timm(state_dict, *, variant: str | None = None, image_size: int | None = None,
              num_classes: int | None = None) -> dict:
    """A timm (or original Microsoft / augsub) Swin state dict as our parameter tree. `variant` and
    `image_size` default to what the weights say (detect). The head is left out when absent or of
    another class count; mask_token (only augsub checkpoints have one) likewise. Raises
    ConversionError naming missing, unexpected and misshapen keys."""
    variant, image_size = resolve_variant(variant, image_size, state_dict)
    sd = _to_timm_layout(_canonical(state_dict), variant, image_size)
    channels = sd["patch_embed.proj.weight"].shape[1] if "patch_embed.proj.weight" in sd else 3
    has_head = "head.fc.weight" in sd and (num_classes is None or sd["head.fc.weight"].shape[0] == num_classes)
    shapes = _expected_shapes(variant, image_size, channels, sd["head.fc.weight"].shape[0] if has_head else 0)
    wanted = {ours: _timm_name(ours) for ours in shapes
              if (has_head or not ours.startswith("head/")) and (ours != "mask_token" or "mask_token" in sd)}
    missing = set(wanted.values()) - set(sd)
    unexpected = set(sd) - set(wanted.values()) - ({"head.fc.weight", "head.fc.bias"} if not has_head else set())
    if missing or unexpected:
        raise ConversionError(f"The checkpoint does not fit Swin-{variant}: missing keys {listed(missing)}, "
                              f"unexpected keys {listed(unexpected)}. Check --variant.")
    params = {ours: linear_to_ours(ours, sd[theirs]).astype(np.float32) for ours, theirs in wanted.items()}
    wrong = [f"{k}: {v.shape} (Swin-{variant} at {image_size} px wants {shapes[k]})" for k, v in params.items()
             if v.shape != shapes[k]]
    if wrong:
        raise ConversionError(f"Shapes do not fit Swin-{variant}: {'; '.join(wrong[:6])}.")
    return nest(params)


def fit(loaded: dict, initial: dict, say) -> dict:
    """config.init_from: timm's Swin has no mask_token, so the fresh one is kept."""
    if "mask_token" in initial and "mask_token" not in loaded:
        say("init_from: the weights have no mask_token; it starts freshly initialised.")
        loaded = {**loaded, "mask_token": initial["mask_token"]}
    return loaded


def to_timm(params) -> dict[str, np.ndarray]:
    """Our parameters as a timm Swin state dict (`timm.create_model('swin_tiny_patch4_window7_224')`
    loads it with `load_state_dict(strict=True)`). timm's Swin has no mask_token: it is left out."""
    return {_timm_name(k): np.ascontiguousarray(linear_to_timm(k, v))
            for k, v in flatten(params).items() if k != "mask_token"}


_TIMM_MODELS = {"T": "swin_tiny_patch4_window7_224", "S": "swin_small_patch4_window7_224",
                "B": "swin_base_patch4_window7_224"}


def timm_model(state_dict: dict, variant: str, image_size: int, config: dict | None = None) -> tuple[str, dict]:
    """The `timm.create_model` name and keyword arguments (besides num_classes) of the model that
    `state_dict` (to_timm's) loads into: a swin_*_window7_224 model, with what differs from it."""
    width, depths, heads, window, patch = parse_variant(variant)
    size = variant.split("/")[0]
    base = size if size in _TIMM_MODELS else "T"
    kwargs = {}
    if (width, depths, heads, window) != VARIANTS[base]:
        kwargs.update(embed_dim=width, depths=depths, num_heads=heads, window_size=window)
    if patch != 4:
        kwargs["patch_size"] = patch
    kwargs["img_size"] = image_size
    channels = state_dict["patch_embed.proj.weight"].shape[1]
    if channels != 3:
        kwargs["in_chans"] = channels
    return _TIMM_MODELS[base], kwargs
