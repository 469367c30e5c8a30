"""LAMB and AdamW against a direct NumPy restatement of the official update rule, and the schedule."""
import jax
import numpy as np
import pytest

from masksub_jax import optim
from masksub_jax.models import vit


def _params_and_grads():
    rng = np.random.default_rng(0)
    params = {"blocks_0": {"fc1": {"kernel": rng.normal(size=(4, 6)), "bias": rng.normal(size=(6,))},
                           "gamma_1": rng.normal(size=(4,))},
              "pos_embed": rng.normal(size=(1, 3, 4)), "cls_token": rng.normal(size=(1, 1, 4)),
              "head": {"kernel": np.zeros((4, 2)), "bias": np.zeros((2,))}}  # a zero-norm decayed param
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape) * 3.0, params)  # global norm >> 1: clipped
    as32 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)  # noqa: E731
    return as32(params), as32(grads)


def _numpy_step(name, params, grads, state, t, *, lr, wd, b1=0.9, b2=0.999, eps=1e-8, clip=1.0):
    """The official rule (apex FusedLAMB / timm Lamb; AdamW decoupled decay) for one step t >= 1."""
    flat_p, treedef = jax.tree.flatten_with_path(params)
    flat_g = [g for _, g in jax.tree.flatten_with_path(grads)[0]]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in flat_g))
    scale = 1.0 / max(norm / clip, 1.0)
    new = []
    for i, ((path, p), g) in enumerate(zip(flat_p, flat_g)):
        g = g * scale
        m, v = state.get(i, (np.zeros_like(p), np.zeros_like(p)))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        state[i] = (m, v)
        update = (m / (1 - b1 ** t)) / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
        decayed = p.ndim > 1 and path[-1].key not in ("pos_embed", "cls_token")
        if decayed:
            update = update + wd * p
            if name == "lamb":
                w_norm, u_norm = np.linalg.norm(p), np.linalg.norm(update)
                update = update * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
        new.append(p - lr * update)
    return jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_two_updates_match_the_official_rule(name):
    params, grads = _params_and_grads()
    tx = optim.make(name, lambda step: 0.01, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
                    no_decay=vit.NO_DECAY)
    opt_state = tx.init(params)
    ours, theirs, np_state = params, params, {}
    for t in (1, 2):
        g = jax.tree.map(lambda x: x * t, grads)
        updates, opt_state = tx.update(g, opt_state, ours)
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)
        theirs = _numpy_step(name, theirs, g, np_state, t, lr=0.01, wd=0.05)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_lamb_trust_ratio_only_on_decayed_params():
    """A 1-D param moves by exactly lr * adam-update under LAMB: no trust ratio applied."""
    params, grads = _params_and_grads()
    lamb = optim.make("lamb", lambda step: 0.01, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0,
                       no_decay=vit.NO_DECAY)
    adam = optim.make("adamw", lambda step: 0.01, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0,
                       no_decay=vit.NO_DECAY)
    u_lamb, _ = lamb.update(grads, lamb.init(params), params)
    u_adam, _ = adam.update(grads, adam.init(params), params)
    np.testing.assert_allclose(u_lamb["blocks_0"]["fc1"]["bias"], u_adam["blocks_0"]["fc1"]["bias"], rtol=1e-6)
    np.testing.assert_allclose(u_lamb["pos_embed"], u_adam["pos_embed"], rtol=1e-6)
    kernel = u_lamb["blocks_0"]["fc1"]["kernel"]
    np.testing.assert_allclose(np.linalg.norm(kernel), 0.01 * np.linalg.norm(params["blocks_0"]["fc1"]["kernel"]),
                               rtol=1e-5)  # trust ratio: |update| = lr * |w|


def test_decay_mask():
    params, _ = _params_and_grads()
    mask = optim.decay_mask(params, vit.NO_DECAY)
    assert mask["blocks_0"]["fc1"]["kernel"] and mask["head"]["kernel"]
    assert not any([mask["blocks_0"]["fc1"]["bias"], mask["blocks_0"]["gamma_1"], mask["pos_embed"],
                    mask["cls_token"], mask["head"]["bias"]])


def test_schedule_warmup_then_cosine_to_min_lr():
    schedule = optim.lr_schedule(lr=1e-3, min_lr=1e-5, warmup_init_lr=1e-6, warmup_steps=10, total_steps=110)
    np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-5)
    np.testing.assert_allclose(schedule(5), 1e-6 + 0.5 * (1e-3 - 1e-6), rtol=1e-5)
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(schedule(60), 1e-5 + 0.5 * (1e-3 - 1e-5), rtol=1e-4)
    np.testing.assert_allclose(schedule(110), 1e-5, rtol=1e-4)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
        optim.make("sgd", lambda s: 1.0, weight_decay=0, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0,
                       no_decay=vit.NO_DECAY)
