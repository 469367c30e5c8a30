"""DeiT-III Vision Transformer (Touvron et al., 2022) in Flax Linen, and the MAE fine-tuning ViT.

Matches timm's `deit3_*` models: pre-LN blocks with LayerScale, LayerNorm eps 1e-6, qkv bias, exact
GELU, drop-path constant over depth, a position embedding without a cls slot, and the head on the
final-LN cls token. With `pool="avg"` and `layerscale_init=0` (no LayerScale) it is MAE's fine-tuning
ViT (timm's `global_pool="avg"`): the mean of the patch tokens, then fc_norm, then the head, and no
final norm. A position embedding with a cls slot (MAE, augreg) is folded into the cls token on
conversion, which is exact since the slot is only ever added to it.

How MaskSub corrupts the input of this model (the sub-branch forward):
  masking:   `keep_idx` (batch, len_keep) patch indices; the other patch tokens are dropped after the
             position embedding, the cls token is always kept; `pool="avg"` averages the kept ones.
  dropout:   `dropout_rate` replaces the dropout of the attention projection and both MLP layers.
  droppath:  `drop_path_rate` replaces the drop-path rate of every block.
`first_example`: the index of images[0] in the step's batch; dropout and drop-path masks are drawn
per example from it, so a batch split into micro-batches draws what the whole batch would.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax.models.layers import ACTIVATIONS, Dropout, DropPath, Mlp, conv_init, dense_init
from masksub_jax.models.weights import ConversionError, flatten, linear_to_ours, linear_to_timm, listed, nest

# name -> (width, depth, heads). Patch size comes after the slash: "B/16".
VARIANTS = {
    "mu": (64, 4, 4),  # the embedded digits default; not a published model
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "M": (512, 12, 8),  # deit3_medium
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
    """x + drop_path(gamma_1 * attn(norm1(x))), then the same with the MLP; no gammas (LayerScale)
    when layerscale_init is 0."""
    num_heads: int
    mlp_dim: int
    dropout: float
    drop_path: float
    layerscale_init: float
    dtype: Any
    norm_eps: float = 1e-6
    act: str = "gelu"

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids):
        width = x.shape[-1]
        scale_init = nn.initializers.constant(self.layerscale_init)
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, self.dropout, self.dtype, name="attn")(y, deterministic, example_ids)
        if self.layerscale_init:
            y = self.param("gamma_1", scale_init, (width,)).astype(self.dtype) * y
        x = x + DropPath(self.drop_path)(y, deterministic, example_ids)
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm2")(x)
        y = Mlp(self.mlp_dim, self.dropout, self.dtype, self.act, name="mlp")(y, deterministic, example_ids)
        if self.layerscale_init:
            y = self.param("gamma_2", scale_init, (width,)).astype(self.dtype) * y
        return x + DropPath(self.drop_path)(y, deterministic, example_ids)


class ScannedBlocks(nn.Module):
    """`depth` Blocks as one layer scanned over depth (big_vision's `scan`): block i's parameters at
    index i of a leading axis, the same computation; XLA compiles one block instead of `depth`
    (a TPU compile of ViT-B's step: BENCHMARKS.md). Each block draws its own dropout and drop-path
    keys (split from the module's, not the unrolled model's per-name keys)."""
    depth: int
    deterministic: bool
    remat: bool
    block: dict  # Block's fields

    @nn.compact
    def __call__(self, x, example_ids):
        def body(layer, x, example_ids):
            return layer(x, self.deterministic, example_ids), None
        block = nn.remat(Block, static_argnums=(2,), prevent_cse=False) if self.remat else Block
        scan = nn.scan(body, variable_axes={"params": 0, "intermediates": 0}, in_axes=nn.broadcast, length=self.depth,
                       split_rngs={"params": True, "dropout": True, "droppath": True})
        return scan(block(**self.block, name="block"), x, example_ids)[0]


class ViT(nn.Module):
    """DeiT-III ViT on normalised images (batch, H, W, C); returns float32 logits (batch, num_classes).

    `dtype` is the compute dtype (bfloat16 for mixed precision); parameters stay float32.
    """
    num_classes: int
    variant: str = "S/16"
    drop_path: float = 0.0
    dropout: float = 0.0
    layerscale_init: float = 1e-4  # 0: no LayerScale
    # "token": the final-LN cls token; "avg": mean of the patch tokens, then fc_norm (MAE);
    # "normed_avg": the final LN on each patch token, then their mean (FT-CLIP)
    pool: str = "token"
    pre_norm: bool = False  # CLIP: a LayerNorm (norm_pre, CLIP's ln_pre) before the blocks, no patch bias
    act: str = "gelu"  # the MLP's: "gelu" (exact) or "quick_gelu" (OpenAI CLIP)
    norm_eps: float = 1e-6  # every LayerNorm's; CLIP's 1e-5
    head_init_std: float = 0.02
    mlp_ratio: int = 4
    remat: bool = False
    scan: bool = False  # the blocks as one scanned layer (ScannedBlocks)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False, keep_idx: jax.Array | None = None,
                 dropout_rate: float | None = None, drop_path_rate: float | None = None, first_example=0):
        width, depth, heads, patch = parse_variant(self.variant)
        if images.shape[1] % patch or images.shape[2] % patch:
            raise ValueError(f"Image size {images.shape[1:3]} is not divisible by the patch size {patch} "
                             f"of ViT-{self.variant}; pick an image size that is a multiple of {patch}.")
        x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=not self.pre_norm,
                    kernel_init=conv_init, dtype=self.dtype, name="patch_embed")(images)
        batch = x.shape[0]
        x = x.reshape(batch, -1, width)
        x = x + self.param("pos_embed", dense_init, (1, x.shape[1], width)).astype(self.dtype)
        if keep_idx is not None:  # MaskSub token dropping: each example keeps its own subset.
            x = jnp.take_along_axis(x, keep_idx[:, :, None], axis=1)
        cls = self.param("cls_token", dense_init, (1, 1, width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), x], axis=1)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm_pre")(x)

        # Dropout and drop-path draw per example, keyed by its index in the step's batch.
        example_ids = first_example + jnp.arange(batch)
        dropout = self.dropout if dropout_rate is None else dropout_rate
        drop_path = self.drop_path if drop_path_rate is None else drop_path_rate
        fields = dict(num_heads=heads, mlp_dim=self.mlp_ratio * width, dropout=dropout, drop_path=drop_path,
                      layerscale_init=self.layerscale_init, dtype=self.dtype, norm_eps=self.norm_eps, act=self.act)
        if self.scan:
            x = ScannedBlocks(depth, not train, self.remat, fields, name="blocks")(x, example_ids)
        else:
            block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
            for i in range(depth):
                x = block(**fields, name=f"blocks_{i}")(x, not train, example_ids)
        # The pools average over the kept tokens in the masked sub-branch.
        if self.pool == "avg":
            x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="fc_norm")(x[:, 1:].mean(axis=1))
        elif self.pool == "normed_avg":
            x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x[:, 1:]).mean(axis=1)
        else:
            x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)[:, 0]
        head_init = nn.initializers.truncated_normal(self.head_init_std)
        logits = nn.Dense(self.num_classes, kernel_init=head_init, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# The family interface (masksub_jax/models/__init__.py).
NO_DECAY = ("pos_embed", "cls_token")
SUB_BRANCHES = ("masking", "dropout", "droppath")
POOLS = ("token", "avg", "normed_avg")
ACTIVATIONS = tuple(ACTIVATIONS)


def describe(config) -> str:
    return f"ViT-{config.model.variant}"


def check(config) -> None:
    try:
        patch = parse_variant(config.model.variant)[3]
    except ValueError as e:
        raise ValueError(f"Config model.variant={config.model.variant!r} is invalid: {e}") from None
    if config.model.pool not in POOLS:
        raise ValueError(f"Config model.pool={config.model.pool!r} is invalid: use one of {POOLS}.")
    if config.model.act not in ACTIVATIONS:
        raise ValueError(f"Config model.act={config.model.act!r} is invalid: use one of {ACTIVATIONS}.")
    if not 0 < config.model.norm_eps < 1:
        raise ValueError(f"Config model.norm_eps={config.model.norm_eps!r} is invalid: LayerNorm's epsilon is in "
                         "(0, 1); 1e-6 (DeiT-III, MAE) or 1e-5 (CLIP).")
    size = config.data.image_size
    if size <= 0 or size % patch:
        raise ValueError(f"Config data.image_size={size!r} is invalid: must be a positive multiple of the patch "
                         f"size {patch} of model.variant={config.model.variant!r}.")


def build(config, num_classes: int) -> ViT:
    m = config.model
    return ViT(num_classes=num_classes, variant=m.variant, drop_path=m.drop_path, dropout=m.dropout,
               layerscale_init=m.layerscale_init, pool=m.pool, pre_norm=m.pre_norm, act=m.act, norm_eps=m.norm_eps,
               head_init_std=m.head_init_std, remat=m.remat, scan=m.scan, dtype=jnp.dtype(m.dtype))


def num_units(config) -> int:
    """MaskSub's masking keeps or drops patch tokens."""
    return num_patches(config.data.image_size, parse_variant(config.model.variant)[3])


def layer_ids(params) -> dict:
    """Each parameter's layer for layer-wise lr decay, as MAE's get_layer_id_for_vit and FT-CLIP's
    get_num_layer_for_vit: 0 the embeddings (patch_embed, cls_token, pos_embed, CLIP's norm_pre),
    i + 1 block i, depth + 1 the rest (the final norms, head)."""
    if "blocks" in params:
        raise ValueError("layer_ids takes the unrolled blocks (blocks_0, ...): lay model.scan's out with unscanned.")
    depth = sum(1 for name in params if name.startswith("blocks_"))

    def layer(path, _):
        top = getattr(path[0], "key", str(path[0]))
        if top in ("patch_embed", "cls_token", "pos_embed", "norm_pre"):
            return 0
        return int(top.removeprefix("blocks_")) + 1 if top.startswith("blocks_") else depth + 1
    return jax.tree_util.tree_map_with_path(layer, params)


def forward_flops(config, num_classes: int, kept_units: int | None = None) -> float:
    """Matmul FLOPs of one image's forward pass; `kept_units` patch tokens enter the blocks."""
    width, depth, _, patch = parse_variant(config.model.variant)
    patches = num_units(config)
    n = 1 + (patches if kept_units is None else kept_units)
    embed = 2 * patches * patch * patch * len(config.data.mean) * width
    block = 24 * n * width * width + 4 * n * n * width  # qkv, proj, mlp; scores and weighted sum
    return embed + depth * block + 2 * width * num_classes


# --------------------------------------------------------------------------------------------------
# timm weights. Layouts read: timm's deit3_* (LayerScale ls1.gamma, pos_embed without a cls slot);
# the official DeiT-III and augsub checkpoints (LayerScale gamma_1 / gamma_2, `module.` prefixes);
# MAE pretraining (a cls slot, no LayerScale, its decoder and mask_token dropped) and MAE / timm
# global-pool fine-tuning (fc_norm, no final norm); augreg (a cls slot, no LayerScale); CLIP image
# towers in OpenAI's / open_clip's names (visual.conv1, visual.transformer.resblocks.N...) and in
# timm's vit_*_clip_* names (norm_pre, no patch bias), their final norm (ln_post) and projection left
# out for fine-tuning.
_BLOCK = {
    "norm1/scale": "norm1.weight", "norm1/bias": "norm1.bias",
    "norm2/scale": "norm2.weight", "norm2/bias": "norm2.bias",
    "attn/qkv/kernel": "attn.qkv.weight", "attn/qkv/bias": "attn.qkv.bias",
    "attn/proj/kernel": "attn.proj.weight", "attn/proj/bias": "attn.proj.bias",
    "mlp/fc1/kernel": "mlp.fc1.weight", "mlp/fc1/bias": "mlp.fc1.bias",
    "mlp/fc2/kernel": "mlp.fc2.weight", "mlp/fc2/bias": "mlp.fc2.bias",
    "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma",
}
_TOP = {"norm/scale": "norm.weight", "norm/bias": "norm.bias", "fc_norm/scale": "fc_norm.weight",
        "fc_norm/bias": "fc_norm.bias", "head/kernel": "head.weight", "head/bias": "head.bias",
        "patch_embed/kernel": "patch_embed.proj.weight", "patch_embed/bias": "patch_embed.proj.bias",
        "cls_token": "cls_token", "pos_embed": "pos_embed", "norm_pre/scale": "norm_pre.weight",
        "norm_pre/bias": "norm_pre.bias"}
# Keys of checkpoints that carry no parameters of this architecture and are dropped silently.
_IGNORED = re.compile(r"^(pos_drop|patch_drop|decoder_)|^mask_token$|\.num_batches_tracked$")
_OFFICIAL = ((re.compile(r"\.gamma_1$"), ".ls1.gamma"), (re.compile(r"\.gamma_2$"), ".ls2.gamma"))
# timm model names, e.g. deit3_base_patch16_224 or vit_huge_patch14_224.mae, as variant and image size.
_TIMM_NAME = re.compile(r"^(?:deit3|deit|vit)_(tiny|small|medium|base|large|huge)_patch(\d+)_(\d+)")
_TIMM_SIZES = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H"}


def _names(depth: int) -> dict[str, str]:
    names = dict(_TOP)
    for i in range(depth):
        names.update({f"blocks_{i}/{ours}": f"blocks.{i}.{theirs}" for ours, theirs in _BLOCK.items()})
    return names


# OpenAI's CLIP names (open_clip's are the same) of the image tower -> timm's, as timm's _convert_openai_clip.
_CLIP_NAMES = (("conv1.", "patch_embed.proj."), ("class_embedding", "cls_token"), ("positional_embedding", "pos_embed"),
               ("transformer.resblocks.", "blocks."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."),
               (".ln_1.", ".norm1."), (".ln_2.", ".norm2."), (".ls_1.", ".ls1."), (".ls_2.", ".ls2."),
               ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
               ("attn.out_proj.", "attn.proj."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))
QUICK_GELU_ASSUMED = ("The MLPs' activation is taken to be QuickGELU, as OpenAI trained CLIP; for weights "
                      "trained with exact GELU (OpenCLIP's LAION models) add --config.model.act=gelu.")


def _clip_tower(state_dict: dict) -> tuple[dict, list[str]]:
    """A CLIP state dict in OpenAI's / open_clip's names (the whole model with `visual.`, or the image
    tower alone) as timm's names of the tower, without CLIP's final norm and projection; and what was
    left out, one line each. Other state dicts as they are."""
    visual = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
    tower = visual or state_dict
    if "class_embedding" not in tower or "conv1.weight" not in tower:
        return state_dict, []
    notes = [f"CLIP's text tower ({len(state_dict) - len(visual)} tensors) is left out."] if visual else []
    sd = {}
    for key, value in tower.items():
        for ours, theirs in _CLIP_NAMES:
            key = key.replace(ours, theirs)
        value = np.asarray(value)
        sd[key] = value.reshape(1, 1, -1) if key == "cls_token" else value[None] if key == "pos_embed" else value
    dropped = sorted(k for k in sd if k == "proj" or k.startswith("norm."))
    notes.append(f"CLIP's final norm (ln_post) and projection ({', '.join(dropped)}) are left out: fine-tuning "
                 "starts a new norm and head (FT-CLIP).")
    return {k: v for k, v in sd.items() if k not in dropped}, notes


def _without_clip_projection(sd: dict) -> tuple[dict, list[str]]:
    """timm's CLIP towers (vit_*_clip_*.openai, .laion2b) keep CLIP's projection as a head with an
    all-zero bias, which no trained classifier has: it and CLIP's final norm are left out, as for
    OpenAI's names."""
    if "norm_pre.weight" not in sd or "head.bias" not in sd or np.any(sd["head.bias"]):
        return sd, []
    dropped = sorted(k for k in sd if k.startswith(("head.", "norm.")))
    return ({k: v for k, v in sd.items() if k not in dropped},
            [f"CLIP's final norm and projection ({', '.join(dropped)}; the projection is the head with an all-zero "
             "bias) are left out: fine-tuning starts a new norm and head (FT-CLIP)."])


def _has_cls_slot(positions: int) -> bool:
    """Whether a pos_embed of `positions` rows carries a cls slot: a square grid plus one (MAE, augreg)."""
    grid = int(round(np.sqrt(positions - 1)))
    return grid > 0 and grid * grid + 1 == positions


def _shape_variant(sd: dict) -> tuple[str | None, tuple[int, int, int], int]:
    """(our variant whose width and depth the weights have, or None; their (width, depth, patch); the
    image size they were made for)."""
    width, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    positions = sd["pos_embed"].shape[1]
    made_for = int(round(np.sqrt(positions - _has_cls_slot(positions)))) * patch
    names = [name for name, (w, d, _) in VARIANTS.items() if (w, d) == (width, depth)]
    return (f"{names[0]}/{patch}" if names else None), (width, depth, patch), made_for


def _shapes(width: int, depth: int, patch: int) -> str:
    return f"width {width}, depth {depth}, patch {patch}"


def timm_variant(name: str) -> tuple[str, int | None]:
    """Our variant and the image size of a timm model name ('deit3_base_patch16_224' -> ('B/16', 224));
    any other name as it is, without a size."""
    match = _TIMM_NAME.match(name)
    if match is None:
        return name, None
    return f"{_TIMM_SIZES[match.group(1)]}/{match.group(2)}", int(match.group(3))


def resolve_variant(variant: str | None, sd: dict) -> tuple[str, int]:
    """(our variant, the image size the weights were made for) from a variant ('B/16'), a timm model
    name ('deit3_base_patch16_224') or, if None, the weights' own shapes. A variant of another width,
    depth or patch size than the weights' is an error naming both."""
    found, shapes, made_for = _shape_variant(sd)
    if variant is None:
        if found is None:
            raise ConversionError(f"ViT weights of {_shapes(*shapes)} are none of our ViT variants "
                                  f"{sorted(VARIANTS)}; add the size to models/vit.py VARIANTS.")
        return found, made_for
    variant, named_size = timm_variant(variant)
    width, depth, _, patch = parse_variant(variant)
    if found is not None and (width, depth, patch) != shapes:
        raise ConversionError(f"The checkpoint does not fit ViT-{variant}: the weights are ViT-{found} "
                              f"({_shapes(*shapes)}). Leave out --variant to read it from the weights.")
    return variant, named_size or made_for


_QKV = re.compile(r"^blocks\.\d+\.attn\.qkv\.weight$")


def detect(state_dict) -> dict | None:
    """What a state dict says of itself if its key names are a ViT's (cls_token, pos_embed,
    blocks.N.attn.qkv), else None: {"variant", "image_size" (what pos_embed was made for),
    "num_classes" (0: no head), "config": the further config keys the weights imply}."""
    sd, notes = _canonical_and_notes(state_dict)
    if not ({"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(sd) and any(map(_QKV.match, sd))):
        return None
    if any(k.endswith(".attn.q_bias") or "relative_position_bias_table" in k for k in sd):
        return None  # BEiT's (models/beit.py), even with an absolute pos_embed (BEiT v1)
    variant, image_size = resolve_variant(None, sd)
    # LayerScale's presence: weights with it need a model with it (its init value is overwritten).
    config = {"model.layerscale_init": 1e-4 if "blocks.0.ls1.gamma" in sd else 0.0}
    if "fc_norm.weight" in sd:
        config["model.pool"] = "avg"
    head = sd.get("head.weight")
    said = {"variant": variant, "image_size": image_size, "num_classes": 0 if head is None else head.shape[0],
            "config": config, "notes": notes}
    if "norm_pre.weight" in sd:  # a CLIP tower
        config.update({"model.pre_norm": True, "model.norm_eps": 1e-5, "model.act": "quick_gelu"})
        if head is None:
            config["model.pool"] = "normed_avg"
        said["notes"] = [*said["notes"], QUICK_GELU_ASSUMED]
    return said


def _canonical(state_dict) -> dict:
    """timm's names for the official checkpoints' (module. prefix, gamma_1 / gamma_2) and CLIP's;
    dropped keys out."""
    return _canonical_and_notes(state_dict)[0]


def _canonical_and_notes(state_dict) -> tuple[dict, list[str]]:
    """`_canonical`, and what it left out of CLIP's weights, one line each."""
    state_dict, notes = _clip_tower({k.removeprefix("module."): v for k, v in state_dict.items()})
    sd = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, timm_name in _OFFICIAL:
            key = pattern.sub(timm_name, key)
        if not _IGNORED.search(key):
            sd[key] = np.asarray(value)
    sd, more = _without_clip_projection(sd)
    return sd, notes + more


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


def from_timm(state_dict, *, variant: str | None = None, image_size: int | None = None,
              num_classes: int | None = None) -> dict:
    """A timm / DeiT-III / augsub / MAE / augreg state dict (name -> array) as our parameter tree, at
    `image_size` (default: the size the weights were made for; pos_embed is resampled to it).

    `variant` may be ours ('B/16'), a timm model name, or None (read from the weights). The head is
    left out when the checkpoint has none or `num_classes` differs from it; the trainer then keeps its
    freshly initialised head. Raises ConversionError naming missing, unexpected and misshapen keys.
    """
    sd = _canonical(state_dict)
    variant, made_for = resolve_variant(variant, sd)
    image_size = image_size or made_for
    width, depth, _, patch = parse_variant(variant)
    names = _names(depth)
    has = {"layerscale": "blocks.0.ls1.gamma" in sd, "norm": "norm.weight" in sd, "fc_norm": "fc_norm.weight" in sd,
           "head": "head.weight" in sd and (num_classes is None or sd["head.weight"].shape[0] == num_classes),
           "norm_pre": "norm_pre.weight" in sd, "patch_embed/bias": "patch_embed.proj.bias" in sd}

    def in_checkpoint(ours: str) -> bool:
        if ours.endswith(("gamma_1", "gamma_2")):
            return has["layerscale"]
        return has.get(ours, has.get(ours.split("/")[0], True))
    expected = {theirs for ours, theirs in names.items() if in_checkpoint(ours)}
    missing = set(expected) - set(sd)
    unexpected = set(sd) - expected - ({"head.weight", "head.bias"} if not has["head"] else set())
    if missing or unexpected or not (has["norm"] or has["fc_norm"] or has["norm_pre"]):
        raise ConversionError(f"The checkpoint does not fit ViT-{variant}: missing keys {listed(missing)}, "
                              f"unexpected keys {listed(unexpected)}. Check --variant (width {width}, "
                              f"depth {depth}, patch {patch}), or leave it out to read it from the weights.")
    params = {ours: linear_to_ours(ours, sd[theirs]).astype(np.float32) for ours, theirs in names.items()
              if theirs in sd and theirs in expected}
    pos, cls = params["pos_embed"], params["cls_token"]
    grid = image_size // patch
    if _has_cls_slot(pos.shape[1]):
        params["cls_token"] = cls + pos[:, :1]
        pos = pos[:, 1:]
    params["pos_embed"] = resize_pos_embed(pos, grid)
    wanted = _expected_shapes(width, depth, patch, params["patch_embed/kernel"].shape[2],
                              params.get("head/kernel", np.zeros((1, 0))).shape[1], grid)
    wrong = [f"{k}: {params[k].shape} (ViT-{variant} wants {s})" for k, s in wanted.items()
             if k in params and params[k].shape != s]
    if wrong:
        raise ConversionError(f"Shapes do not fit ViT-{variant}: {'; '.join(wrong[:6])}.")
    return nest(params)


def _expected_shapes(width, depth, patch, channels, num_classes, grid) -> dict[str, tuple]:
    shapes = {"patch_embed/kernel": (patch, patch, channels, width), "patch_embed/bias": (width,),
              "norm_pre/scale": (width,), "norm_pre/bias": (width,),
              "cls_token": (1, 1, width), "pos_embed": (1, grid * grid, width), "norm/scale": (width,),
              "norm/bias": (width,), "fc_norm/scale": (width,), "fc_norm/bias": (width,),
              "head/kernel": (width, num_classes), "head/bias": (num_classes,)}
    block = {"norm1/scale": (width,), "norm1/bias": (width,), "norm2/scale": (width,), "norm2/bias": (width,),
             "attn/qkv/kernel": (width, 3 * width), "attn/qkv/bias": (3 * width,),
             "attn/proj/kernel": (width, width), "attn/proj/bias": (width,),
             "mlp/fc1/kernel": (width, 4 * width), "mlp/fc1/bias": (4 * width,),
             "mlp/fc2/kernel": (4 * width, width), "mlp/fc2/bias": (width,), "gamma_1": (width,), "gamma_2": (width,)}
    for i in range(depth):
        shapes.update({f"blocks_{i}/{k}": v for k, v in block.items()})
    return shapes


def to_timm(params) -> dict[str, np.ndarray]:
    """Our parameters as a timm state dict that `timm_model`'s model loads with `load_state_dict`:
    DeiT-III's (pos_embed without a cls slot), or with norm_pre a CLIP tower's (timm's vit_*_clip_*,
    whose pos_embed has a cls slot: zero, as the cls token already holds it)."""
    flat = unstacked(flatten(params))
    depth = len({k.split("/")[0] for k in flat if k.startswith("blocks_")})
    names = _names(depth)
    unknown = set(flat) - set(names)
    if unknown:
        raise ConversionError(f"Not parameters of our ViT: {listed(unknown)}.")
    sd = {names[k]: np.ascontiguousarray(linear_to_timm(k, v)) for k, v in flat.items()}
    if "norm_pre/scale" in flat:
        pos = sd["pos_embed"]
        sd["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    return sd


# The timm models our variants are built from (timm has no deit3_tiny: ViT-Ti is deit3_small, narrower).
_TIMM_MODELS = {"S": "deit3_small_patch16_224", "M": "deit3_medium_patch16_224", "B": "deit3_base_patch16_224",
                "L": "deit3_large_patch16_224", "H": "deit3_huge_patch14_224"}


# timm's CLIP towers, by our variant: vit_{size}_patch{patch}_clip[_quickgelu]_224.
_TIMM_CLIP_MODELS = {"B/16": "vit_base_patch16_clip", "B/32": "vit_base_patch32_clip",
                     "L/14": "vit_large_patch14_clip", "H/14": "vit_huge_patch14_clip"}


def timm_model(state_dict: dict, variant: str, image_size: int, config: dict | None = None) -> tuple[str, dict]:
    """The `timm.create_model` name and keyword arguments (besides num_classes) of the model that
    `state_dict` (to_timm's) loads into: a deit3_* model, with what differs from it (width, depth,
    heads, patch, image size, channels; no LayerScale and global-pool fc_norm for MAE's ViT); a CLIP
    tower (norm_pre) as timm's vit_*_clip[_quickgelu]_224, by `config`'s model.act and model.pool
    (the run's flat config; QuickGELU and the cls token where it does not say)."""
    width, depth, heads, patch = parse_variant(variant)
    if "norm_pre.weight" in state_dict:
        return _timm_clip_model(state_dict, variant, image_size, config or {})
    name = _TIMM_MODELS.get(variant.split("/")[0], _TIMM_MODELS["S"])
    timm_size, timm_patch, _ = _TIMM_NAME.match(name).groups()
    timm_width, timm_depth, timm_heads = VARIANTS[_TIMM_SIZES[timm_size]]
    kwargs = {}
    if (width, depth, heads) != (timm_width, timm_depth, timm_heads):
        kwargs.update(embed_dim=width, depth=depth, num_heads=heads)
    if patch != int(timm_patch):
        kwargs["patch_size"] = patch
    kwargs["img_size"] = image_size
    channels = state_dict["patch_embed.proj.weight"].shape[1]
    if channels != 3:
        kwargs["in_chans"] = channels
    if "blocks.0.ls1.gamma" not in state_dict:
        kwargs["init_values"] = 0  # no LayerScale (create_model drops keyword arguments of None)
    if "fc_norm.weight" in state_dict:
        kwargs["global_pool"] = "avg"  # timm then uses fc_norm and no final norm, as our pool="avg"
    return name, kwargs


def _timm_clip_model(state_dict: dict, variant: str, image_size: int, config: dict) -> tuple[str, dict]:
    width, depth, heads, patch = parse_variant(variant)
    quick = config.get("model.act", "quick_gelu") == "quick_gelu"
    base = _TIMM_CLIP_MODELS.get(variant, _TIMM_CLIP_MODELS["B/16"])
    name = f"{base}_quickgelu_224" if quick else f"{base}_224"
    timm_variant_, _ = timm_variant(base.replace("_clip", "") + "_224")
    kwargs = {}
    if timm_variant_ != variant:
        kwargs.update(embed_dim=width, depth=depth, num_heads=heads, patch_size=patch)
    kwargs["img_size"] = image_size
    if config.get("model.pool") == "normed_avg":
        kwargs.update(global_pool="avg", fc_norm=False)  # timm's final norm on every token, then the mean
    return name, kwargs


SCANNED = "blocks/block/"  # model.scan's parameters: "blocks/block/attn/qkv/kernel" (depth, ...)


def scanned(params: dict) -> dict:
    """The unrolled blocks' parameters ("blocks_3": {...}) laid out as model.scan's ("blocks":
    {"block": {...}}, block i at index i of each array); traceable. Others are returned as they are."""
    depth = sum(1 for name in params if name.startswith("blocks_"))
    if not depth:
        return params
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    def stack(*xs):  # NumPy stays NumPy (converted weights: no copy to a device, float64 kept)
        return np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)
    return out | {"blocks": {"block": jax.tree.map(stack, *(params[f"blocks_{i}"] for i in range(depth)))}}


def unscanned(params: dict) -> dict:
    """scanned's inverse; traceable."""
    if "block" not in params.get("blocks", {}):
        return params
    block = params["blocks"]["block"]
    depth = jax.tree.leaves(block)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "blocks"}
    return out | {f"blocks_{i}": jax.tree.map(lambda x, i=i: x[i], block) for i in range(depth)}


def stacked(flat: dict) -> dict:
    """`scanned` on flat NumPy parameters ("blocks_3/mlp/fc1/kernel": ...)."""
    return flatten(scanned(nest(flat)))


def unstacked(flat: dict) -> dict:
    """`unscanned` on flat NumPy parameters."""
    return flatten(unscanned(nest(flat)))


def fit(loaded: dict, initial: dict, say) -> dict:
    """config.init_from: the blocks stacked or unstacked to the configured model.scan; pos_embed
    resampled to the configured grid; LayerScale gammas of 1 for weights without LayerScale; a final
    norm the configured model does not have (MAE pretraining weights for the global-pool fine-tune)
    dropped, and a fresh fc_norm, as MAE's fine-tuning does."""
    scan = any(k.startswith(SCANNED) for k in initial)
    out = stacked(loaded) if scan else unstacked(loaded)
    pos = out.get("pos_embed")
    if (pos is not None and "pos_embed" in initial and pos.shape != initial["pos_embed"].shape
            and pos.shape[-1] == initial["pos_embed"].shape[-1]):  # another width: not a grid to resample
        out["pos_embed"] = resize_pos_embed(pos, int(round(np.sqrt(initial["pos_embed"].shape[1]))))
        say(f"init_from: resampled pos_embed from {pos.shape} to {out['pos_embed'].shape}.")
    fresh = [name for name in initial if name.startswith("norm/") and name not in out and "fc_norm/scale" not in out]
    if fresh:  # CLIP weights, whose final norm convert left out
        out.update({name: initial[name] for name in fresh})
        say("init_from: the weights have no final norm; it starts fresh (ones and zeros), as FT-CLIP's.")
    gammas = [name for name in initial if name.endswith(("/gamma_1", "/gamma_2")) and name not in out]
    if gammas:
        out.update({name: np.ones_like(initial[name]) for name in gammas})
        say("init_from: the weights have no LayerScale; the gammas start at 1 (the identity).")
    if "fc_norm/scale" in initial and "fc_norm/scale" not in out and "norm/scale" in out:
        out = {k: v for k, v in out.items() if not k.startswith("norm/")}
        out.update({k: v for k, v in initial.items() if k.startswith("fc_norm/")})
        say("init_from: model.pool='avg': the weights' final norm is dropped and fc_norm starts fresh (as MAE).")
    return out
