"""BEiT v2: parity with timm's Beit and an official-style MaskSub step (fixtures of
tools/make_beit_fixtures.py), the kept-token relative position bias, weights in and out, BEiT's layer
ids, and the recipe config trained end to end at a tiny size."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masksub_jax import config as config_lib
from masksub_jax import configs, convert, losses, masksub, optim, train
from masksub_jax.models import beit, vit, weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "beit_parity.npz")
VARIANT = "parity/8"  # the fixture's timm Beit: width 64, depth 2, 4 heads, patch 8, 32 px


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(autouse=True)
def parity_variant(monkeypatch):
    monkeypatch.setitem(vit.VARIANTS, "parity", (64, 2, 4))  # beit.VARIANTS is vit.VARIANTS


def _state_dict(fx, prefix):
    return {k[len(prefix) + 1:]: v for k, v in fx.items() if k.startswith(prefix + "/")}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


MODEL = beit.Beit(num_classes=10, variant=VARIANT)


@jax.jit
def _logits(params, images, keep_idx=None):
    return MODEL.apply({"params": params}, images, keep_idx=keep_idx)


def _params(fx):
    return beit.from_timm(_state_dict(fx, "tiny"), variant=VARIANT, image_size=32)


def test_relative_position_index_is_timms(fx):
    np.testing.assert_array_equal(beit.relative_position_index(4), fx["relative_position_index"])


def test_logits_equal_timm_at_a_tiny_size(fx):
    assert _rel(_logits(_params(fx), fx["images"]), fx["tiny_logits"]) < 1e-5


def test_sub_branch_logits_equal_the_kept_token_forward_with_gathered_biases(fx):
    params = _params(fx)
    logits = _logits(params, fx["images"], jnp.asarray(fx["keep_idx"]))
    assert _rel(logits, fx["tiny_sub_logits"]) < 1e-5
    assert _rel(logits, fx["tiny_logits"]) > 1e-2  # the masking changed the prediction
    # Keeping every token in a shuffled order is the main branch: each token's bias followed it.
    order = jnp.asarray(np.stack([np.random.default_rng(i).permutation(16) for i in range(4)]))
    np.testing.assert_allclose(_logits(params, fx["images"], order), fx["tiny_logits"],
                               rtol=1e-5, atol=1e-5)


def test_masksub_loss_and_every_gradient_equal_the_official_two_pass_step(fx, monkeypatch):
    monkeypatch.setattr(masksub, "keep_indices", lambda *args: jnp.asarray(fx["keep_idx"]))

    def forward(p, state, images, rng, **corruption):
        del rng  # no dropout or drop-path in the fixture
        return MODEL.apply({"params": p}, images, train=True, **corruption), state

    step = jax.jit(lambda params, images, targets: masksub.grads(
        params, {}, forward, images, targets, jax.random.PRNGKey(0), loss=losses.LOSSES["ce"], mode="masking",
        ratio=0.5, num_units=16))
    (total, aux), grads = step(_params(fx), jnp.asarray(fx["images"]), jnp.asarray(fx["targets"]))
    assert float(aux["loss_main"]) == pytest.approx(float(fx["loss_main"]), rel=1e-5)
    assert float(aux["loss_sub"]) == pytest.approx(float(fx["loss_sub"]), rel=1e-5)
    assert float(total) == pytest.approx(0.5 * float(fx["loss_main"] + fx["loss_sub"]), rel=1e-5)
    got, want = beit.to_timm(grads), _state_dict(fx, "grads")
    assert set(got) == set(want)
    errors = {name: _rel(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


def test_dropsub_and_pathsub_masks_follow_the_example_not_the_micro_batch(fx):
    """The dropout and drop-path sub-branches, with remat: example i's masks come from first_example + i."""
    model = beit.Beit(num_classes=10, variant=VARIANT, remat=True)
    rngs = {"dropout": jax.random.PRNGKey(1), "droppath": jax.random.PRNGKey(2)}
    corrupted = jax.jit(lambda p, x, first: model.apply({"params": p}, x, train=True, dropout_rate=0.3,
                                                       drop_path_rate=0.5, first_example=first, rngs=rngs))
    params, images = _params(fx), jnp.asarray(fx["images"])
    whole = corrupted(params, images, 0)
    later = corrupted(params, jnp.roll(images, -2, axis=0), 2)  # a micro-batch starting at example 2
    np.testing.assert_allclose(later[:2], whole[2:], rtol=1e-5, atol=1e-6)
    assert _rel(later[2:], whole[:2]) > 1e-2  # examples 0 and 1 drew other masks as examples 4 and 5
    assert _rel(whole, fx["tiny_logits"]) > 1e-2  # the rates took effect


def test_export_is_the_inverse_of_load(fx):
    sd = _state_dict(fx, "tiny")
    back = beit.to_timm(_params(fx))
    assert set(back) == set(sd)
    for name, value in sd.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def _beit_layer_id(name: str, depth: int) -> int:
    """unilm beit2/optim_factory.py get_num_layer_for_vit, restated on timm names."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return depth + 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_ids_are_beits_assignment(fx):
    params = _params(fx)
    ours = beit.to_timm(jax.tree.map(float, beit.layer_ids(params)))
    assert {k: int(v.item()) for k, v in ours.items()} == {k: _beit_layer_id(k, 2) for k in ours}
    assert ours["head.weight"] == 3 and ours["blocks.1.attn.relative_position_bias_table"] == 2


def test_weight_decay_spares_cls_token_and_1d_parameters_only(fx):
    mask = optim.decay_mask(_params(fx), beit.NO_DECAY)
    assert not mask["cls_token"] and not mask["blocks_0"]["attn"]["q_bias"] and not mask["blocks_0"]["gamma_1"]
    assert mask["blocks_0"]["attn"]["relative_position_bias_table"]  # as unilm beit2 run_class_finetuning.py
    assert mask["blocks_0"]["attn"]["qkv"]["kernel"] and mask["patch_embed"]["kernel"]


# --------------------------------------------------------------------------------------------------
# Weights in.
def _pretraining_layout(sd):
    """timm's state dict as BEiT v2 pretraining saves it: one shared table and its index, the final
    norm, mask_token, lm_head and cls_pt_layers; no fc_norm or head."""
    out = {k: v for k, v in sd.items() if not k.startswith(("fc_norm.", "head.", "blocks.1.attn.relative_position"))}
    out["rel_pos_bias.relative_position_bias_table"] = out.pop("blocks.0.attn.relative_position_bias_table")
    out["rel_pos_bias.relative_position_index"] = beit.relative_position_index(4).astype(np.int64)
    out.update({"norm.weight": np.ones(64, np.float32), "norm.bias": np.zeros(64, np.float32),
                "mask_token": np.zeros((1, 1, 64), np.float32), "lm_head.weight": np.zeros((8, 64), np.float32),
                "cls_pt_layers.0.norm1.weight": np.ones(64, np.float32)})
    return out


def test_pretraining_weights_load_with_the_shared_table_in_every_block(fx):
    sd = _state_dict(fx, "tiny")
    flat = weights.flatten(beit.from_timm(_pretraining_layout(sd), variant=VARIANT))
    assert "head/kernel" not in flat and "fc_norm/scale" not in flat and "norm/scale" not in flat
    for i in (0, 1):
        np.testing.assert_array_equal(flat[f"blocks_{i}/attn/relative_position_bias_table"],
                                      sd["blocks.0.attn.relative_position_bias_table"])


def test_detect_names_beit_and_vit_does_not_claim_it(fx):
    sd = _state_dict(fx, "tiny")
    assert vit.detect(sd) is None and vit.detect(_pretraining_layout(sd)) is None
    family, found = convert.detect_family(_pretraining_layout(sd))
    assert family == "beit" and (found["variant"], found["image_size"], found["num_classes"]) == (VARIANT, 32, 0)
    assert beit.detect({"cls_token": sd["cls_token"], "pos_embed": np.zeros((1, 17, 64))}) is None


@pytest.mark.parametrize("change,message", [
    ({"image_size": 64}, "made for 32 px .* use --image_size=32"),
    ({"variant": "B/16"}, "does not fit BEiT-B/16: the weights have width 64, depth 2, patch 8"),
    ({"drop": "blocks.1.mlp.fc2.bias"}, re.escape("missing keys ['blocks.1.mlp.fc2.bias']")),
    ({"add": "pos_embed"}, "absolute position embedding"),
])
def test_weights_that_do_not_fit_are_named(fx, change, message):
    sd = _state_dict(fx, "tiny")
    sd.pop(change.get("drop"), None)
    if "add" in change:
        sd[change["add"]] = np.zeros((1, 17, 64), np.float32)
    with pytest.raises(weights.ConversionError, match=message):
        beit.from_timm(sd, variant=change.get("variant", VARIANT), image_size=change.get("image_size"))


def test_timm_model_names_beitv2_with_what_differs(fx):
    assert beit.timm_model(_state_dict(fx, "tiny"), VARIANT, 32) == (
        "beitv2_base_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 8, "img_size": 32})


# --------------------------------------------------------------------------------------------------
# The recipe.
def test_the_recipe_config_validates_with_the_published_values():
    c = configs.get("beitv2_vit_b16_ft")
    config_lib.validate(c, num_devices=8)
    assert (c.model.family, c.model.variant, c.model.pool, c.model.drop_path, c.model.layerscale_init,
            c.model.head_init_std) == ("beit", "B/16", "avg", 0.2, 0.1, 2e-5)
    assert (c.optim.name, c.optim.lr, c.optim.layer_decay, c.optim.weight_decay, c.optim.warmup_epochs,
            c.optim.warmup_init_lr, c.optim.min_lr, c.optim.grad_clip_norm) == (
                "adamw", 5e-4, 0.6, 0.05, 20, 0, 1e-6, 0)
    assert (c.batch_size, c.total_epochs, c.loss, c.label_smoothing, c.ema.decay) == (1024, 100, "ce", 0.1, 0)
    assert (c.masksub.mode, c.masksub.ratio, beit.num_units(c)) == ("masking", 0.5, 196)
    c.model.pool = "token"
    with pytest.raises(ValueError, match="model.pool='avg'"):
        config_lib.validate(c, num_devices=8)


def test_the_recipe_trains_two_steps_from_converted_pretraining_weights(fx, tmp_path):
    np.savez(tmp_path / "pt.npz", **_pretraining_layout(_state_dict(fx, "tiny")))
    convert.main([f"--from={tmp_path / 'pt.npz'}", f"--to={tmp_path / 'init'}"])
    c = configs.get("beitv2_vit_b16_ft")
    c.model.variant, c.data.source, c.data.image_size = VARIANT, "synthetic", 32
    c.data.num_train_examples = c.data.num_eval_examples = 8
    c.batch_size = c.eval_batch_size = 8
    c.total_steps, c.log_every_steps, c.checkpoint_every_steps, c.eval_every_steps = 2, 1, 2, 0
    # Mixup and random erasing are the trainer's, tested with it; left out, they halve the compile time.
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = c.data.random_erasing = 0.0
    c.init_from = str(tmp_path / "init")
    summary = train.run(c, str(tmp_path / "run"))
    assert summary["step"] == 2 and summary["eval_examples"] == 8
    assert sum(np.isfinite(record.get("train/loss_sub", np.nan)) for record in summary["history"]) == 2


def test_convert_cli_round_trip_prints_the_timm_model_that_loads_it(fx, tmp_path, capsys):
    sd = _state_dict(fx, "tiny")
    np.savez(tmp_path / "ft.npz", **sd)
    convert.main([f"--from={tmp_path / 'ft.npz'}", f"--to={tmp_path / 'init'}"])
    convert.main(["--to_timm", f"--from={tmp_path / 'init'}", f"--to={tmp_path / 'back.npz'}"])
    with np.load(tmp_path / "back.npz") as back:
        assert set(back.files) == set(sd)
        for name, value in sd.items():
            np.testing.assert_array_equal(back[name], value, err_msg=name)
    printed = capsys.readouterr().out
    assert ('timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=10, embed_dim=64, depth=2, '
            'num_heads=4, patch_size=8, img_size=32)') in printed
