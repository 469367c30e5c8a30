"""model.scan: ViT's blocks as one layer scanned over depth compute what the unrolled blocks compute
with the same weights stacked (block i at index i), in the model and in the whole train step
(layer-wise lr decay included); init_from and the timm export go between the two layouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masksub_jax import config as config_lib
from masksub_jax import convert
from masksub_jax import step as step_lib
from masksub_jax.models import layers, vit
from masksub_jax.models.weights import flatten
from tests.conftest import tiny_digits_config


def test_scanned_blocks_compute_the_unrolled_blocks():
    unrolled, scanned = vit.ViT(num_classes=10, variant="mu/8"), vit.ViT(num_classes=10, variant="mu/8", scan=True)
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    params = unrolled.init(jax.random.PRNGKey(1), images)["params"]
    stacked = vit.scanned(params)
    assert jax.tree.structure(stacked) == jax.tree.structure(scanned.init(jax.random.PRNGKey(1), images)["params"])
    assert stacked["blocks"]["block"]["attn"]["qkv"]["kernel"].shape == (4, 64, 192)
    keep = jax.random.permutation(jax.random.PRNGKey(2), 16)[:8][None].repeat(4, 0)
    for kwargs in ({}, {"keep_idx": keep}):  # the main branch, and the sub-branch's kept tokens
        a = unrolled.apply({"params": params}, images, **kwargs)
        b = scanned.apply({"params": stacked}, images, **kwargs)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    grads = [jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, images, train=True) ** 2))(p)
             for m, p in ((unrolled, params), (scanned, stacked))]
    for a, b in zip(jax.tree.leaves(vit.scanned(grads[0])), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(vit.unstacked(vit.stacked(flatten(params)))["blocks_3/mlp/fc1/kernel"],
                                  flatten(params)["blocks_3/mlp/fc1/kernel"])


def test_scanned_blocks_draw_their_own_drop_path_masks():
    """Each block of the scan draws its own drop-path masks (split keys), as the unrolled blocks do:
    the examples whose residual branch is dropped differ from block to block."""
    model = vit.ViT(num_classes=10, variant="mu/8", scan=True, drop_path=0.5)
    images = jax.random.normal(jax.random.PRNGKey(0), (32, 32, 32, 3))
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    _, captured = model.apply({"params": params}, images, train=True, mutable=["intermediates"],
                              rngs={"dropout": jax.random.PRNGKey(2), "droppath": jax.random.PRNGKey(3)},
                              capture_intermediates=lambda module, _: isinstance(module, layers.DropPath))
    out = captured["intermediates"]["blocks"]["block"]["DropPath_0"]["__call__"][0]  # (depth, batch, tokens, width)
    dropped = np.asarray(jnp.all(out == 0, axis=(2, 3)))
    assert dropped.shape == (4, 32) and 0 < dropped.mean() < 1
    assert any((dropped[i] != dropped[0]).any() for i in range(1, 4))


def _one_step(scan: bool, params=None):
    config = tiny_digits_config("/unused", batch_size=16, loss="bce", label_smoothing=0.0,
                                **{"model.variant": "mu/4", "data.image_size": 16, "optim.name": "lamb",
                                   "optim.layer_decay": 0.75, "model.scan": scan, "model.remat": scan})
    model = step_lib.make_model(config, 10)
    tx, schedule = step_lib.make_optimizer(config, total_steps=10, steps_per_epoch=10)
    state = jax.jit(step_lib.make_init(model, tx, (16, 16, 3)))(jax.random.PRNGKey(0))
    if params is not None:  # the unrolled model's initial weights, stacked; the optimizer starts at zero
        state = state | {"params": params, "opt_state": tx.init(params)}
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    initial = state["params"]
    return initial, *jax.jit(step_lib.make_train_step(config, model, tx, schedule, 10))(state, batch,
                                                                                        jax.random.PRNGKey(3))


def test_a_scanned_train_step_is_the_unrolled_step():
    """MaskSub masking, LAMB with layer-wise lr decay (a decay per index of the stacked blocks), and
    remat in the scanned step: the same losses and the same updated weights."""
    initial, unrolled_state, unrolled = _one_step(scan=False)
    _, scanned_state, scanned = _one_step(scan=True, params=vit.scanned(initial))
    for key in ("loss", "loss_main", "loss_sub", "grad_norm"):
        assert float(scanned[key]) == pytest.approx(float(unrolled[key]), rel=1e-5), key
    expected = vit.stacked(flatten(unrolled_state["params"]))
    for name, value in flatten(scanned_state["params"]).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    moved = flatten(jax.tree.map(jnp.subtract, scanned_state["params"], vit.scanned(initial)))
    first, last = (float(jnp.abs(moved["blocks/block/mlp/fc1/kernel"][i]).mean()) for i in (0, 3))
    assert first < last  # the decayed lr: block 0 moves less than block 3 (0.75^3 of the rate)


def test_init_from_and_the_timm_export_go_between_the_layouts():
    images = jnp.zeros((1, 32, 32, 3))
    unrolled = vit.ViT(num_classes=10, variant="mu/8").init(jax.random.PRNGKey(0), images)["params"]
    scanned = vit.ViT(num_classes=10, variant="mu/8", scan=True).init(jax.random.PRNGKey(1), images)["params"]
    said = []
    into_scanned = convert.adapt_params(jax.tree.map(np.asarray, unrolled), scanned, say=said.append)
    for a, b in zip(jax.tree.leaves(into_scanned), jax.tree.leaves(vit.scanned(unrolled))):
        np.testing.assert_array_equal(a, b)
    into_unrolled = convert.adapt_params(jax.tree.map(np.asarray, scanned), unrolled, say=said.append)
    assert flatten(into_unrolled).keys() == flatten(unrolled).keys()
    np.testing.assert_array_equal(flatten(into_unrolled)["blocks_2/attn/qkv/kernel"],
                                  flatten(scanned)["blocks/block/attn/qkv/kernel"][2])
    exported, expected = vit.to_timm(vit.scanned(unrolled)), vit.to_timm(unrolled)
    assert exported.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(exported[name], expected[name])


def test_model_scan_is_the_vit_familys():
    config = config_lib.base()
    config.model.family, config.model.variant, config.model.scan = "swin", "T/4", True
    with pytest.raises(ValueError, match="model.scan=True is invalid: only the ViT family scans its blocks"):
        config_lib.validate(config)
