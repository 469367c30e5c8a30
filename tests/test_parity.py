"""Parity with timm and the official MaskSub step, against fixtures that
tools/make_parity_fixtures.py wrote with torch and timm (CI needs neither)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from masksub_jax import convert, losses, masksub, optim
from masksub_jax.models import vit, weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "parity.npz")


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(autouse=True)
def parity_variant(monkeypatch):
    monkeypatch.setitem(vit.VARIANTS, "parity", (32, 2, 2))  # the fixtures' timm models


def _state_dict(fx, prefix):
    return {k[len(prefix) + 1:]: v for k, v in fx.items() if k.startswith(prefix + "/")}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


MODEL = vit.ViT(num_classes=10, variant="parity/4")


def test_main_logits_equal_timm_deit3(fx):
    params = vit.from_timm(_state_dict(fx, "deit3"), variant="parity/4", image_size=16)
    logits = MODEL.apply({"params": params}, fx["images"])
    assert _rel(logits, fx["deit3_logits"]) < 1e-5


def test_main_logits_equal_timm_augreg_with_its_cls_slot_and_no_layerscale(fx):
    params = vit.from_timm(_state_dict(fx, "augreg"), variant="parity/4", image_size=16)
    assert "gamma_1" not in params["blocks_0"]
    assert params["pos_embed"].shape == (1, 16, 32)
    logits = vit.ViT(num_classes=10, variant="parity/4", layerscale_init=0.0).apply({"params": params}, fx["images"])
    assert _rel(logits, fx["augreg_logits"]) < 1e-5


def test_sub_branch_logits_equal_the_official_token_dropping_forward(fx):
    params = vit.from_timm(_state_dict(fx, "deit3"), variant="parity/4", image_size=16)
    logits = MODEL.apply({"params": params}, fx["images"], keep_idx=jnp.asarray(fx["keep_idx"]))
    assert _rel(logits, fx["deit3_sub_logits"]) < 1e-5


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_masksub_loss_and_every_gradient_equal_the_official_two_pass_accumulation(fx, loss, monkeypatch):
    params = vit.from_timm(_state_dict(fx, "deit3"), variant="parity/4", image_size=16)
    monkeypatch.setattr(masksub, "keep_indices", lambda *args: jnp.asarray(fx["keep_idx"]))

    def forward(p, state, images, rng, **corruption):
        del rng  # no dropout or drop-path in the fixture
        return MODEL.apply({"params": p}, images, train=True, **corruption), state

    (total, aux), grads = masksub.grads(params, {}, forward, jnp.asarray(fx["images"]), jnp.asarray(fx["targets"]),
                                        jax.random.PRNGKey(0), loss=losses.LOSSES[loss], mode="masking",
                                        ratio=0.5, num_units=16)
    assert float(aux["loss_main"]) == pytest.approx(float(fx[f"{loss}_loss_main"]), rel=1e-5)
    assert float(aux["loss_sub"]) == pytest.approx(float(fx[f"{loss}_loss_sub"]), rel=1e-5)
    assert float(total) == pytest.approx(0.5 * float(fx[f"{loss}_loss_main"] + fx[f"{loss}_loss_sub"]), rel=1e-5)
    want = _state_dict(fx, f"{loss}_grads")
    got = vit.to_timm(grads)
    assert set(got) == set(want)
    errors = {name: _rel(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


def test_one_lamb_step_equals_timm_lamb(fx):
    params = vit.from_timm(_state_dict(fx, "deit3"), variant="parity/4", image_size=16)
    grads = vit.from_timm(_state_dict(fx, "bce_grads"), variant="parity/4", image_size=16)
    tx = optim.make("lamb", optax.constant_schedule(float(fx["lamb_lr"])), weight_decay=float(fx["lamb_weight_decay"]),
                    b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0, no_decay=vit.NO_DECAY)
    updates, _ = tx.update(grads, tx.init(params), params)
    got = vit.to_timm(optax.apply_updates(params, updates))
    want = _state_dict(fx, "lamb_after")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("grid", [6, 3])
def test_pos_embed_resampling_equals_timms(fx, grid):
    """Up (16 -> 24 px) and down (16 -> 12 px): timm's bicubic with antialiasing."""
    params = vit.from_timm(_state_dict(fx, "deit3"), variant="parity/4", image_size=4 * grid)
    np.testing.assert_allclose(params["pos_embed"], fx[f"pos_embed_{grid}x{grid}"], rtol=1e-5, atol=1e-6)
    logits = MODEL.apply({"params": params}, jnp.zeros((1, 4 * grid, 4 * grid, 3)))
    assert logits.shape == (1, 10)


def test_export_is_the_inverse_of_load(fx):
    sd = _state_dict(fx, "deit3")
    back = vit.to_timm(vit.from_timm(sd, variant="parity/4", image_size=16))
    assert set(back) == set(sd)
    for name, value in sd.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_head_of_another_class_count_is_left_out(fx):
    params = vit.from_timm(_state_dict(fx, "deit3"), variant="parity/4", image_size=16, num_classes=5)
    assert "head" not in params and "norm" in params


def test_missing_extra_and_misshapen_keys_are_named(fx):
    sd = _state_dict(fx, "deit3")
    with pytest.raises(convert.ConversionError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\]"):
        vit.from_timm({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}, variant="parity/4",
                              image_size=16)
    with pytest.raises(convert.ConversionError, match=r"unexpected keys \['blocks.2.norm1.weight'\]"):
        vit.from_timm({**sd, "blocks.2.norm1.weight": sd["blocks.1.norm1.weight"]}, variant="parity/4",
                              image_size=16)
    with pytest.raises(convert.ConversionError, match="does not fit ViT-S/16"):
        vit.from_timm(sd, variant="S/16", image_size=224)
    with pytest.raises(convert.ConversionError, match=r"does not fit ViT-parity/8: the weights are ViT-parity/4 "
                                                      r"\(width 32, depth 2, patch 4\)"):
        vit.from_timm(sd, variant="parity/8", image_size=16)


@pytest.mark.smoke
def test_weight_files_load_without_pickles(fx, tmp_path):
    from safetensors.numpy import save_file
    sd = _state_dict(fx, "deit3")
    save_file(sd, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **sd)
    for name in ("w.safetensors", "w.npz"):
        loaded = convert.read_weights(str(tmp_path / name))
        assert set(loaded) == set(sd) and np.array_equal(loaded["pos_embed"], sd["pos_embed"])
    np.savez(tmp_path / "pickled.npz", evil=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        convert.read_weights(str(tmp_path / "pickled.npz"))
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(convert.ConversionError, match="Unknown weight format"):
        convert.read_weights(str(tmp_path / "w.ckpt"))


@pytest.mark.smoke
def test_convert_cli_then_init_from_in_the_trainer(fx, tmp_path):
    """timm weights -> `python -m masksub_jax.convert` -> config.init_from: the run starts from them."""
    from safetensors.numpy import save_file

    from masksub_jax import checkpoint, train
    from tests.conftest import tiny_digits_config
    sd = _state_dict(fx, "deit3")
    save_file(sd, str(tmp_path / "deit3.safetensors"))
    convert.main([f"--from={tmp_path / 'deit3.safetensors'}", f"--to={tmp_path / 'init'}", "--variant=parity/4",
                  "--image_size=24"])
    config = tiny_digits_config("/unused", total_steps=1, log_every_steps=1, checkpoint_every_steps=1,
                                init_from=str(tmp_path / "init"),
                                **{"data.source": "synthetic", "data.image_size": 24, "data.mean": (0.5,) * 3,
                                   "data.std": (0.5,) * 3, "model.variant": "parity/4", "optim.lr": 1e-12,
                                   "optim.min_lr": 0.0, "optim.warmup_init_lr": 0.0, "data.num_classes": 7})
    train.run(config, str(tmp_path / "run"))
    trained = checkpoint.load_params(str(tmp_path / "run"))
    want = vit.from_timm(sd, variant="parity/4", image_size=24, num_classes=7)  # pos_embed at 6x6, no head
    for name, value in weights.flatten(want).items():
        np.testing.assert_allclose(weights.flatten(trained)[name], value, atol=1e-6, err_msg=name)
    assert trained["head"]["kernel"].shape == (32, 7)


def test_init_from_another_model_is_a_clear_error(fx, tmp_path):
    params = vit.from_timm(_state_dict(fx, "deit3"), variant="parity/4", image_size=16)
    model = vit.ViT(num_classes=10, variant="mu/4")
    initial = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
    with pytest.raises(convert.ConversionError, match="does not fit the configured model.*blocks_0/attn/qkv/kernel"):
        convert.adapt_params(params, initial)
