"""The per-pixel part of the train recipes, batched on the device (config.data.augment_on="device").

The host then only reads, decodes, crops, resizes and flips (`data/indexed.py`); what 3-Augment and
colour jitter do to the fixed-size uint8 images runs here, in the jitted train step next to random
erasing and mixup, where it costs microseconds per batch instead of most of a host core per 200
images. Each op is `data/augment.py`'s (which is tested against PIL) on a batch: float math, the
result rounded and clipped to 0-255 after each op as there. Example i of the global batch draws its
choices from fold_in(key, i), so neither the device count nor a resume changes an image.

RandAugment stays on the host: its geometric and photometric ops come in a random order per image.
"""
import jax
import jax.numpy as jnp

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # as data/augment.py (PIL's convert("L"))
BLUR_SIGMA_RANGE = (0.1, 2.0)
_BLUR_HALF_WIDTH = 6  # ceil(3 * max sigma), as data/augment.py
RECIPES = ("3augment", "crop_flip")  # what can run here; RandAugment cannot
SOURCES = ("tfds", "folder")  # the sources that augment (digits and synthetic are used as they are)


def on_device(data_config) -> bool:
    """Whether the config's per-pixel ops run in the train step rather than on the host."""
    d = data_config
    return d.augment_on == "device" and d.augment in RECIPES and d.source in SOURCES


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
    k = _BLUR_HALF_WIDTH
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
    """(uint8 images [B, H, W, 3], key) -> the recipe's per-pixel ops applied, float32 in 0-255;
    None when the config leaves them on the host (or has none)."""
    d = data_config
    if not on_device(d) or (d.augment == "crop_flip" and d.color_jitter == 0):
        return None

    def augment(images, key):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
        x = images.astype(jnp.float32)
        if d.augment == "3augment":
            return three_augment(x, keys, jitter=d.color_jitter)
        return color_jitter(x, keys, d.color_jitter)
    return augment
