"""Optimizers and the learning-rate schedule of the DeiT-III recipes, as optax chains.

LAMB here is the official one (apex FusedLAMB / timm Lamb), not `optax.lamb`: the global gradient
norm is clipped first, and the trust ratio ||w|| / ||update|| applies only to parameters that get
weight decay. No weight decay (hence no trust ratio) on 1-D parameters and on those the model family
names (ViT: pos_embed, cls_token; Swin: mask_token, relative_position_bias_table).
"""
import fnmatch
import functools

import jax
import optax

from masksub_jax.models.weights import listed


def decay_mask(params, no_decay: tuple = ()):
    """True for the parameters that get weight decay (and, with LAMB, the trust ratio)."""
    def wants_decay(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        return leaf.ndim > 1 and name not in no_decay
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def layer_decay_scales(ids, decay: float):
    """MAE's layer-wise lr scales: decay^(L - id) for each parameter's layer id, L the largest id (the
    head's), so the head learns at the full rate and the embeddings at decay^L of it."""
    top = max(jax.tree.leaves(ids))
    return jax.tree.map(lambda i: decay ** (top - i), ids)


def lr_schedule(*, lr: float, min_lr: float, warmup_init_lr: float, warmup_steps: int,
                total_steps: int) -> optax.Schedule:
    """Linear warmup from `warmup_init_lr` to `lr`, then cosine to `min_lr` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=warmup_init_lr, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


def frozen_labels(params, patterns: tuple) -> dict:
    """"frozen" for each parameter whose "a/b/c" name matches a glob pattern of `patterns` (a pattern
    naming a module matches everything under it), "train" for the others. A pattern that matches
    nothing is an error: a typo would otherwise train what the recipe freezes."""
    def name(path):
        return "/".join(getattr(p, "key", str(p)) for p in path)
    names = [name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

    def matches(pattern, n):
        return fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + "/*")
    unmatched = [p for p in patterns if not any(matches(p, n) for n in names)]
    if unmatched:
        tops = sorted({n.split("/")[0] for n in names})
        raise ValueError(f"Config optim.frozen={tuple(patterns)!r} is invalid: {unmatched} match no parameter; "
                         f"the parameters are named like {names[0]!r}, under {listed(tops)}.")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(matches(p, name(path)) for p in patterns) else "train", params)


def make(name: str, schedule: optax.Schedule, *, weight_decay: float, b1: float, b2: float,
         eps: float, grad_clip_norm: float, no_decay: tuple = (), layer_decay: float = 1.0,
         layer_ids=None, frozen: tuple = ()) -> optax.GradientTransformation:
    """'lamb' or 'adamw' with decoupled, masked weight decay and optional global-norm clipping;
    `no_decay` names the parameters (besides the 1-D ones) without weight decay. With layer_decay < 1,
    each parameter's step (weight decay included, as in PyTorch's param groups) is scaled by
    `layer_decay_scales(layer_ids(params), layer_decay)`. The parameters that `frozen` names
    (`frozen_labels`) get a zero update and no optimizer state, and count in no gradient norm, as
    PyTorch's requires_grad=False leaves them."""
    if name not in ("lamb", "adamw"):
        raise ValueError(f"Unknown optimizer {name!r}; use 'lamb' or 'adamw'.")
    mask = functools.partial(decay_mask, no_decay=tuple(no_decay))
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
              optax.add_decayed_weights(weight_decay, mask=mask)]
    if name == "lamb":
        parts.append(optax.masked(optax.scale_by_trust_ratio(), mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    if layer_decay < 1:
        parts.append(_scale_per_parameter(lambda params: layer_decay_scales(layer_ids(params), layer_decay)))
    if not frozen:
        return optax.chain(*parts)
    return optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()},
                                 functools.partial(frozen_labels, patterns=tuple(frozen)))


def in_layout(tx: optax.GradientTransformation, inner, outer) -> optax.GradientTransformation:
    """`tx` on the parameters as `inner` lays them out, its updates laid back out by `outer`: with
    model.scan (stacked blocks) the optimizer sees the unrolled blocks, so everything it decides per
    parameter (LAMB's trust ratio, weight decay by rank, layer decay, frozen names) is as unrolled."""
    def update(updates, state, params=None):
        updates, state = tx.update(inner(updates), state, None if params is None else inner(params))
        return outer(updates), state
    return optax.GradientTransformation(lambda params: tx.init(inner(params)), update)


def _scale_per_parameter(scales_of) -> optax.GradientTransformation:
    """Multiplies each parameter's update by a constant that depends only on its place in the tree."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, scale: u * scale, updates, scales_of(updates)), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
