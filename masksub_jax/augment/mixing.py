"""Mixup / CutMix inside the jitted step, with timm's batch-mode semantics.

One lambda per batch; the partner of example i is example B-1-i (the reversed batch); when both
are enabled, CutMix is chosen with probability `switch_prob`, else Mixup. CutMix corrects lambda to
the pasted box's area. Targets are label-smoothed one-hots mixed with the same lambda. MaskSub mixes
once and feeds the same mixed images to both branches.
"""
import jax
import jax.numpy as jnp


def smoothed_one_hot(labels, num_classes: int, smoothing: float):
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng, height: int, width: int, lam):
    """A box of area about (1 - lam) of the image, centred uniformly; clipped at the borders."""
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
    rng_y, rng_x = jax.random.split(rng)
    cy = jax.random.randint(rng_y, (), 0, height)
    cx = jax.random.randint(rng_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


def mix(rng, images, labels, *, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
        switch_prob: float, label_smoothing: float):
    """Returns (mixed images, mixed soft targets (batch, num_classes))."""
    targets = smoothed_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    rng_switch, rng_mixup, rng_cutmix, rng_box = jax.random.split(rng, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(rng_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(rng_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cutmix = jax.random.beta(rng_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0

    height, width = images.shape[1:3]
    y0, y1, x0, x1 = cutmix_box(rng_box, height, width, lam_cutmix)
    in_box = ((jnp.arange(height)[:, None] >= y0) & (jnp.arange(height)[:, None] < y1)
              & (jnp.arange(width)[None, :] >= x0) & (jnp.arange(width)[None, :] < x1))
    partner = images[::-1]
    cutmixed = jnp.where(in_box[None, :, :, None], partner, images)
    lam_box = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
    mixed = lam_mixup * images + (1.0 - lam_mixup) * partner

    images = jnp.where(use_cutmix, cutmixed, mixed).astype(images.dtype)
    lam = jnp.where(use_cutmix, lam_box, lam_mixup)
    return images, lam * targets + (1.0 - lam) * targets[::-1]
