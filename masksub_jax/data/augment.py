"""Image preprocessing ops of the DeiT-III recipes, in TensorFlow for tf.data, with stateless seeds.

Each op takes and returns a uint8 HxWx3 image (the crop ops take the encoded bytes) and draws its
randomness from a [2] int seed, so an example's augmentation is a function of its seed alone.
Semantics follow torchvision / timm on PIL images (the official code); where they differ it says so.

  random_resized_crop   torchvision RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3), bicubic;
                        JPEGs are decoded only inside the crop window
  resize_and_centre_crop  eval: shorter side to size / crop_ratio (timm's floor), centre crop
  flip                  horizontal, p = 0.5
  three_augment         DeiT-III: one of grayscale / solarize / Gaussian blur, then colour jitter
  color_jitter          torchvision ColorJitter(b, c, s) with its random order of the three
Resizing is antialiased bicubic, as PIL's. Blends are computed in float and rounded once at the end
of each op (PIL rounds after each blend too). RandAugment is in `randaugment.py`, random erasing
on the device (`masksub_jax/erasing.py`).
"""
import math

import tensorflow as tf

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
BLUR_SIGMA_RANGE = (0.1, 2.0)  # DeiT-III GaussianBlur radius
BLUR_HALF_WIDTH = math.ceil(3 * BLUR_SIGMA_RANGE[1])
JPEG_MAGIC = b"\xff\xd8\xff"  # the first bytes of every JPEG file (SOI marker, then a marker)


def decode(image_bytes):
    """Any format TensorFlow reads, as RGB. A WebP goes through its own op, alpha dropped (as PIL's
    convert("RGB")): decode_image gives no RGB of a WebP with alpha. An animated WebP is left to
    decode_image, which refuses it (decode_webp corrupts memory on some)."""
    def webp():
        extended = tf.strings.substr(image_bytes, 12, 4) == b"VP8X"
        flags = tf.io.decode_raw(tf.strings.substr(image_bytes, 20, 1), tf.uint8)[0]
        animated = extended & (tf.bitwise.bitwise_and(flags, 2) > 0)
        return tf.cond(animated, any_format,
                       lambda: tf.ensure_shape(tf.io.decode_webp(image_bytes)[0, :, :, :3], [None, None, 3]))

    def any_format():
        return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.cond(tf.strings.substr(image_bytes, 8, 4) == b"WEBP", webp, any_format)


def to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def resize(image, size):
    return tf.image.resize(image, size, method="bicubic", antialias=True)


def crop_window(seed, height, width, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w).

    Up to 10 draws of an area fraction (uniform in `scale`) and a log-uniform aspect ratio; the
    first that fits is placed uniformly. If none fits: the largest centred crop whose ratio is
    clamped to `ratio`.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = h_f * w_f * tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    def placed():
        ch, cw = h[first], w[first]
        top = tf.random.stateless_uniform([], seeds[2], 0, height - ch + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([], seeds[3], 0, width - cw + 1, dtype=tf.int32)
        return top, left, ch, cw

    def centred():
        in_ratio = w_f / h_f
        cw = tf.where(in_ratio < ratio[0], w_f, tf.where(in_ratio > ratio[1], tf.round(h_f * ratio[1]), w_f))
        ch = tf.where(in_ratio < ratio[0], tf.round(w_f / ratio[0]), h_f)
        cw, ch = tf.cast(cw, tf.int32), tf.cast(ch, tf.int32)
        return (height - ch) // 2, (width - cw) // 2, ch, cw

    return tf.cond(tf.reduce_any(fits), placed, centred)


def random_resized_crop(image_bytes, seed, *, size: int, is_jpeg: bool | None):
    """A random crop (`crop_window`) resized to size x size."""
    return to_uint8(resize(random_crop(image_bytes, seed, is_jpeg=is_jpeg), (size, size)))


def random_crop(image_bytes, seed, *, is_jpeg: bool | None):
    """RandomResizedCrop's crop (`crop_window`), decoded, not resized. is_jpeg=None: JPEGs (by their
    first bytes) are decoded only inside the crop, other formats (PNG) whole."""
    def jpeg():
        shape = tf.image.extract_jpeg_shape(image_bytes)
        top, left, h, w = crop_window(seed, shape[0], shape[1])
        return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([top, left, h, w]), channels=3)

    def other():
        image = decode(image_bytes)
        top, left, h, w = crop_window(seed, tf.shape(image)[0], tf.shape(image)[1])
        return image[top:top + h, left:left + w]
    if is_jpeg is None:
        return tf.cond(tf.strings.substr(image_bytes, 0, 3) == JPEG_MAGIC, jpeg, other)
    return jpeg() if is_jpeg else other()


def resize_and_centre_crop(image_bytes, *, size: int, crop_ratio: float):
    """timm's eval transform: Resize(floor(size / crop_ratio)) of the shorter side, CenterCrop(size)."""
    image = decode(image_bytes)
    scaled = math.floor(size / crop_ratio)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    long_side = lambda long, short: tf.cast(scaled * long / short, tf.int32)  # noqa: E731  (torchvision truncates)
    new_h = tf.where(h <= w, scaled, long_side(h, w))
    new_w = tf.where(h <= w, long_side(w, h), scaled)
    image = resize(image, tf.stack([new_h, new_w]))
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
    return to_uint8(image[top:top + size, left:left + size])


def flip(image, seed):
    return tf.image.stateless_random_flip_left_right(image, seed)


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
