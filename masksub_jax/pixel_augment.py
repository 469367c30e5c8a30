"""The per-pixel part of the train recipes, batched on the device (config.data.augment_on="device").

The host then only reads, decodes and crops (RandomResizedCrop's window), flips, and places the crop
on a canvas of twice the image size (`data/indexed.py`; a larger crop is resized there as on the
host path). Here, in the jitted train step next to random erasing and mixup: the antialiased
bicubic resize of each crop to the image size (the host's costliest op), then what 3-Augment,
colour jitter or RandAugment (`pixel_randaugment.py`) do to the pixels. Each op is
`data/augment.py`'s (tested against PIL) on a batch: float math, rounded and clipped to 0-255 after
each op as there. Example i of the global batch draws its choices from fold_in(key, i), so neither
the device count nor a resume changes an image.
"""
import functools

import jax
import jax.numpy as jnp

from masksub_jax.data.augment import BLUR_HALF_WIDTH, BLUR_SIGMA_RANGE, GRAY_WEIGHTS

SOURCES = ("tfds", "folder")  # the sources that augment (digits and synthetic are used as they are)


def canvas_size(data_config) -> int:
    """The side of the square the host puts each crop on: crops up to it are resized here."""
    return 2 * data_config.image_size


def on_device(data_config) -> bool:
    """Whether the config's per-pixel ops run in the train step rather than on the host."""
    d = data_config
    return d.augment_on == "device" and d.source in SOURCES


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
    """Each example's crop (top-left `crop_size` of its canvas [B, C, C, 3]) resized to out x out,
    rounded (augment.random_resized_crop's resize, on the device)."""
    size = canvas.shape[1]
    rows = jax.vmap(resize_weights, (0, None, None))(crop_size[:, 0], size, out)
    cols = jax.vmap(resize_weights, (0, None, None))(crop_size[:, 1], size, out)
    x = jnp.einsum("boh,bhwc->bowc", rows, canvas.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return to_pixels(jnp.einsum("bpw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST))


def to_pixels(x):
    """Rounded and clipped to 0-255 (augment.to_uint8, kept in float32)."""
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


def make(data_config):
    """(batch, key) -> the batch's images resized and with the recipe's per-pixel ops applied,
    float32 in 0-255 (the batch holds canvases and crop sizes); None when the config leaves all of
    it on the host."""
    from masksub_jax import pixel_randaugment
    from masksub_jax.data import randaugment
    d = data_config
    if not on_device(d):
        return None
    rand_spec = randaugment.parse(d.augment) if d.augment.startswith("rand") else None

    def augment(batch, key):
        x = resize(batch["image"], batch["crop_size"], d.image_size)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
        if d.augment == "3augment":
            return three_augment(x, keys, jitter=d.color_jitter)
        if rand_spec is not None:
            return jax.vmap(functools.partial(pixel_randaugment.rand_augment, spec=rand_spec))(x, keys)
        return color_jitter(x, keys, d.color_jitter) if d.color_jitter > 0 else x
    return augment
