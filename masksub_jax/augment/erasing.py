"""Random erasing (timm RandomErasing, mode "pixel", one box) inside the jitted step.

It runs on the device after normalisation, because its fill is per-pixel N(0, 1) noise in
normalised units, which uint8 host images cannot hold; the batch stays uint8 until then.
Per image, with probability `prob`: up to 10 draws of a box of area 2%-33% of the image and
log-uniform aspect ratio 0.3-3.3; the first that fits is placed uniformly and filled with noise.
"""
import math

import jax
import jax.numpy as jnp

AREA = (0.02, 1 / 3)
LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ATTEMPTS = 10


def erase_box(rng, height: int, width: int):
    """(erase?, top, left, h, w) for one image: timm's draws, first fitting attempt."""
    r_area, r_aspect, r_top, r_left = jax.random.split(rng, 4)
    area = height * width * jax.random.uniform(r_area, (ATTEMPTS,), minval=AREA[0], maxval=AREA[1])
    aspect = jnp.exp(jax.random.uniform(r_aspect, (ATTEMPTS,), minval=LOG_ASPECT[0], maxval=LOG_ASPECT[1]))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits)
    h, w = h[first], w[first]
    top = jax.random.randint(r_top, (), 0, height - h + 1)
    left = jax.random.randint(r_left, (), 0, width - w + 1)
    return jnp.any(fits), top, left, h, w


def random_erasing(rng, images, prob: float):
    """`images`: normalised (batch, H, W, C). Each image erased with probability `prob`."""
    if prob <= 0:
        return images
    batch, height, width, _ = images.shape
    r_apply, r_box, r_noise = jax.random.split(rng, 3)
    apply = jax.random.uniform(r_apply, (batch,)) < prob
    found, top, left, h, w = jax.vmap(lambda r: erase_box(r, height, width))(jax.random.split(r_box, batch))
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
    erase = inside & (apply & found)[:, None, None]
    noise = jax.random.normal(r_noise, images.shape, images.dtype)
    return jnp.where(erase[..., None], noise, images)
