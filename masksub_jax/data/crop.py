"""The host's decoding and cropping, in TensorFlow for tf.data, with stateless seeds: what every
train recipe does before its per-pixel ops (`masksub_jax/augment/`), and the eval transform.

Each op takes the encoded bytes or a uint8 HxWx3 image and draws its randomness from a [2] int
seed, so an example's crop is a function of its seed alone. Semantics follow torchvision on PIL
images (the official code).

  decode                any format TensorFlow reads, as RGB
  random_resized_crop   torchvision RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3), bicubic;
                        JPEGs are decoded only inside the crop window (`random_crop`: not resized)
  resize_and_centre_crop  eval: shorter side to size / crop_ratio (timm's floor), centre crop
  flip                  horizontal, p = 0.5
Resizing is antialiased bicubic, as PIL's (`augment.host.resize`).
"""
import math

import tensorflow as tf

from masksub_jax.augment.host import resize, to_uint8

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
