"""The train recipes' per-pixel ops on the host, in TensorFlow for tf.data, with stateless seeds:
`device.py`'s twins, op for op and name for name, on one uint8 HxWx3 image (tested against PIL;
the device's against these). `spec.py` holds what both read: the constants, the RandAugment spec
and op table.

Each op takes and returns a uint8 image and draws its randomness from a [2] int seed, so an
example's augmentation is a function of its seed alone. Semantics follow torchvision / timm on PIL
images (the official code); where they differ it says so.

  resize                antialiased bicubic, as PIL's (RandomResizedCrop's resize)
  three_augment         DeiT-III: one of grayscale / solarize / Gaussian blur, then colour jitter
  color_jitter          torchvision ColorJitter(b, c, s) with its random order of the three
  rand_augment          timm's RandAugment of a `spec.Spec`; geometric ops interpolate bilinearly
                        (timm picks bilinear or bicubic at random; TensorFlow's projective
                        transform has no bicubic)
Blends are computed in float and rounded once at the end of each op (PIL rounds after each blend
too). The crop, flip and decoding before them are `data/crop.py`'s; random erasing and mixup run on
the device (`erasing.py`, `mixing.py`).
"""
import math

import tensorflow as tf

from masksub_jax.augment import spec as spec_lib
from masksub_jax.augment.spec import BLUR_HALF_WIDTH, BLUR_SIGMA_RANGE, FILL, GRAY_WEIGHTS, Spec

# ------------------------------------------------------------------------------------------------
# The resize, 3-Augment and colour jitter.

def to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def resize(image, size):
    return tf.image.resize(image, size, method="bicubic", antialias=True)


def luma(image):
    """Float HxWx1 luma of a uint8 or float RGB image."""
    return tf.reduce_sum(tf.cast(image, tf.float32) * GRAY_WEIGHTS, axis=-1, keepdims=True)


def grayscale(image):
    """3 equal channels holding the luma (torchvision Grayscale(num_output_channels=3))."""
    return to_uint8(tf.repeat(luma(image), 3, axis=-1))


def solarize(image, threshold=128):
    """Pixels at or above `threshold` (any number; 256 inverts none) are inverted (PIL ImageOps.solarize)."""
    return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def gaussian_blur(image, sigma):
    """Separable Gaussian of standard deviation `sigma` (PIL's GaussianBlur radius), edges repeated."""
    x = tf.range(-BLUR_HALF_WIDTH, BLUR_HALF_WIDTH + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    kernel /= tf.reduce_sum(kernel)
    k = BLUR_HALF_WIDTH
    padded = tf.pad(tf.cast(image, tf.float32)[None], [[0, 0], [k, k], [k, k], [0, 0]], mode="SYMMETRIC")
    channels = tf.shape(image)[-1]
    vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    out = tf.nn.depthwise_conv2d(padded, vertical, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, horizontal, [1, 1, 1, 1], "VALID")
    return to_uint8(out[0])


def blend(degenerate, image, factor):
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), as float."""
    degenerate = tf.cast(degenerate, tf.float32)
    return degenerate + factor * (tf.cast(image, tf.float32) - degenerate)


def adjust_brightness(image, factor):
    return to_uint8(blend(tf.zeros_like(image, tf.float32), image, factor))


def adjust_contrast(image, factor):
    """Blend with the mean luma (torchvision adjust_contrast)."""
    return to_uint8(blend(tf.fill(tf.shape(image), tf.reduce_mean(luma(image))), image, factor))


def adjust_saturation(image, factor):
    return to_uint8(blend(tf.repeat(luma(image), 3, axis=-1), image, factor))


def color_jitter(image, seed, strength: float):
    """torchvision ColorJitter(brightness=s, contrast=s, saturation=s, hue=0): each factor uniform
    in [1 - s, 1 + s], the three applied in a random order."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    factors = tf.random.stateless_uniform([3], seeds[0], 1 - strength, 1 + strength)
    order = tf.argsort(tf.random.stateless_uniform([3], seeds[1]))
    ops = [adjust_brightness, adjust_contrast, adjust_saturation]
    for i in range(3):
        image = tf.switch_case(order[i], [lambda op=op, j=j: op(image, factors[j]) for j, op in enumerate(ops)])
    return image


def three_augment(image, seed, *, jitter: float):
    """DeiT-III's 3-Augment after crop and flip: one of grayscale, solarize, Gaussian blur (sigma
    uniform in 0.1-2.0), chosen uniformly; then colour jitter (0 = none)."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    choice = tf.random.stateless_uniform([], seeds[0], 0, 3, dtype=tf.int32)
    sigma = tf.random.stateless_uniform([], seeds[1], *BLUR_SIGMA_RANGE)
    image = tf.switch_case(choice, [lambda: grayscale(image), lambda: solarize(image),
                                    lambda: gaussian_blur(image, sigma)])
    return color_jitter(image, seeds[2], jitter) if jitter > 0 else image


# ------------------------------------------------------------------------------------------------
# RandAugment's ops: uint8 image and one float argument (scaled from the magnitude by the spec's
# map) -> uint8 image.

def auto_contrast(image, _):
    """Each channel stretched to 0-255 (PIL ImageOps.autocontrast, cutoff 0; the LUT truncates)."""
    lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float32)
    hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float32)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, -lo * scale, 0.0)
    return tf.cast(tf.clip_by_value(tf.floor(tf.cast(image, tf.float32) * scale + offset), 0, 255), tf.uint8)


def _equalize_channel(channel):
    hist = tf.math.bincount(tf.cast(channel, tf.int32), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - last) // 255
    lut = tf.clip_by_value((tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1), 0, 255)
    return tf.where(step > 0, tf.cast(tf.gather(lut, tf.cast(channel, tf.int32)), tf.uint8), channel)


def equalize(image, _):
    """Per-channel histogram equalisation (PIL ImageOps.equalize)."""
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image, _):
    return 255 - image


def posterize(image, bits):
    """Keep the `bits` most significant bits of each pixel (0 bits: black)."""
    bits = tf.cast(bits, tf.int32)
    mask = tf.bitwise.left_shift(tf.constant(255, tf.int32), 8 - bits) & 255
    return tf.where(bits >= 8, image, tf.cast(tf.cast(image, tf.int32) & mask, tf.uint8))


def solarize_add(image, addition, threshold=128):
    """Pixels below `threshold` brightened by `addition` (clipped at 255)."""
    added = tf.cast(tf.minimum(tf.cast(image, tf.float32) + addition, 255), tf.uint8)
    return tf.where(image < threshold, added, image)


def color(image, factor):
    return adjust_saturation(image, factor)


def contrast(image, factor):
    """PIL ImageEnhance.Contrast: blend with a flat image of the rounded mean luma."""
    mean = tf.floor(tf.reduce_mean(tf.floor(luma(image) + 0.5)) + 0.5)
    return to_uint8(blend(tf.fill(tf.shape(image), mean), image, factor))


def brightness(image, factor):
    return adjust_brightness(image, factor)


def sharpness(image, factor):
    """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (borders unfiltered)."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones(tf.shape(image)[:2] - 2), [[1, 1], [1, 1]])[..., None] > 0
    degenerate = tf.where(interior, smooth, tf.cast(image, tf.float32))
    return to_uint8(blend(degenerate, image, factor))


def _transform(image, matrix):
    """Output pixel (x, y) samples the input at matrix @ (x, y, 1) (pixel centres at integers),
    bilinear, FILL outside the image."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    with_ones = tf.concat([tf.cast(image, tf.float32), tf.ones([h, w, 1])], axis=-1)[None]
    transforms = tf.concat([tf.reshape(tf.cast(matrix, tf.float32), [6]), tf.zeros([2])], axis=0)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=with_ones, transforms=transforms, output_shape=tf.stack([h, w]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    inside = out[..., 3:]
    return to_uint8(out[..., :3] + (1 - inside) * tf.constant(FILL, tf.float32))


def _pil_affine(a, b, c, d, e, f):
    """PIL's AFFINE data (which addresses pixel edges) as a matrix on pixel centres."""
    return [a, b, c + 0.5 * (a + b - 1), d, e, f + 0.5 * (d + e - 1)]


def rotate(image, degrees):
    """Counter-clockwise about the centre (PIL Image.rotate)."""
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    r = degrees * math.pi / 180
    cos, sin = tf.cos(r), tf.sin(r)
    return _transform(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


def shear_x(image, factor):
    return _transform(image, _pil_affine(1.0, factor, 0.0, 0.0, 1.0, 0.0))


def shear_y(image, factor):
    return _transform(image, _pil_affine(1.0, 0.0, 0.0, factor, 1.0, 0.0))


def translate_x_rel(image, fraction):
    return _transform(image, [1.0, 0.0, fraction * tf.cast(tf.shape(image)[1], tf.float32), 0.0, 1.0, 0.0])


def translate_y_rel(image, fraction):
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, fraction * tf.cast(tf.shape(image)[0], tf.float32)])


# ------------------------------------------------------------------------------------------------
# RandAugment.

OP_TABLE = spec_lib.op_table(globals())  # name: (op, magnitude -> argument)


def apply_op(name: str, image, magnitude, sign=1.0):
    op, to_argument = OP_TABLE[name]
    return op(image, to_argument(tf.cast(magnitude, tf.float32), tf.cast(sign, tf.float32)))


def noisy_magnitude(spec: Spec, seed):
    """The magnitude of one application: m plus Gaussian noise of std mstd, clipped to [0, mmax]."""
    if spec.magnitude_std == math.inf:
        m = tf.random.stateless_uniform([], seed, 0.0, spec.magnitude)
    elif spec.magnitude_std > 0:
        m = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal([], seed)
    else:
        m = tf.constant(spec.magnitude, tf.float32)
    return tf.clip_by_value(m, 0.0, spec.magnitude_max)


def rand_augment(image, seed, spec: Spec):
    """`spec.num_layers` ops drawn uniformly with replacement, each applied with `spec.prob`."""
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, spec.num_layers)):
        s = tf.random.experimental.stateless_split(layer_seed, 4)
        choice = tf.random.stateless_uniform([], s[0], 0, len(spec.ops), dtype=tf.int32)
        applied = tf.random.stateless_uniform([], s[1]) <= spec.prob
        magnitude = noisy_magnitude(spec, s[2])
        sign = tf.where(tf.random.stateless_uniform([], s[3]) > 0.5, -1.0, 1.0)
        branches = [lambda name=name, image=image: apply_op(name, image, magnitude, sign) for name in spec.ops]
        image = tf.cond(applied, lambda branches=branches: tf.switch_case(choice, branches), lambda image=image: image)
    return image


# ------------------------------------------------------------------------------------------------
# The recipe.

def make(data_config):
    """(image, seed) -> the image with the recipe `data_config.augment` names applied after crop,
    resize and flip: 3-Augment, RandAugment, or colour jitter alone (`crop_flip`)."""
    d = data_config
    spec = spec_lib.parse(d.augment) if d.augment.startswith("rand") else None

    def augment(image, seed):
        if d.augment == "3augment":
            return three_augment(image, seed, jitter=d.color_jitter)
        if spec is not None:
            return rand_augment(image, seed, spec)
        if d.color_jitter > 0:
            return color_jitter(image, seed, d.color_jitter)
        return image
    return augment
