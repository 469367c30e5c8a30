"""ResNet (He et al., 2016) in Flax Linen as timm builds it for "ResNet strikes back", with BatchNorm
and MaskSub's zeroed-patch sub-branch.

Matches timm's `resnet50` / `resnet101` / `resnet152` (e.g. the `resnet50.a2_in1k` weights) and
`resnet18` / `resnet34` (timm's models/resnet.py): a 7x7 stride-2 stem conv, BatchNorm, ReLU and a 3x3
stride-2 max-pool; four stages of residual blocks, either bottlenecks (50 and up: 1x1, 3x3 carrying the
stage's stride, 1x1 to 4x the width) or basic blocks (18, 34: 3x3 carrying the stride, 3x3, at the
stage's width); a 1x1 conv + BatchNorm shortcut where the shape changes; the last BatchNorm of each
block starting at gamma 0 (timm's zero_init_last); drop-path rising linearly over the blocks; global
average pool; the classifier (`head` here, `fc` in timm).

BatchNorm is PyTorch's: eps 1e-5, momentum 0.1, the running variance updated with the unbiased batch
variance; training normalises with the batch's statistics, evaluation with the running ones. Which
examples share statistics is `model.bn_group_size` (see `BatchNorm`). The running statistics live in
the `batch_stats` collection, which the trainer keeps in its state beside the parameters.

How MaskSub corrupts the input of this model (the sub-branch forward):
  masking:   the normalised, mixed image is cut into `block_size`-pixel squares (32 px, the official
             choice); `keep_idx` (batch, kept) are the kept squares (row-major), every pixel of the
             others is set to 0. BatchNorm runs in training mode here too, so a MaskSub step updates
             the running statistics twice (main branch, then sub-branch), as the official code does.
  droppath:  `drop_path_rate` replaces every block's drop-path rate (constant over depth).
  The official ResNet code has no dropout sub-branch, and this model none either.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax.models.layers import Dropout, DropPath, conv_init, keep_blocks
from masksub_jax.models.weights import ConversionError, flatten, linear_to_ours, linear_to_timm, listed, nest

# name -> (blocks per stage, stem width, stage widths, block): a bottleneck's output is 4x its stage's
# width, a basic block's 1x (BLOCKS). timm: resnet18/34 (BasicBlock), resnet50/101/152 (Bottleneck).
VARIANTS = {
    "mu": ((1, 1, 1, 1), 8, (8, 16, 32, 64), "bottleneck"),  # digits-sized; not a published model
    "18": ((2, 2, 2, 2), 64, (64, 128, 256, 512), "basic"),
    "34": ((3, 4, 6, 3), 64, (64, 128, 256, 512), "basic"),
    "50": ((3, 4, 6, 3), 64, (64, 128, 256, 512), "bottleneck"),
    "101": ((3, 4, 23, 3), 64, (64, 128, 256, 512), "bottleneck"),
    "152": ((3, 8, 36, 3), 64, (64, 128, 256, 512), "bottleneck"),
}
EXPANSION = {"bottleneck": 4, "basic": 1}  # a block's output width / its stage's width
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's: running = (1 - momentum) * running + momentum * batch

# timm's init: convs kaiming-normal over fan_out (ReLU gain); the classifier PyTorch's Linear default.
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # jax: "normal" is untruncated


def linear_bias_init(fan_in: int):
    """PyTorch Linear's bias: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over the last axis, with statistics shared by groups of `group_size`
    consecutive examples (0: the whole batch the forward sees).

    The official RSB runs (8 GPUs x 256, DistributedDataParallel without SyncBN) normalise each GPU's
    256 examples by their own statistics: `group_size=256` computes exactly that on any number of
    devices, so the result does not depend on how the batch is split. The running statistics move
    once per forward by the mean over groups of each group's mean and unbiased variance (what timm's
    end-of-epoch "reduce" of the per-GPU buffers approximates)."""
    group_size: int = 0
    zero_init: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.zeros if self.zero_init else nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if not train:
            y = (x.astype(jnp.float32) - running_mean.value) * jax.lax.rsqrt(running_var.value + BN_EPS)
            return (y * scale + bias).astype(self.dtype)
        group = self.group_size or x.shape[0]
        groups = x.reshape(x.shape[0] // group, group, -1, channels).astype(jnp.float32)  # (G, group, HW, C)
        mean = groups.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(groups - mean).mean(axis=(1, 2), keepdims=True)  # biased: what normalises
        if not self.is_initializing():
            count = group * groups.shape[2]
            unbiased = var * count / max(count - 1, 1)
            running_mean.value = (1 - BN_MOMENTUM) * running_mean.value + BN_MOMENTUM * mean.mean(axis=(0, 1, 2))
            running_var.value = (1 - BN_MOMENTUM) * running_var.value + BN_MOMENTUM * unbiased.mean(axis=(0, 1, 2))
        y = ((groups - mean) * jax.lax.rsqrt(var + BN_EPS)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


class Bottleneck(nn.Module):
    """relu(x' + drop_path(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))), x' = x or its projection."""
    width: int
    stride: int
    project: bool  # a 1x1 conv + BatchNorm shortcut (timm's `downsample`)
    drop_path: float
    bn_group_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool, example_ids):
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=he_fan_out, dtype=self.dtype)
        norm = functools.partial(BatchNorm, self.bn_group_size, dtype=self.dtype)
        y = nn.relu(norm(name="bn1")(conv(self.width, (1, 1), name="conv1")(x), train))
        y = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y, train))
        y = norm(zero_init=True, name="bn3")(conv(self.width * EXPANSION["bottleneck"], (1, 1), name="conv3")(y), train)
        y = DropPath(self.drop_path)(y, not train, example_ids)
        if self.project:
            x = conv(self.width * EXPANSION["bottleneck"], (1, 1), strides=self.stride, name="downsample_0")(x)
            x = norm(name="downsample_1")(x, train)
        return nn.relu(y + x)


class BasicBlock(nn.Module):
    """relu(x' + drop_path(bn2(conv2(relu(bn1(conv1(x))))))), both convs 3x3, conv1 carrying the stride,
    x' = x or its projection (timm's BasicBlock, ResNet-18/34)."""
    width: int
    stride: int
    project: bool  # a 1x1 conv + BatchNorm shortcut (timm's `downsample`)
    drop_path: float
    bn_group_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool, example_ids):
        conv = functools.partial(nn.Conv, self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                                 kernel_init=he_fan_out, dtype=self.dtype)
        norm = functools.partial(BatchNorm, self.bn_group_size, dtype=self.dtype)
        y = nn.relu(norm(name="bn1")(conv(strides=self.stride, name="conv1")(x), train))
        y = norm(zero_init=True, name="bn2")(conv(name="conv2")(y), train)
        y = DropPath(self.drop_path)(y, not train, example_ids)
        if self.project:
            x = nn.Conv(self.width, (1, 1), strides=self.stride, use_bias=False, kernel_init=he_fan_out,
                        dtype=self.dtype, name="downsample_0")(x)
            x = norm(name="downsample_1")(x, train)
        return nn.relu(y + x)


BLOCKS = {"bottleneck": Bottleneck, "basic": BasicBlock}


class ResNet(nn.Module):
    """ResNet on normalised images (batch, H, W, C); returns float32 logits (batch, num_classes).

    In training mode apply it with `mutable=["batch_stats"]`. `dtype` is the compute dtype (bfloat16
    for mixed precision); parameters and BatchNorm statistics stay float32.
    """
    num_classes: int
    variant: str = "50"
    drop_path: float = 0.0
    dropout: float = 0.0  # before the classifier (timm's drop_rate)
    block_size: int = 32
    bn_group_size: int = 0
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False, keep_idx: jax.Array | None = None,
                 dropout_rate: float | None = None, drop_path_rate: float | None = None, first_example=0):
        if dropout_rate is not None:
            raise ValueError("ResNet has no dropout sub-branch; use masksub.mode=masking or droppath.")
        depths, stem_width, widths, kind = parse_variant(self.variant)
        if keep_idx is not None:
            images = keep_blocks(images, keep_idx, self.block_size, fill=0.0)
        example_ids = first_example + jnp.arange(images.shape[0])
        x = nn.Conv(stem_width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False, kernel_init=he_fan_out,
                    dtype=self.dtype, name="conv1")(images)
        x = nn.relu(BatchNorm(self.bn_group_size, dtype=self.dtype, name="bn1")(x, train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        block = nn.remat(BLOCKS[kind], static_argnums=(2,)) if self.remat else BLOCKS[kind]
        expansion = EXPANSION[kind]
        rates = (np.full(sum(depths), drop_path_rate) if drop_path_rate is not None
                 else np.linspace(0.0, self.drop_path, sum(depths)))
        index, channels = 0, stem_width
        for i, (depth, width) in enumerate(zip(depths, widths)):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                project = j == 0 and (stride != 1 or channels != width * expansion)
                x = block(width, stride, project, float(rates[index]), self.bn_group_size, self.dtype,
                          name=f"layer{i + 1}_{j}")(x, train, example_ids)
                index, channels = index + 1, width * expansion
        x = Dropout(self.dropout)(x.mean(axis=(1, 2)), not train, example_ids)
        logits = nn.Dense(self.num_classes, kernel_init=conv_init, bias_init=linear_bias_init(channels),
                          dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32)


def parse_variant(variant: str) -> tuple[tuple, int, tuple, str]:
    """'50' -> (blocks per stage, stem width, stage widths, block: "bottleneck" or "basic"). Raises
    ValueError naming the known variants."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown ResNet variant {variant!r}: use one of {sorted(VARIANTS)}.")
    return VARIANTS[variant]


# --------------------------------------------------------------------------------------------------
# The family interface (masksub_jax/models/__init__.py).
STATE_COLLECTIONS = ("batch_stats",)
SUB_BRANCHES = ("masking", "droppath")  # no dropout sub-branch, as in the official code


def describe(config) -> str:
    return f"ResNet-{config.model.variant}"


def check(config) -> None:
    try:
        parse_variant(config.model.variant)
    except ValueError as e:
        raise ValueError(f"Config model.variant={config.model.variant!r} is invalid: {e}") from None
    size, block = config.data.image_size, config.masksub.block_size
    if block < 1 or size % block:
        raise ValueError(f"Config masksub.block_size={block!r} is invalid: the zeroed squares must tile "
                         f"data.image_size={size}; use a divisor of it (32 at 224 px, as the official code).")
    group, micro_batch = config.model.bn_group_size, config.batch_size // max(config.accum_steps, 1)
    if group < 0 or (group and micro_batch % group):
        raise ValueError(f"Config model.bn_group_size={group!r} is invalid: BatchNorm's statistics groups must "
                         f"divide the batch each forward sees ({micro_batch} = batch_size / accum_steps); "
                         "0 = the whole batch.")


def build(config, num_classes: int) -> ResNet:
    m = config.model
    return ResNet(num_classes=num_classes, variant=m.variant, drop_path=m.drop_path, dropout=m.dropout,
                  block_size=config.masksub.block_size, bn_group_size=m.bn_group_size, remat=m.remat,
                  dtype=jnp.dtype(m.dtype))


def num_units(config) -> int:
    """MaskSub's masking keeps or zeroes squares of block_size x block_size pixels."""
    return (config.data.image_size // config.masksub.block_size) ** 2


def forward_flops(config, num_classes: int, kept_units: int | None = None) -> float:
    """Conv and classifier FLOPs of one image's forward pass. Zeroed squares are still convolved:
    `kept_units` costs nothing less."""
    del kept_units
    depths, stem_width, widths, kind = parse_variant(config.model.variant)
    expansion = EXPANSION[kind]

    def conv(size, k, stride, cin, cout):  # -> (FLOPs, output size), PyTorch's padding k // 2
        out = (size + 2 * (k // 2) - k) // stride + 1
        return 2 * out * out * k * k * cin * cout, out
    flops, size = conv(config.data.image_size, 7, 2, len(config.data.mean), stem_width)
    size = (size + 2 - 3) // 2 + 1  # max-pool
    channels = stem_width
    for i, (depth, width) in enumerate(zip(depths, widths)):
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            if kind == "basic":  # 3x3 with the stride, 3x3
                f1, out = conv(size, 3, stride, channels, width)
                f2, _ = conv(out, 3, 1, width, width)
                f3 = 0
            else:  # 1x1, 3x3 with the stride, 1x1
                f1, _ = conv(size, 1, 1, channels, width)
                f2, out = conv(size, 3, stride, width, width)
                f3, _ = conv(out, 1, 1, width, width * expansion)
            if j == 0 and (stride != 1 or channels != width * expansion):
                f3 += conv(size, 1, stride, channels, width * expansion)[0]
            flops, size, channels = flops + f1 + f2 + f3, out, width * expansion
    return flops + 2 * channels * num_classes


# --------------------------------------------------------------------------------------------------
# timm weights. Our names are timm's with "_" for ".": layer1_0/downsample_0/kernel is
# layer1.0.downsample.0.weight; BatchNorm's scale/bias are weight/bias, its batch_stats mean/var are
# running_mean/running_var; `head` is timm's `fc`. num_batches_tracked (unused with a momentum) is
# dropped on the way in and written as 0 on the way out.
def _timm_module(ours: str) -> str:
    module = ours.replace("_", ".")
    return "fc" if module == "head" else module


def _expected_shapes(variant: str, channels: int, num_classes: int) -> dict[str, tuple]:
    """Flat "collection/module/leaf" -> shape of every array of the model."""
    depths, stem_width, widths, kind = parse_variant(variant)
    expansion = EXPANSION[kind]
    shapes = {"params/conv1/kernel": (7, 7, channels, stem_width)}

    def batch_norm(name, width):
        shapes.update({f"params/{name}/scale": (width,), f"params/{name}/bias": (width,),
                       f"batch_stats/{name}/mean": (width,), f"batch_stats/{name}/var": (width,)})
    batch_norm("bn1", stem_width)
    inputs = stem_width
    for i, (depth, width) in enumerate(zip(depths, widths)):
        for j in range(depth):
            name = f"layer{i + 1}_{j}"
            convs = ({"conv1": (3, inputs, width), "conv2": (3, width, width)} if kind == "basic" else
                     {"conv1": (1, inputs, width), "conv2": (3, width, width), "conv3": (1, width, width * expansion)})
            for conv, (k, cin, cout) in convs.items():
                shapes[f"params/{name}/{conv}/kernel"] = (k, k, cin, cout)
            for n, (_, _, cout) in enumerate(convs.values(), 1):  # bnN follows convN
                batch_norm(f"{name}/bn{n}", cout)
            if j == 0 and (i > 0 or inputs != width * expansion):
                shapes[f"params/{name}/downsample_0/kernel"] = (1, 1, inputs, width * expansion)
                batch_norm(f"{name}/downsample_1", width * expansion)
            inputs = width * expansion
    if num_classes:
        shapes.update({"params/head/kernel": (inputs, num_classes), "params/head/bias": (num_classes,)})
    return shapes


_LEAF_TO_TIMM = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _timm_name(ours: str) -> str:
    """'batch_stats/layer1_0/bn1/mean' -> 'layer1.0.bn1.running_mean'."""
    _, *path, leaf = ours.split("/")
    return f"{_timm_module('/'.join(path)).replace('/', '.')}.{_LEAF_TO_TIMM[leaf]}"


def _canonical(state_dict) -> dict:
    return {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()
            if not k.endswith("num_batches_tracked")}


def _block_kind(sd: dict) -> str:
    """"bottleneck" where the blocks have a conv3 (timm's Bottleneck), else "basic" (BasicBlock: conv1, conv2)."""
    return "bottleneck" if any(k.startswith("layer") and ".conv3." in k for k in sd) else "basic"


def _shape_variant(sd: dict) -> tuple[str | None, str]:
    """(our variant with the weights' block, blocks per stage, stem and stage widths, or None; what the
    shapes say)."""
    kind = _block_kind(sd)
    depths = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    stem = sd["conv1.weight"].shape[0] if "conv1.weight" in sd else 0
    widths = tuple(sd[f"layer{i}.0.conv1.weight"].shape[0] if f"layer{i}.0.conv1.weight" in sd else 0
                   for i in range(1, 5))
    names = [name for name, shape in VARIANTS.items() if shape == (depths, stem, widths, kind)]
    return (names[0] if names else None), (f"{kind} blocks, blocks per stage {depths}, stem width {stem}, "
                                           f"stage widths {widths}")


def resolve_variant(variant: str | None, sd: dict) -> str:
    """The given variant, else the weights'. A variant of another block layout or other shapes than the
    weights' is an error naming both."""
    found, shapes = _shape_variant(sd)
    if variant is None:
        if found is None:
            raise ConversionError(f"ResNet weights of {shapes} are none of our ResNet variants {sorted(VARIANTS)}; "
                                  "add the size to models/resnet.py VARIANTS.")
        return found
    try:
        kind = parse_variant(variant)[3]
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if kind != _block_kind(sd) or (found is not None and found != variant and VARIANTS[found] != VARIANTS[variant]):
        weights_are = f"the weights are ResNet-{found} ({shapes})" if found else f"the weights have {shapes}"
        raise ConversionError(f"The checkpoint does not fit ResNet-{variant} ({kind} blocks): {weights_are}. Leave "
                              "out --variant to read it from the weights.")
    return variant


def detect(state_dict) -> dict | None:
    """What a state dict says of itself if its key names are a ResNet's (conv1, bn1, layer1.0.conv1),
    else None: {"variant", "image_size": None (a ResNet fits any), "num_classes" (0: no head), "config": {}}."""
    sd = _canonical(state_dict)
    if not {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight"} <= set(sd):
        return None
    head = sd.get("fc.weight")
    return {"variant": resolve_variant(None, sd), "image_size": None,
            "num_classes": 0 if head is None else head.shape[0], "config": {}}


def from_timm(state_dict, *, variant: str | None = None, image_size: int | None = None,
              num_classes: int | None = None) -> dict:
    """A timm ResNet state dict (e.g. resnet50.a2_in1k, resnet18.a1_in1k, or the official augsub checkpoints) as our
    variables {"params": ..., "batch_stats": ...}; `variant` defaults to the weights' (detect). The head
    is left out when its class count differs from `num_classes`. Raises ConversionError naming
    missing, unexpected and misshapen keys."""
    del image_size  # a ResNet's weights fit every image size
    sd = _canonical(state_dict)
    variant = resolve_variant(variant, sd)
    channels = sd["conv1.weight"].shape[1] if "conv1.weight" in sd else 3
    has_head = "fc.weight" in sd and (num_classes is None or sd["fc.weight"].shape[0] == num_classes)
    shapes = _expected_shapes(variant, channels, sd["fc.weight"].shape[0] if has_head else 0)
    wanted = {ours: _timm_name(ours) for ours in shapes}
    missing = set(wanted.values()) - set(sd)
    unexpected = set(sd) - set(wanted.values()) - ({"fc.weight", "fc.bias"} if not has_head else set())
    if missing or unexpected:
        raise ConversionError(f"The checkpoint does not fit ResNet-{variant}: missing keys {listed(missing)}, "
                              f"unexpected keys {listed(unexpected)}. Check --variant.")
    flat = {ours: linear_to_ours(ours, sd[theirs]).astype(np.float32) for ours, theirs in wanted.items()}
    wrong = [f"{k}: {v.shape} (ResNet-{variant} wants {shapes[k]})" for k, v in flat.items() if v.shape != shapes[k]]
    if wrong:
        raise ConversionError(f"Shapes do not fit ResNet-{variant}: {'; '.join(wrong[:6])}.")
    return nest(flat)


def to_timm(variables) -> dict[str, np.ndarray]:
    """Our variables {"params": ..., "batch_stats": ...} as a timm ResNet state dict
    (`timm.create_model('resnet50').load_state_dict(sd, strict=True)` loads it)."""
    out = {_timm_name(k): np.ascontiguousarray(linear_to_timm(k, v)) for k, v in flatten(variables).items()}
    for name in [k for k in out if k.endswith("running_var")]:
        out[name.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    return out


def timm_model(state_dict: dict, variant: str, image_size: int | None = None,
               config: dict | None = None) -> tuple[str, dict] | None:
    """The `timm.create_model` name and keyword arguments (besides num_classes) of the model that
    `state_dict` (to_timm's) loads into: resnet18/34/50/101/152, or resnet18 (basic blocks) or resnet50
    (bottlenecks) with our variant's blocks per stage and widths. None where timm has no such model:
    its 7x7 stem is always 64 channels wide."""
    del image_size, config  # a ResNet takes any image size; the variant says all timm needs
    depths, stem_width, widths, kind = parse_variant(variant)
    if stem_width != 64:
        return None
    name = variant if variant in ("34", "101", "152") else "18" if kind == "basic" else "50"
    kwargs = {}
    if (depths, widths) != (VARIANTS[name][0], VARIANTS[name][2]):
        kwargs.update(layers=depths, channels=widths)
    channels = state_dict["conv1.weight"].shape[1]
    if channels != 3:
        kwargs["in_chans"] = channels
    return f"resnet{name}", kwargs
