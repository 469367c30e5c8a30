"""timm's RandAugment in TensorFlow: `rand-m9-mstd0.5-inc1` (DeiT-III fine-tuning, MAE, Swin),
`rand-m7-mstd0.5` (ResNet RSB), or any spec in timm's grammar.

A spec is `rand` then dash-separated options: `m` magnitude (0-10), `n` ops per image (default 2),
`mstd` std of the Gaussian noise added to the magnitude at every application (`inf`: uniform in
[0, m]), `mmax` upper clip of the noisy magnitude (default 10), `p` probability that a chosen op is
applied (default 0.5), `inc1` the "increasing" op set (stronger with magnitude). Each image draws n
ops uniformly with replacement. Geometric ops fill with the ImageNet mean colour (timm's img_mean)
and interpolate bilinearly (timm picks bilinear or bicubic at random; TensorFlow's projective
transform has no bicubic).
"""
import dataclasses
import math
import re

import tensorflow as tf

from masksub_jax.data import augment

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM
FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's img_mean


@dataclasses.dataclass(frozen=True)
class Spec:
    magnitude: float
    num_layers: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = MAX_LEVEL
    prob: float = 0.5
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS


def parse(spec: str) -> Spec:
    """'rand-m9-mstd0.5-inc1' -> Spec; a ValueError names what is wrong and the grammar."""
    grammar = "'rand-m<magnitude>[-n<ops>][-mstd<std>][-mmax<max>][-p<prob>][-inc<0|1>]', e.g. 'rand-m9-mstd0.5-inc1'"
    parts = spec.split("-")
    if parts[0] != "rand" or len(parts) < 2:
        raise ValueError(f"RandAugment spec {spec!r} must look like {grammar}.")
    values = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(inf|\d+(?:\.\d*)?)", part)
        if not match:
            raise ValueError(f"RandAugment spec {spec!r}: unknown option {part!r}; the grammar is {grammar}.")
        values[match.group(1)] = float(match.group(2))
    if "m" not in values:
        raise ValueError(f"RandAugment spec {spec!r} has no magnitude (m); the grammar is {grammar}.")
    out = Spec(magnitude=values["m"], num_layers=int(values.get("n", 2)), magnitude_std=values.get("mstd", 0.0),
               magnitude_max=values.get("mmax", MAX_LEVEL), prob=values.get("p", 0.5),
               increasing=bool(values.get("inc", 0)))
    if not (0 <= out.magnitude <= out.magnitude_max and out.num_layers >= 1 and 0 < out.prob <= 1):
        raise ValueError(f"RandAugment spec {spec!r}: need 0 <= m <= mmax, n >= 1 and 0 < p <= 1.")
    return out


# ------------------------------------------------------------------------------------------------
# The ops: uint8 image and one float argument (already scaled from the magnitude) -> uint8 image.

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
    return augment.adjust_saturation(image, factor)


def contrast(image, factor):
    """PIL ImageEnhance.Contrast: blend with a flat image of the rounded mean luma."""
    mean = tf.floor(tf.reduce_mean(tf.floor(augment.luma(image) + 0.5)) + 0.5)
    return augment.to_uint8(augment.blend(tf.fill(tf.shape(image), mean), image, factor))


def brightness(image, factor):
    return augment.adjust_brightness(image, factor)


def sharpness(image, factor):
    """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (borders unfiltered)."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones(tf.shape(image)[:2] - 2), [[1, 1], [1, 1]])[..., None] > 0
    degenerate = tf.where(interior, smooth, tf.cast(image, tf.float32))
    return augment.to_uint8(augment.blend(degenerate, image, factor))


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
    return augment.to_uint8(out[..., :3] + (1 - inside) * tf.constant(FILL, tf.float32))


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
# timm's op sets and magnitude -> argument maps (`m` in [0, 10], `sign` = +-1 drawn per application).

def _enhance(m, _):
    return m / MAX_LEVEL * 1.8 + 0.1


def _enhance_increasing(m, sign):
    return 1.0 + sign * m / MAX_LEVEL * 0.9


OP_TABLE = {  # name: (op, magnitude -> argument)
    "AutoContrast": (auto_contrast, lambda m, s: 0.0),
    "Equalize": (equalize, lambda m, s: 0.0),
    "Invert": (invert, lambda m, s: 0.0),
    "Rotate": (rotate, lambda m, s: s * m / MAX_LEVEL * 30.0),
    "Posterize": (posterize, lambda m, s: tf.floor(m / MAX_LEVEL * 4)),
    "PosterizeIncreasing": (posterize, lambda m, s: 4 - tf.floor(m / MAX_LEVEL * 4)),
    "Solarize": (augment.solarize, lambda m, s: tf.floor(m / MAX_LEVEL * 256)),
    "SolarizeIncreasing": (augment.solarize, lambda m, s: 256 - tf.floor(m / MAX_LEVEL * 256)),
    "SolarizeAdd": (solarize_add, lambda m, s: tf.floor(m / MAX_LEVEL * 110)),
    "Color": (color, _enhance),
    "ColorIncreasing": (color, _enhance_increasing),
    "Contrast": (contrast, _enhance),
    "ContrastIncreasing": (contrast, _enhance_increasing),
    "Brightness": (brightness, _enhance),
    "BrightnessIncreasing": (brightness, _enhance_increasing),
    "Sharpness": (sharpness, _enhance),
    "SharpnessIncreasing": (sharpness, _enhance_increasing),
    "ShearX": (shear_x, lambda m, s: s * m / MAX_LEVEL * 0.3),
    "ShearY": (shear_y, lambda m, s: s * m / MAX_LEVEL * 0.3),
    "TranslateXRel": (translate_x_rel, lambda m, s: s * m / MAX_LEVEL * 0.45),
    "TranslateYRel": (translate_y_rel, lambda m, s: s * m / MAX_LEVEL * 0.45),
}
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


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
