"""timm's RandAugment on the device (data.augment_on="device"): `data/randaugment.py`'s ops and
draws, op for op, on one image in JAX (float32 holding integer pixel values), vmapped over the
batch by `pixel_augment`. The host version is tested against PIL; this one against the host's.

Under vmap every op of the set is computed for every image and the drawn one selected: on an
accelerator ~30 cheap per-pixel passes per image, next to a ViT's ~100 GFLOPs.
"""
import math

import jax
import jax.numpy as jnp

from masksub_jax import pixel_augment
from masksub_jax.data.randaugment import FILL, MAX_LEVEL, Spec

to_pixels = pixel_augment.to_pixels


def _one(op):
    """A batched op of pixel_augment ([B, H, W, C], [B] factor) on one image and its factor."""
    return lambda image, factor: op(image[None], jnp.reshape(factor, (1,)))[0]


def auto_contrast(image, _):
    lo, hi = jnp.min(image, axis=(0, 1)), jnp.max(image, axis=(0, 1))
    scale = jnp.where(hi > lo, 255.0 / jnp.maximum(hi - lo, 1.0), 1.0)
    offset = jnp.where(hi > lo, -lo * scale, 0.0)
    return jnp.clip(jnp.floor(image * scale + offset), 0, 255)


def _equalize_channel(channel):
    values = channel.astype(jnp.int32)
    hist = jnp.bincount(values.ravel(), length=256)
    last = hist[255 - jnp.argmax(hist[::-1] > 0)]
    step = (jnp.sum(hist) - last) // 255
    lut = jnp.clip((jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1), 0, 255)
    return jnp.where(step > 0, lut[values].astype(jnp.float32), channel)


def equalize(image, _):
    return jnp.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def invert(image, _):
    return 255 - image


def posterize(image, bits):
    bits = bits.astype(jnp.int32)
    mask = jnp.left_shift(255, jnp.clip(8 - bits, 0, 8)) & 255
    return jnp.where(bits >= 8, image, (image.astype(jnp.int32) & mask).astype(jnp.float32))


def solarize(image, threshold):
    return jnp.where(image >= threshold, 255 - image, image)


def solarize_add(image, addition, threshold=128):
    return jnp.where(image < threshold, jnp.floor(jnp.minimum(image + addition, 255)), image)


def contrast(image, factor):
    mean = jnp.floor(jnp.mean(jnp.floor(pixel_augment.luma(image) + 0.5)) + 0.5)
    return to_pixels(mean + factor * (image - mean))


def sharpness(image, factor):
    """Blend with PIL's SMOOTH filter (3x3, centre 5, /13) of the interior; borders unfiltered."""
    h, w = image.shape[:2]
    weights = jnp.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13
    smooth = sum(weights[i, j] * image[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    degenerate = image.at[1:-1, 1:-1].set(jnp.round(smooth))
    return to_pixels(degenerate + factor * (image - degenerate))


def _transform(image, matrix):
    """Output pixel (x, y) samples the input at matrix @ (x, y, 1) (pixel centres at integers),
    bilinear, each neighbour outside the image read as FILL's weight of nothing (as TensorFlow's
    ImageProjectiveTransformV3 on the image and a channel of ones), then FILL where it is missing."""
    h, w = image.shape[:2]
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    sx = matrix[0] * x + matrix[1] * y + matrix[2]
    sy = matrix[3] * x + matrix[4] * y + matrix[5]
    x0, y0 = jnp.floor(sx), jnp.floor(sy)
    rgb, inside = 0.0, 0.0
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (1 - jnp.abs(sx - xi)) * (1 - jnp.abs(sy - yi))
        valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        pixel = image[jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)]
        rgb = rgb + jnp.where(valid[..., None], weight[..., None] * pixel, 0.0)
        inside = inside + jnp.where(valid, weight, 0.0)
    return to_pixels(rgb + (1 - inside)[..., None] * jnp.asarray(FILL, jnp.float32))


def _pil_affine(a, b, c, d, e, f):
    return jnp.stack([a, b, c + 0.5 * (a + b - 1), d, e, f + 0.5 * (d + e - 1)])


def _rotation(shape, degrees):
    """Counter-clockwise about the centre (PIL Image.rotate)."""
    h, w = shape[:2]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    r = degrees * math.pi / 180
    cos, sin = jnp.cos(r), jnp.sin(r)
    return jnp.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


def _shear_x(shape, factor):
    one, zero = jnp.ones_like(factor), jnp.zeros_like(factor)
    return _pil_affine(one, factor, zero, zero, one, zero)


def _shear_y(shape, factor):
    one, zero = jnp.ones_like(factor), jnp.zeros_like(factor)
    return _pil_affine(one, zero, zero, factor, one, zero)


def _translate_x(shape, fraction):
    one, zero = jnp.ones_like(fraction), jnp.zeros_like(fraction)
    return jnp.stack([one, zero, fraction * shape[1], zero, one, zero])


def _translate_y(shape, fraction):
    one, zero = jnp.ones_like(fraction), jnp.zeros_like(fraction)
    return jnp.stack([one, zero, zero, zero, one, fraction * shape[0]])


# The geometric ops as the matrix of one _transform, so that a layer warps each image once.
MATRICES = {"Rotate": _rotation, "ShearX": _shear_x, "ShearY": _shear_y, "TranslateXRel": _translate_x,
            "TranslateYRel": _translate_y}


def _warp(matrix_of):
    return lambda image, argument: _transform(image, matrix_of(image.shape, argument))


rotate, shear_x, shear_y = _warp(_rotation), _warp(_shear_x), _warp(_shear_y)
translate_x_rel, translate_y_rel = _warp(_translate_x), _warp(_translate_y)


def _enhance(m, _):
    return m / MAX_LEVEL * 1.8 + 0.1


def _enhance_increasing(m, sign):
    return 1.0 + sign * m / MAX_LEVEL * 0.9


OP_TABLE = {  # as data/randaugment.py's
    "AutoContrast": (auto_contrast, lambda m, s: 0.0 * m),
    "Equalize": (equalize, lambda m, s: 0.0 * m),
    "Invert": (invert, lambda m, s: 0.0 * m),
    "Rotate": (rotate, lambda m, s: s * m / MAX_LEVEL * 30.0),
    "Posterize": (posterize, lambda m, s: jnp.floor(m / MAX_LEVEL * 4)),
    "PosterizeIncreasing": (posterize, lambda m, s: 4 - jnp.floor(m / MAX_LEVEL * 4)),
    "Solarize": (solarize, lambda m, s: jnp.floor(m / MAX_LEVEL * 256)),
    "SolarizeIncreasing": (solarize, lambda m, s: 256 - jnp.floor(m / MAX_LEVEL * 256)),
    "SolarizeAdd": (solarize_add, lambda m, s: jnp.floor(m / MAX_LEVEL * 110)),
    "Color": (_one(pixel_augment.adjust_saturation), _enhance),
    "ColorIncreasing": (_one(pixel_augment.adjust_saturation), _enhance_increasing),
    "Contrast": (contrast, _enhance),
    "ContrastIncreasing": (contrast, _enhance_increasing),
    "Brightness": (_one(pixel_augment.adjust_brightness), _enhance),
    "BrightnessIncreasing": (_one(pixel_augment.adjust_brightness), _enhance_increasing),
    "Sharpness": (sharpness, _enhance),
    "SharpnessIncreasing": (sharpness, _enhance_increasing),
    "ShearX": (shear_x, lambda m, s: s * m / MAX_LEVEL * 0.3),
    "ShearY": (shear_y, lambda m, s: s * m / MAX_LEVEL * 0.3),
    "TranslateXRel": (translate_x_rel, lambda m, s: s * m / MAX_LEVEL * 0.45),
    "TranslateYRel": (translate_y_rel, lambda m, s: s * m / MAX_LEVEL * 0.45),
}


def apply_op(name: str, image, magnitude, sign=1.0):
    op, to_argument = OP_TABLE[name]
    return op(image, to_argument(jnp.float32(magnitude), jnp.float32(sign)))


def draws(key, spec: Spec):
    """One image's [num_layers] op choices, whether each is applied, magnitudes and signs."""
    def layer(key):
        choice_key, applied_key, magnitude_key, sign_key = jax.random.split(key, 4)
        if spec.magnitude_std == math.inf:
            m = jax.random.uniform(magnitude_key, (), maxval=spec.magnitude)
        elif spec.magnitude_std > 0:
            m = spec.magnitude + spec.magnitude_std * jax.random.normal(magnitude_key, ())
        else:
            m = jnp.float32(spec.magnitude)
        return (jax.random.randint(choice_key, (), 0, len(spec.ops)), jax.random.uniform(applied_key) <= spec.prob,
                jnp.clip(m, 0.0, spec.magnitude_max), jnp.where(jax.random.uniform(sign_key) > 0.5, -1.0, 1.0))
    return jax.vmap(layer)(jax.random.split(key, spec.num_layers))


def rand_augment(image, key, spec: Spec):
    """`spec.num_layers` ops drawn uniformly with replacement, each applied with `spec.prob`. The
    geometric ops of a layer share one warp (its matrix is the drawn op's)."""
    choices, applied, magnitudes, signs = draws(key, spec)
    geometric = [name for name in spec.ops if name in MATRICES]
    others = [name for name in spec.ops if name not in MATRICES]
    position = jnp.asarray([(geometric if name in MATRICES else others).index(name) for name in spec.ops])
    is_geometric = jnp.asarray([name in MATRICES for name in spec.ops])
    matrix_branches = [lambda m, s, name=name: MATRICES[name](image.shape, OP_TABLE[name][1](m, s))
                       for name in geometric]
    other_branches = [lambda image, m, s, name=name: apply_op(name, image, m, s) for name in others]
    for i in range(spec.num_layers):
        choice, m, s = choices[i], magnitudes[i], signs[i]
        warped = _transform(image, jax.lax.switch(position[choice] * is_geometric[choice], matrix_branches, m, s))
        changed = jax.lax.switch(position[choice] * (1 - is_geometric[choice]), other_branches, image, m, s)
        image = jnp.where(applied[i], jnp.where(is_geometric[choice], warped, changed), image)
    return image
