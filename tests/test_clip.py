"""CLIP image towers (FT-CLIP fine-tuning) against open_clip and timm, from fixtures that
tools/make_clip_fixtures.py wrote (CI needs neither); frozen parameters; the recipes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from masksub_jax import config as config_lib
from masksub_jax import configs, convert, losses, masksub, optim
from masksub_jax.models import vit
from masksub_jax.models.weights import flatten, nest

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip_parity.npz")
VARIANT = "cliptest/8"


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(autouse=True)
def clip_variant(monkeypatch):
    monkeypatch.setitem(vit.VARIANTS, "cliptest", (32, 2, 2))  # the fixtures' towers


def _state_dict(fx, prefix):
    return {k[len(prefix) + 1:]: v for k, v in fx.items() if k.startswith(prefix + "/")}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _model(act="quick_gelu"):
    return vit.ViT(num_classes=10, variant=VARIANT, layerscale_init=0.0, pool="normed_avg", pre_norm=True, act=act,
                   norm_eps=1e-5)


def _with_head(params, fx, norm_from):
    """The tower's parameters with FT-CLIP's head of the fixture, its norm open_clip's ln_post."""
    flat, prefix = flatten(params), "visual." if "visual.ln_post.weight" in norm_from else ""
    flat.update({"norm/scale": norm_from[f"{prefix}ln_post.weight"], "norm/bias": norm_from[f"{prefix}ln_post.bias"],
                 "head/kernel": fx["head/weight"].T, "head/bias": fx["head/bias"]})
    return nest(flat)


@pytest.mark.parametrize("layout, act", [("openai", "quick_gelu"), ("laion", "gelu")])
def test_logits_equal_open_clip_in_openai_and_open_clip_names(fx, layout, act):
    sd = _state_dict(fx, layout)
    found = vit.detect(sd)
    assert found["variant"] == VARIANT and found["image_size"] == 32 and found["num_classes"] == 0
    assert found["config"] == {"model.layerscale_init": 0.0, "model.pre_norm": True, "model.norm_eps": 1e-5,
                               "model.act": "quick_gelu", "model.pool": "normed_avg"}
    notes = " ".join(found["notes"])
    assert ("text tower (6 tensors)" in notes) == (layout == "openai")
    assert "ln_post" in notes and "QuickGELU" in notes
    params = vit.from_timm(sd)
    assert "norm" not in params and "head" not in params and "bias" not in params["patch_embed"]
    logits = _model(act).apply({"params": _with_head(params, fx, sd)}, fx["images"])
    assert _rel(logits, fx[f"{layout}_logits"]) < 1e-5


def test_the_wrong_activation_gives_other_logits(fx):
    """The QuickGELU / GELU choice matters: the check above could not pass with either."""
    sd = _state_dict(fx, "laion")
    logits = _model("quick_gelu").apply({"params": _with_head(vit.from_timm(sd), fx, sd)}, fx["images"])
    assert _rel(logits, fx["laion_logits"]) > 1e-3


def test_logits_and_sub_branch_equal_timm_clip_tower(fx):
    sd = _state_dict(fx, "timm")
    found = vit.detect(sd)
    assert found["num_classes"] == 10 and found["config"]["model.pre_norm"] and not found["notes"][:-1]
    params = vit.from_timm(sd)
    assert _rel(_model().apply({"params": params}, fx["images"]), fx["timm_logits"]) < 1e-5
    sub = _model().apply({"params": params}, fx["images"], keep_idx=jnp.asarray(fx["keep_idx"]))
    assert _rel(sub, fx["timm_sub_logits"]) < 1e-5


def test_export_is_timms_state_dict_and_names_timms_model(fx):
    sd = _state_dict(fx, "timm")
    exported = vit.to_timm(vit.from_timm(sd))
    assert set(exported) == set(sd)
    for name, value in sd.items():  # the cls slot of pos_embed is folded into the cls token: the same sum
        if name not in ("cls_token", "pos_embed"):
            np.testing.assert_allclose(exported[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(exported["pos_embed"][:, 1:], sd["pos_embed"][:, 1:], rtol=1e-6)
    np.testing.assert_allclose(exported["cls_token"] + exported["pos_embed"][:, :1],
                               sd["cls_token"] + sd["pos_embed"][:, :1], rtol=1e-6, atol=1e-7)
    config = {"model.act": "quick_gelu", "model.pool": "normed_avg"}
    assert vit.timm_model(exported, VARIANT, 32, config) == (
        "vit_base_patch16_clip_quickgelu_224", {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8,
                                                "img_size": 32, "global_pool": "avg", "fc_norm": False})
    assert vit.timm_model(exported, "L/14", 224, {"model.act": "gelu"}) == ("vit_large_patch14_clip_224",
                                                                            {"img_size": 224})


def test_timms_clip_projection_is_left_out_with_the_final_norm(fx):
    sd = dict(_state_dict(fx, "timm"), **{"head.weight": np.ones((16, 32), np.float32),
                                          "head.bias": np.zeros(16, np.float32)})
    found = vit.detect(sd)
    assert found["num_classes"] == 0 and found["config"]["model.pool"] == "normed_avg"
    assert "all-zero bias" in found["notes"][0]
    params = vit.from_timm(sd)
    assert "head" not in params and "norm" not in params


def test_masksub_step_gradients_equal_the_official_two_backward_step(fx, monkeypatch):
    params = vit.from_timm(_state_dict(fx, "timm"))
    monkeypatch.setattr(masksub, "keep_indices", lambda *args: jnp.asarray(fx["keep_idx"]))

    def forward(p, state, images, rng, **corruption):
        return _model().apply({"params": p}, images, train=True, **corruption), state

    (_, aux), grads = masksub.grads(params, {}, forward, jnp.asarray(fx["images"]), jnp.asarray(fx["targets"]),
                                    jax.random.PRNGKey(0), loss=losses.LOSSES["ce"], mode="masking", ratio=0.5,
                                    num_units=16)
    assert float(aux["loss_main"]) == pytest.approx(float(fx["loss_main"]), rel=1e-5)
    assert float(aux["loss_sub"]) == pytest.approx(float(fx["loss_sub"]), rel=1e-5)
    got, want = vit.to_timm(grads), _state_dict(fx, "grads")
    got["pos_embed"][:, 0] = got["cls_token"][:, 0]  # torch's gradient of the cls slot is the cls token's
    assert set(got) == set(want)
    errors = {name: _rel(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


# FT-CLIP's parameter names <- ours (timm's, through vit._names), for its layer-decay assignment.
_FT_CLIP = {"patch_embed.proj.weight": "conv1.weight", "cls_token": "class_embedding",
            "pos_embed": "positional_embedding", "norm_pre.weight": "ln_pre.weight", "norm_pre.bias": "ln_pre.bias",
            "norm.weight": "fc_norm.weight", "norm.bias": "fc_norm.bias", "head.weight": "head.weight",
            "head.bias": "head.bias"}


def _ft_clip_name(timm_name):
    if timm_name in _FT_CLIP:
        return _FT_CLIP[timm_name]
    name = timm_name.replace("blocks.", "transformer.resblocks.").replace("norm1", "ln_1").replace("norm2", "ln_2")
    return (name.replace("attn.qkv.weight", "attn.in_proj_weight").replace("attn.qkv.bias", "attn.in_proj_bias")
            .replace("attn.proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))


def test_layer_decay_scales_are_ft_clips(fx):
    params = _model().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    scales = flatten(optim.layer_decay_scales(vit.layer_ids(params), 0.6))
    names = vit._names(2)
    got = {_ft_clip_name(names[k]): float(v) for k, v in scales.items()}
    want = {k: float(v) for k, v in _state_dict(fx, "ftclip_layer_scale").items()}
    assert got == pytest.approx(want, rel=1e-12)


def test_frozen_parameters_do_not_move_and_have_no_optimizer_state():
    params = _model().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optim.make("adamw", optax.constant_schedule(1e-2), weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                    grad_clip_norm=1.0, no_decay=vit.NO_DECAY, layer_decay=0.6, layer_ids=vit.layer_ids,
                    frozen=("patch_embed", "blocks_1/mlp"))
    state = tx.init(params)
    moments = [x.shape for x in jax.tree.leaves(state) if x.ndim]
    trained = [x.shape for n, x in flatten(params).items() if not n.startswith(("patch_embed/", "blocks_1/mlp/"))]
    assert sorted(moments) == sorted(trained * 2)  # Adam's mu and nu of the trained ones only
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    flat = flatten(params)
    initial = flatten(_model().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"])
    for name in flat:
        frozen = name.startswith(("patch_embed/", "blocks_1/mlp/"))
        assert np.array_equal(flat[name], initial[name]) == frozen, name


def test_a_frozen_pattern_that_matches_nothing_is_an_error():
    params = _model().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    tx = optim.make("adamw", optax.constant_schedule(1e-3), weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                    grad_clip_norm=0.0, frozen=("patch_embed", "conv1"))
    with pytest.raises(ValueError, match=r"optim.frozen=.*\['conv1'\] match no parameter.*patch_embed"):
        tx.init(params)


@pytest.mark.parametrize("name, variant, lr, layer_decay, epochs", [("clip_vit_b16_ft", "B/16", 6e-4, 0.6, 50.0),
                                                                     ("clip_vit_l14_ft", "L/14", 4e-4, 0.65, 30.0)])
def test_recipes_are_ft_clips(name, variant, lr, layer_decay, epochs):
    c = configs.get(name)
    config_lib.validate(c, num_devices=None)
    assert (c.model.variant, c.optim.lr, c.optim.layer_decay, c.total_epochs) == (variant, lr, layer_decay, epochs)
    assert (c.model.pool, c.model.act, c.model.pre_norm, c.model.norm_eps) == ("normed_avg", "quick_gelu", True, 1e-5)
    assert c.optim.frozen == ("patch_embed",) and c.ema.decay == 0.9998 and c.batch_size == 2048
    assert c.mixup.mixup_alpha == c.mixup.cutmix_alpha == 0 and c.data.mean == config_lib.CLIP_MEAN


def test_convert_prints_what_it_leaves_out_and_the_clip_recipe(fx, tmp_path, capsys):
    path = tmp_path / "clip.npz"
    np.savez(path, **_state_dict(fx, "openai"))
    convert.main([f"--from={path}", f"--to={tmp_path / 'clip'}"])
    out = capsys.readouterr().out
    assert "text tower (6 tensors) is left out" in out and "ln_post" in out and "--config.model.act=gelu" in out
    assert "--config=clip_vit_b16_ft" in out and "--config.model.variant=cliptest/8" in out
    # What the weights imply is kept with them: a config that differs is said at the start of training,
    # and the transfer recipe takes the tower's layout and CLIP's normalisation from them.
    from masksub_jax import init_from
    clip = configs.get("clip_vit_b16_ft", **{"model.variant": "cliptest/8", "data.image_size": 32})
    assert init_from.implied_differences(clip, str(tmp_path / "clip")) == []
    clip.model.act = "gelu"
    assert init_from.implied_differences(clip, str(tmp_path / "clip")) == [
        "init_from: the weights imply model.act='quick_gelu', the config has 'gelu'; training with the config's "
        "(--config.model.act=quick_gelu for the weights')"]
    transfer = configs.get("transfer", f"dataset=cifar100,init_from={tmp_path / 'clip'}")
    assert (transfer.model.variant, transfer.model.pre_norm, transfer.model.act, transfer.model.pool) == (
        "cliptest/8", True, "quick_gelu", "normed_avg")
    assert transfer.data.mean == config_lib.CLIP_MEAN and transfer.model.norm_eps == 1e-5
