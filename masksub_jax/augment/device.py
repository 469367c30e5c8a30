"""The train recipes' per-pixel ops on the device (config.data.augment_on="device"), batched in the
jitted train step: `host.py`'s twins, op for op and name for name (tested against them), reading
the same `spec.py`.

The host then only reads, decodes and crops (RandomResizedCrop's window), flips, and places the crop
on a canvas of twice the image size (`data/indexed.py`; a larger crop is resized there as on the
host path). Here, next to random erasing and mixup: the antialiased bicubic resize of each crop to
the image size (the host's costliest op), then what 3-Augment, colour jitter or RandAugment do to
the pixels: float math, rounded and clipped to 0-255 after each op as on the host. Example i of the
global batch draws its choices from fold_in(key, i), so neither the device count nor a resume
changes an image.

RandAugment's ops work on one image (float32 holding integer pixel values), vmapped over the batch;
under vmap every op of the set is computed for every image and the drawn one selected: on an
accelerator ~30 cheap per-pixel passes per image, next to a ViT's ~100 GFLOPs.
"""
import functools
import math

import jax
import jax.numpy as jnp

from masksub_jax.augment import spec as spec_lib
from masksub_jax.augment.spec import BLUR_HALF_WIDTH, BLUR_SIGMA_RANGE, FILL, GRAY_WEIGHTS, Spec

# ------------------------------------------------------------------------------------------------
# The resize, 3-Augment and colour jitter, on a batch [B, H, W, C] with a factor or key per example.

def _keys_cubic(x, a=-0.5):
    """Keys' cubic convolution kernel (TensorFlow's and PIL's bicubic), of |x|."""
    return jnp.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                     jnp.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def resize_weights(length, size: int, out: int):
    """[out, size] weights of an antialiased bicubic resize of the first `length` (traced) of `size`
    input pixels to `out` (TensorFlow's ScaleAndTranslate with half-pixel centres): taps beyond
    `length` get no weight and each row is renormalised, as at an image's edge."""
    inv_scale = length.astype(jnp.float32) / out
    kernel_scale = jnp.maximum(inv_scale, 1.0)  # antialias: the kernel widens when shrinking
    centre = (jnp.arange(out, dtype=jnp.float32) + 0.5) * inv_scale - 0.5
    weights = _keys_cubic(jnp.abs(centre[:, None] - jnp.arange(size, dtype=jnp.float32)[None]) / kernel_scale)
    weights = jnp.where(jnp.arange(size)[None] < length, weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def resize(canvas, crop_size, out: int):
    """Each example's crop (top-left `crop_size` of its canvas [B, C, C, 3]) resized to out x out and
    rounded (host.resize and host.to_uint8, on the device)."""
    size = canvas.shape[1]
    rows = jax.vmap(resize_weights, (0, None, None))(crop_size[:, 0], size, out)
    cols = jax.vmap(resize_weights, (0, None, None))(crop_size[:, 1], size, out)
    x = jnp.einsum("boh,bhwc->bowc", rows, canvas.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return to_pixels(jnp.einsum("bpw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST))


def to_pixels(x):
    """Rounded and clipped to 0-255 (host.to_uint8, kept in float32)."""
    return jnp.clip(jnp.round(x), 0, 255)


def luma(x):
    return jnp.sum(x * jnp.asarray(GRAY_WEIGHTS, jnp.float32), axis=-1, keepdims=True)


def grayscale(x):
    return jnp.broadcast_to(to_pixels(luma(x)), x.shape)


def solarize(x, threshold=128):
    return jnp.where(x >= threshold, 255 - x, x)


def gaussian_blur(x, sigma):
    """Per example a separable Gaussian of std `sigma` [B], edges mirrored as TensorFlow's SYMMETRIC."""
    k = BLUR_HALF_WIDTH
    taps = jnp.arange(-k, k + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * jnp.square(taps / sigma[:, None]))
    kernel = kernel / jnp.sum(kernel, axis=1, keepdims=True)  # [B, 2k + 1]
    h, w = x.shape[1:3]
    padded = jnp.pad(x, [(0, 0), (k, k), (k, k), (0, 0)], mode="symmetric")
    weight = lambda t: kernel[:, t, None, None, None]  # noqa: E731
    vertical = sum(weight(t) * padded[:, t:t + h] for t in range(2 * k + 1))
    return to_pixels(sum(weight(t) * vertical[:, :, t:t + w] for t in range(2 * k + 1)))


def _blend(degenerate, x, factor):
    return to_pixels(degenerate + factor[:, None, None, None] * (x - degenerate))


def adjust_brightness(x, factor):
    return _blend(jnp.zeros_like(x), x, factor)


def adjust_contrast(x, factor):
    return _blend(jnp.mean(luma(x), axis=(1, 2, 3), keepdims=True), x, factor)


def adjust_saturation(x, factor):
    return _blend(luma(x), x, factor)


def _select(index, options):
    """options[index[b]][b] per example b."""
    out = options[-1]
    for i in range(len(options) - 2, -1, -1):
        out = jnp.where((index == i)[:, None, None, None], options[i], out)
    return out


def jitter_draws(keys, strength: float):
    """Per example: (brightness, contrast, saturation) factors uniform in [1 - s, 1 + s], and the
    order of the three ops (a permutation of 0, 1, 2)."""
    def draw(key):
        factors_key, order_key = jax.random.split(key)
        return (jax.random.uniform(factors_key, (3,), minval=1 - strength, maxval=1 + strength),
                jax.random.permutation(order_key, 3))
    return jax.vmap(draw)(keys)


def color_jitter(x, keys, strength: float):
    """torchvision ColorJitter(b=c=s=strength): factors uniform in [1 - s, 1 + s], in a random order."""
    factors, order = jitter_draws(keys, strength)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation)
    for position in range(3):
        x = _select(order[:, position], [op(x, factors[:, j]) for j, op in enumerate(ops)])
    return x


def three_augment(x, keys, *, jitter: float):
    """One of grayscale, solarize, Gaussian blur (sigma uniform in 0.1-2.0) per example, chosen
    uniformly; then colour jitter (0 = none)."""
    def draw(key):
        choice_key, sigma_key, jitter_key = jax.random.split(key, 3)
        return (jax.random.randint(choice_key, (), 0, 3), jax.random.uniform(sigma_key, (), minval=BLUR_SIGMA_RANGE[0],
                                                                             maxval=BLUR_SIGMA_RANGE[1]), jitter_key)
    choice, sigma, jitter_keys = jax.vmap(draw)(keys)
    x = _select(choice, [grayscale(x), solarize(x), gaussian_blur(x, sigma)])
    return color_jitter(x, jitter_keys, jitter) if jitter > 0 else x


# ------------------------------------------------------------------------------------------------
# RandAugment's ops: one image and one float argument (scaled from the magnitude by the spec's map)
# -> one image.

def _one(op):
    """A batched op above ([B, H, W, C], [B] factor) on one image and its factor."""
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


def solarize_add(image, addition, threshold=128):
    return jnp.where(image < threshold, jnp.floor(jnp.minimum(image + addition, 255)), image)


color, brightness = _one(adjust_saturation), _one(adjust_brightness)


def contrast(image, factor):
    mean = jnp.floor(jnp.mean(jnp.floor(luma(image) + 0.5)) + 0.5)
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


# ------------------------------------------------------------------------------------------------
# RandAugment.

OP_TABLE = spec_lib.op_table(globals())  # name: (op, magnitude -> argument), as host.py's


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


# ------------------------------------------------------------------------------------------------
# The recipe.

def make(data_config):
    """(batch, key) -> the batch's images resized and with the recipe's per-pixel ops applied,
    float32 in 0-255 (the batch holds canvases and crop sizes); None when the config leaves all of
    it on the host."""
    d = data_config
    if not spec_lib.on_device(d):
        return None
    rand_spec = spec_lib.parse(d.augment) if d.augment.startswith("rand") else None

    def augment(batch, key):
        x = resize(batch["image"], batch["crop_size"], d.image_size)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
        if d.augment == "3augment":
            return three_augment(x, keys, jitter=d.color_jitter)
        if rand_spec is not None:
            return jax.vmap(functools.partial(rand_augment, spec=rand_spec))(x, keys)
        return color_jitter(x, keys, d.color_jitter) if d.color_jitter > 0 else x
    return augment
