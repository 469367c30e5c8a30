"""Swin: parity with timm and the official MaskSub Swin step (fixtures of tools/make_swin_fixtures.py),
the mask-token sub-branch, weights in and out, configs, and training end to end."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masksub_jax import config as config_lib
from masksub_jax import configs, convert, losses, masksub, optim, train
from masksub_jax.models import layers, swin, weights
from tests.conftest import tiny_digits_config
from tests.seeded import seeded_weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "swin_parity.npz")
BLOCK_PX = 16  # the fixture's blocks: 4x4 tokens at patch 4


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(autouse=True)
def parity_variant(monkeypatch):
    monkeypatch.setitem(swin.VARIANTS, "parity", (24, (2, 2), (1, 2), 4))  # the fixture's timm model


def _state_dict(fx, prefix):
    return {k[len(prefix) + 1:]: v for k, v in fx.items() if k.startswith(prefix + "/")}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


MODEL = swin.Swin(num_classes=10, variant="parity/4", block_size=BLOCK_PX)


def _params(fx):
    params = swin.from_timm(_state_dict(fx, "tiny"), variant="parity/4", image_size=32)
    params["mask_token"] = fx["mask_token"]
    return params


def test_logits_equal_timm_at_a_tiny_size(fx):
    logits = MODEL.apply({"params": _params(fx)}, fx["images"])
    assert _rel(logits, fx["tiny_logits"]) < 1e-5


def test_sub_branch_logits_equal_the_official_mask_token_forward(fx):
    logits = MODEL.apply({"params": _params(fx)}, fx["images"], keep_idx=jnp.asarray(fx["keep_idx"]))
    assert _rel(logits, fx["tiny_sub_logits"]) < 1e-5
    assert _rel(logits, fx["tiny_logits"]) > 1e-2  # the masking changed the prediction


def test_masksub_loss_and_every_gradient_equal_the_official_two_pass_step(fx, monkeypatch):
    monkeypatch.setattr(masksub, "keep_indices", lambda *args: jnp.asarray(fx["keep_idx"]))

    def forward(p, state, images, rng, **corruption):
        del rng  # no dropout or drop-path in the fixture
        return MODEL.apply({"params": p}, images, train=True, **corruption), state

    (total, aux), grads = masksub.grads(_params(fx), {}, forward, jnp.asarray(fx["images"]), jnp.asarray(fx["targets"]),
                                        jax.random.PRNGKey(0), loss=losses.LOSSES["ce"], mode="masking", ratio=0.5,
                                        num_units=4)
    assert float(aux["loss_main"]) == pytest.approx(float(fx["loss_main"]), rel=1e-5)
    assert float(aux["loss_sub"]) == pytest.approx(float(fx["loss_sub"]), rel=1e-5)
    assert float(total) == pytest.approx(0.5 * float(fx["loss_main"] + fx["loss_sub"]), rel=1e-5)
    got = {**swin.to_timm(grads), "mask_token": np.asarray(grads["mask_token"])}
    want = _state_dict(fx, "grads")
    assert set(got) == set(want)
    errors = {name: _rel(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


def _swin_t_shapes(fx) -> dict:
    return {str(n): tuple(int(d) for d in str(s).split(",")) for n, s in zip(fx["swin_t_names"], fx["swin_t_shapes"])}


def test_logits_equal_timm_swin_t_at_224(fx):
    params = swin.from_timm(seeded_weights(_swin_t_shapes(fx)), variant="T/4", image_size=224)
    params["mask_token"] = np.zeros((1, 1, 96), np.float32)
    images = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32).transpose(0, 2, 3, 1)
    logits = swin.Swin(num_classes=1000, variant="T/4").apply({"params": params}, images)
    assert _rel(logits, fx["swin_t_logits"]) < 1e-5


def test_export_gives_timm_swin_t_every_key_with_its_shape(fx):
    """What load_state_dict(strict=True) asks: the same keys and shapes as timm's own state dict."""
    model = swin.Swin(num_classes=1000, variant="T/4")
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
    exported = swin.to_timm(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), params))
    assert {k: v.shape for k, v in exported.items()} == _swin_t_shapes(fx)


def test_export_is_the_inverse_of_load(fx):
    sd = _state_dict(fx, "tiny")
    back = swin.to_timm(swin.from_timm(sd, variant="parity/4", image_size=32))
    assert set(back) == set(sd)
    for name, value in sd.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def _original_layout(sd):
    """timm's state dict as Microsoft's / augsub's Swin saves it: merging at the end of a stage, head.*,
    and the relative_position_index / attn_mask buffers."""
    out = {}
    for key, value in sd.items():
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = f"layers.{stage - 1}.downsample." + key.split(".downsample.", 1)[1]
        out[key.replace("head.fc.", "head.")] = value
    out["layers.0.blocks.0.attn.relative_position_index"] = swin.relative_position_index(4)
    out["layers.0.blocks.1.attn_mask"] = swin.shifted_window_mask(8, 4, 2)
    return out


def test_the_original_layout_and_its_buffers_load_as_timms(fx):
    sd = _state_dict(fx, "tiny")
    want = weights.flatten(swin.from_timm(sd, variant="parity/4", image_size=32))
    original = {**_original_layout(sd), "mask_token": fx["mask_token"]}
    got = weights.flatten(swin.from_timm(original, variant="parity/4", image_size=32))
    assert set(got) == set(want) | {"mask_token"}
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    wrong = {**original, "layers.0.blocks.0.attn.relative_position_index": swin.relative_position_index(3)}
    with pytest.raises(weights.ConversionError, match="relative position index of a 4x4 window"):
        swin.from_timm(wrong, variant="parity/4", image_size=32)


def test_missing_unexpected_and_misshapen_keys_are_named(fx):
    sd = _state_dict(fx, "tiny")
    with pytest.raises(weights.ConversionError, match=r"missing keys \['layers.1.blocks.1.mlp.fc2.bias'\]"):
        swin.from_timm({k: v for k, v in sd.items() if k != "layers.1.blocks.1.mlp.fc2.bias"}, variant="parity/4",
                       image_size=32)
    with pytest.raises(weights.ConversionError, match="does not fit Swin-T/4"):
        swin.from_timm(sd, variant="T/4", image_size=224)
    with pytest.raises(weights.ConversionError, match="layers_1_blocks_0/attn/relative_position_bias_table"):
        swin.from_timm(sd, variant="parity/4", image_size=16)  # stage 1's 2x2 grid: 2x2 windows, a smaller table


def test_parameter_counts_equal_timms_plus_the_mask_token():
    for variant, timm_count, width in (("T/4", 28_288_354, 96), ("S/4", 49_606_258, 96), ("B/4", 87_768_224, 128)):
        model = swin.Swin(num_classes=1000, variant=variant)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
        assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == timm_count + width, variant


# --------------------------------------------------------------------------------------------------
# The sub-branch.
def test_mask_tokens_lie_exactly_on_the_dropped_blocks():
    batch, grid, block, width = 3, 16, 4, 5
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, grid, grid, width)) + 10.0
    token = -jnp.ones((1, 1, width))
    keep_idx = masksub.keep_indices(jax.random.PRNGKey(1), batch, 16, 0.5)
    out = np.asarray(layers.keep_blocks(x, keep_idx, block, token.reshape(-1)))
    blocks = out.reshape(batch, 4, block, 4, block, width).transpose(0, 1, 3, 2, 4, 5).reshape(batch, 16, -1)
    masked = np.all(blocks == -1.0, axis=-1)
    unchanged = np.all(blocks == np.asarray(x).reshape(batch, 4, block, 4, block, width).transpose(
        0, 1, 3, 2, 4, 5).reshape(batch, 16, -1), axis=-1)
    assert np.all(masked ^ unchanged)  # each block wholly masked or wholly kept
    for j in range(batch):
        assert sorted(np.flatnonzero(unchanged[j])) == sorted(np.asarray(keep_idx[j]))
    assert masked.sum(axis=1).tolist() == [16 - masksub.num_kept(16, 0.5)] * batch


def test_kept_blocks_follow_the_ratio_and_differ_per_example_and_per_step():
    config = configs.get("swin_t")
    units = swin.num_units(config)
    assert units == 49  # 7x7 blocks of 32 px at 224
    for ratio, kept in ((0.5, 24), (0.25, 36), (0.75, 12)):  # the ratio is honoured (the official code fixes 0.5)
        config.masksub.ratio = ratio
        assert masksub.corruption("masking", ratio, jax.random.PRNGKey(0), 4, units)["keep_idx"].shape == (4, kept)
    step0 = np.asarray(masksub.keep_indices(jax.random.fold_in(jax.random.PRNGKey(0), 0), 8, units, 0.5))
    step1 = np.asarray(masksub.keep_indices(jax.random.fold_in(jax.random.PRNGKey(0), 1), 8, units, 0.5))
    assert len({tuple(sorted(row)) for row in step0}) == 8
    assert all(set(a) != set(b) for a, b in zip(step0, step1))


def test_keeping_every_block_is_the_main_branch():
    model = swin.Swin(num_classes=4, variant="mu/2", block_size=4)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    every = jnp.tile(jnp.arange(16)[None], (2, 1))
    np.testing.assert_array_equal(model.apply({"params": params}, images, keep_idx=every),
                                  model.apply({"params": params}, images))


def test_no_weight_decay_on_mask_token_and_bias_tables():
    model = swin.Swin(num_classes=4, variant="mu/2", block_size=4)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"]
    mask = optim.decay_mask(params, swin.NO_DECAY)
    assert not mask["mask_token"] and not mask["layers_0_blocks_0"]["attn"]["relative_position_bias_table"]
    assert mask["layers_0_blocks_0"]["attn"]["qkv"]["kernel"] and mask["layers_1_downsample"]["reduction"]["kernel"]
    assert not mask["layers_0_blocks_0"]["norm1"]["scale"]


# --------------------------------------------------------------------------------------------------
# Configs and training.


@pytest.mark.parametrize("name,variant,drop_path", [("swin_t", "T/4", 0.2), ("swin_s", "S/4", 0.3),
                                                    ("swin_b", "B/4", 0.5)])
def test_shipped_swin_configs_carry_the_published_recipe(name, variant, drop_path):
    c = configs.get(name)
    config_lib.validate(c, num_devices=8)
    assert (c.model.family, c.model.variant, c.model.drop_path, c.data.image_size) == ("swin", variant, drop_path, 224)
    assert (c.optim.name, c.optim.lr, c.optim.min_lr, c.optim.warmup_epochs, c.optim.weight_decay,
            c.optim.grad_clip_norm) == ("adamw", 1e-3, 1e-5, 20, 0.05, 5.0)
    assert (c.batch_size, c.total_epochs, c.loss, c.label_smoothing) == (1024, 300, "ce", 0.1)
    assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.data.augment, c.data.random_erasing,
            c.data.repeated_aug) == (0.8, 1.0, "rand-m9-mstd0.5-inc1", 0.25, 1)
    assert (c.masksub.mode, c.masksub.ratio, c.masksub.block_size) == ("masking", 0.5, 32)


@pytest.mark.parametrize("key,value,message", [
    ("data.image_size", 200, "must be a multiple of 32"),
    ("data.image_size", 160, "do not split into 7x7 windows"),
    ("masksub.block_size", 30, "multiple of the patch size 4"),
    ("model.variant", "XL/4", "Unknown Swin variant"),
    ("model.family", "nosuch", "Unknown model.family 'nosuch'"),
])
def test_bad_swin_values_are_named(key, value, message):
    c = configs.get("swin_t")
    section, _, name = key.rpartition(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c, num_devices=8)


def test_swin_t_config_runs_three_steps_at_a_tiny_size(tmp_path):
    c = configs.get("swin_t")
    c.data.source, c.data.image_size, c.masksub.block_size = "synthetic", 32, 8
    c.model.variant = "mu/2"
    c.data.num_train_examples = c.data.num_eval_examples = 16
    c.batch_size = c.eval_batch_size = 8
    c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 3, 1, 3
    summary = train.run(c, str(tmp_path / "run"))
    assert summary["step"] == 3 and summary["eval_examples"] == 16
    assert sum("train/loss_sub" in record for record in summary["history"]) == 3


def test_a_digits_sized_swin_learns(tmp_path, digits_dir):
    config = tiny_digits_config(digits_dir, total_steps=80, **{"model.family": "swin", "model.variant": "mu/1",
                                                                "masksub.block_size": 4})
    summary = train.run(config, str(tmp_path / "run"))
    logged = [record for record in summary["history"] if "train/loss_main" in record]
    first, last = logged[0], logged[-1]
    assert last["train/loss_main"] < first["train/loss_main"] - 0.15
    assert last["train/loss_sub"] < first["train/loss_sub"]
    assert summary["top1"] > 0.25  # 10 classes; 80 steps of 64 from scratch


def test_convert_cli_then_init_from_keeps_a_fresh_mask_token(fx, tmp_path):
    sd = _state_dict(fx, "tiny")
    np.savez(tmp_path / "tiny.npz", **sd)
    convert.main([f"--from={tmp_path / 'tiny.npz'}", f"--to={tmp_path / 'init'}", "--family=swin",
                  "--variant=parity/4", "--image_size=32"])
    loaded = convert.read_params(str(tmp_path / "init"))
    model = swin.Swin(num_classes=7, variant="parity/4", block_size=BLOCK_PX)
    initial = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"])
    said = []
    params = convert.adapt_params(loaded, initial, family="swin", say=said.append)
    np.testing.assert_array_equal(params["mask_token"], initial["mask_token"])
    np.testing.assert_array_equal(params["head"]["kernel"], initial["head"]["kernel"])  # 10 classes -> 7
    np.testing.assert_array_equal(params["norm"]["scale"], sd["norm.weight"])
    assert any("mask_token" in line for line in said) and any("head/kernel" in line for line in said)
