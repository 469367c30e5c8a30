"""The paper's other ViT recipes: MAE fine-tuning (global pool + fc_norm, layer-wise lr decay), the
224 px fine-tune stage, and the official checkpoints' layouts."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masksub_jax import checkpoint, configs, convert, optim, train
from masksub_jax import config as config_lib
from masksub_jax.models import vit, weights
from tests.conftest import tiny_digits_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def mae():
    with np.load(os.path.join(FIXTURES, "mae_parity.npz"), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def deit3():
    with np.load(os.path.join(FIXTURES, "parity.npz"), allow_pickle=False) as data:
        return {k[len("deit3/"):]: data[k] for k in data.files if k.startswith("deit3/")}


@pytest.fixture(autouse=True)
def parity_variant(monkeypatch):
    monkeypatch.setitem(vit.VARIANTS, "parity", (32, 2, 2))  # the fixtures' timm models


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


AVG = vit.ViT(num_classes=10, variant="parity/4", pool="avg", layerscale_init=0.0)


def _avg_state_dict(mae):
    return {k[len("avg/"):]: v for k, v in mae.items() if k.startswith("avg/")}


def test_global_pool_logits_equal_timms_and_the_variant_is_read_from_the_weights(mae):
    params = vit.from_timm(_avg_state_dict(mae))  # no variant, no image size: parity/4 at 16 px
    assert "norm" not in params and "fc_norm" in params and "gamma_1" not in params["blocks_0"]
    assert _rel(AVG.apply({"params": params}, mae["images"]), mae["avg_logits"]) < 1e-5


def test_the_masked_sub_branch_pools_the_kept_tokens_only(mae):
    params = vit.from_timm(_avg_state_dict(mae))
    keep_idx = jnp.asarray([[0, 5, 9, 15], [1, 2, 3, 4], [15, 14, 13, 12], [7, 0, 8, 3]])
    logits, state = AVG.apply({"params": params}, mae["images"], keep_idx=keep_idx,
                              capture_intermediates=True, mutable=["intermediates"])
    tokens = state["intermediates"]["blocks_1"]["__call__"][0]  # the last block's output
    assert tokens.shape == (4, 1 + 4, 32)  # the cls token and the 4 kept patch tokens
    pooled = np.asarray(tokens[:, 1:]).mean(axis=1)
    normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True) + 1e-6)
    normed = normed * params["fc_norm"]["scale"] + params["fc_norm"]["bias"]
    np.testing.assert_allclose(logits, normed @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5,
                               atol=1e-5)


def _mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's util/lr_decay.py get_layer_id_for_vit, restated on timm names."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def _mae_scales(state_dict_names, depth: int, decay: float) -> dict:
    """MAE's param_groups_lrd: lr_scale = decay^(num_layers - layer_id), num_layers = depth + 1."""
    num_layers = depth + 1
    return {n: decay ** (num_layers - _mae_layer_id(n, num_layers)) for n in state_dict_names}


@pytest.mark.parametrize("variant,depth", [("B/16", 12), ("parity/4", 2)])
def test_layer_decay_scales_equal_maes_param_groups(variant, depth):
    model = vit.ViT(num_classes=10, variant=variant, pool="avg", layerscale_init=0.0)
    size = 224 if variant == "B/16" else 16
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), shapes)
    ours = vit.to_timm(optim.layer_decay_scales(vit.layer_ids(params), 0.65))
    want = _mae_scales(ours, depth, 0.65)
    assert {k: float(np.ravel(v)[0]) for k, v in ours.items()} == pytest.approx(want, rel=1e-12)
    assert want["head.weight"] == 1.0 and want["patch_embed.proj.weight"] == pytest.approx(0.65 ** (depth + 1))


def test_one_adamw_step_with_layer_decay_matches_per_group_learning_rates(mae):
    params = vit.from_timm(_avg_state_dict(mae))
    grads = jax.tree.map(lambda p: np.random.default_rng(0).standard_normal(p.shape).astype(np.float32), params)
    lr, wd, decay = 1e-2, 0.05, 0.75
    tx = optim.make("adamw", lambda step: lr, weight_decay=wd, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0,
                    no_decay=vit.NO_DECAY, layer_decay=decay, layer_ids=vit.layer_ids)
    updates, _ = tx.update(grads, tx.init(params), params)
    got = vit.to_timm(jax.tree.map(lambda p, u: p + u, params, updates))
    scales = _mae_scales(got, 2, decay)
    for name, p in vit.to_timm(params).items():  # PyTorch AdamW, one step: p - lr_g * (m/sqrt(v) + wd_g * p)
        g = vit.to_timm(grads)[name]
        adam = g / (np.abs(g) + 1e-8)  # bias-corrected first step: m_hat / sqrt(v_hat) = g / |g|
        decayed = p.ndim > 1 and name not in ("pos_embed", "cls_token")
        want = p - lr * scales[name] * (adam + (wd * p if decayed else 0.0))
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_official_deit3_and_augsub_names_load_as_their_timm_twin(deit3):
    official = {"module." + re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in deit3.items()}
    assert "module.blocks.0.gamma_1" in official
    want = weights.flatten(vit.from_timm(deit3, variant="parity/4", image_size=16))
    got = weights.flatten(vit.from_timm(official, variant="parity/4", image_size=16))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_variants_from_timm_names_and_from_the_weights(deit3):
    assert vit.timm_variant("deit3_base_patch16_224") == ("B/16", 224)
    assert vit.timm_variant("deit3_medium_patch16_224.fb_in22k_ft_in1k") == ("M/16", 224)
    assert vit.timm_variant("vit_huge_patch14_224.mae") == ("H/14", 224)
    assert vit.resolve_variant(None, deit3) == ("parity/4", 16)
    assert vit.parse_variant("M/16") == (512, 12, 8, 16)  # deit3_medium


def test_mae_pretraining_weights_start_the_global_pool_fine_tune(mae, tmp_path):
    """MAE's pretraining checkpoint: a final norm, a decoder and a mask_token; MAE's fine-tuning drops
    the norm and the decoder, and starts fc_norm and the head fresh."""
    sd = {k: v for k, v in _avg_state_dict(mae).items() if not k.startswith(("fc_norm", "head"))}
    sd.update({"norm.weight": np.full(32, 3.0, np.float32), "norm.bias": np.zeros(32, np.float32),
               "mask_token": np.zeros((1, 1, 32), np.float32), "decoder_embed.weight": np.zeros((16, 32), np.float32),
               "decoder_blocks.0.norm1.weight": np.ones(16, np.float32)})
    loaded = vit.from_timm(sd)
    assert "norm" in loaded and "decoder_embed" not in loaded and "head" not in loaded
    initial = jax.device_get(AVG.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
    said = []
    params = convert.adapt_params(loaded, initial, say=said.append)
    np.testing.assert_array_equal(params["fc_norm"]["scale"], initial["fc_norm"]["scale"])
    np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"],
                                  loaded["blocks_1"]["attn"]["qkv"]["kernel"])
    assert "norm" not in params and any("fc_norm starts fresh" in line for line in said)
    # Into a DeiT-III-style model (LayerScale, cls-token pool), the same weights get gammas of 1.
    token_model = vit.ViT(num_classes=10, variant="parity/4", layerscale_init=0.1)
    initial = jax.device_get(token_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
    params = convert.adapt_params(loaded, initial, say=said.append)
    np.testing.assert_array_equal(params["blocks_0"]["gamma_1"], np.ones(32, np.float32))
    np.testing.assert_array_equal(params["norm"]["scale"], np.full(32, 3.0, np.float32))


@pytest.mark.parametrize("name,variant,drop_path,lr,layer_decay,epochs", [
    ("mae_vit_b", "B/16", 0.1, 2e-3, 0.65, 100), ("mae_vit_l", "L/16", 0.2, 4e-3, 0.75, 50),
    ("mae_vit_h", "H/14", 0.3, 4e-3, 0.75, 50)])
def test_mae_configs_carry_the_recipe(name, variant, drop_path, lr, layer_decay, epochs):
    c = configs.get(name)
    config_lib.validate(c, num_devices=8)
    assert (c.model.variant, c.model.drop_path, c.optim.lr, c.optim.layer_decay, c.total_epochs) == \
        (variant, drop_path, pytest.approx(lr), layer_decay, epochs)
    assert (c.model.pool, c.model.layerscale_init, c.model.head_init_std) == ("avg", 0.0, 2e-5)
    assert (c.optim.name, c.optim.weight_decay, c.optim.warmup_epochs, c.optim.warmup_init_lr, c.optim.min_lr) == \
        ("adamw", 0.05, 5, 0.0, 1e-6)
    assert (c.batch_size, c.loss, c.label_smoothing, c.data.random_erasing, c.data.crop_ratio, c.data.image_size) == \
        (1024, "ce", 0.1, 0.25, 0.875, 224)
    assert (c.data.augment, c.data.repeated_aug, c.masksub.mode, c.masksub.ratio) == \
        ("rand-m9-mstd0.5-inc1", 1, "masking", 0.5)


@pytest.mark.parametrize("name,variant,drop_path", [("vit_b_ft224", "B/16", 0.2), ("vit_l_ft224", "L/16", 0.45),
                                                    ("vit_h_ft224", "H/14", 0.55)])
def test_224_fine_tune_configs_carry_the_recipe(name, variant, drop_path):
    c = configs.get(name)
    config_lib.validate(c, num_devices=8)
    assert (c.model.variant, c.model.drop_path, c.data.image_size, c.total_epochs, c.batch_size) == \
        (variant, drop_path, 224, 20, 512)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.loss, c.label_smoothing) == \
        ("adamw", 1e-5, 0.1, "ce", 0.1)
    assert (c.data.augment, c.data.repeated_aug, c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.masksub.mode) == \
        ("rand-m9-mstd0.5-inc1", 1, 0.8, 1.0, "masking")


def _tiny(c, **overrides):
    """A shipped config at a tiny size on synthetic data: 3 steps of 8 images."""
    c.data.source, c.data.image_size, c.model.variant = "synthetic", 16, "mu/4"
    c.data.num_train_examples = c.data.num_eval_examples = 16
    c.batch_size = c.eval_batch_size = 8
    c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 3, 1, 3
    config_lib.override(c, overrides)
    return c


@pytest.mark.parametrize("name", ["mae_vit_b", "mae_vit_l", "mae_vit_h"])
def test_mae_configs_run_three_steps_at_a_tiny_size(name, tmp_path):
    summary = train.run(_tiny(configs.get(name)), str(tmp_path / "run"))
    assert summary["step"] == 3
    params = checkpoint.load_params(str(tmp_path / "run"))
    assert "fc_norm" in params and "norm" not in params and "gamma_1" not in params["blocks_0"]


@pytest.fixture(scope="module")
def pretraining_workdir(tmp_path_factory):
    """A pretraining run at 12 px (a 3x3 grid), as the 192 px stage is to the 224 px fine-tune."""
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    train.run(tiny_digits_config("/unused", total_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                                 **{"data.source": "synthetic", "data.image_size": 12, "model.variant": "mu/4",
                                    "data.mean": (0.5,) * 3, "data.std": (0.5,) * 3, "batch_size": 8,
                                    "eval_batch_size": 8, "data.num_train_examples": 16,
                                    "data.num_eval_examples": 16}), workdir)
    return workdir


@pytest.mark.parametrize("name", ["vit_b_ft224", "vit_l_ft224", "vit_h_ft224"])
def test_the_224_fine_tune_starts_from_a_smaller_pretraining_workdir(name, pretraining_workdir, tmp_path, capsys):
    summary = train.run(_tiny(configs.get(name), init_from=pretraining_workdir), str(tmp_path / "ft"))
    assert summary["step"] == 3
    assert "resampled pos_embed from (1, 9, 64) to (1, 16, 64)" in capsys.readouterr().out


@pytest.mark.smoke
def test_export_to_timm_from_the_command_line(deit3, tmp_path):
    convert.save_params(vit.from_timm(deit3, variant="parity/4", image_size=16), str(tmp_path / "ours"))
    convert.main(["--to_timm", f"--from={tmp_path / 'ours'}", f"--to={tmp_path / 'timm.safetensors'}"])
    exported = convert.read_weights(str(tmp_path / "timm.safetensors"))
    assert set(exported) == set(deit3)
    for name, value in deit3.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
