"""Config validation: every bad value is named with its fix, before anything is compiled."""

import ml_collections
import pytest

from masksub_jax import config as config_lib
from masksub_jax import configs, train
from masksub_jax.data import pipeline, types
from tests.conftest import tiny_digits_config


@pytest.mark.parametrize("name,variant,size,lr,wd,drop_path", [
    ("vit_s", "S/16", 224, 4e-3, 0.03, 0.0), ("vit_b", "B/16", 192, 3e-3, 0.03, 0.1),
    ("vit_l", "L/16", 192, 3e-3, 0.03, 0.4), ("vit_h", "H/14", 154, 3e-3, 0.03, 0.5)])
def test_shipped_imagenet_configs_carry_the_400_epoch_recipe(name, variant, size, lr, wd, drop_path):
    c = configs.get(name)
    config_lib.validate(c, num_devices=8)
    assert (c.model.variant, c.data.image_size, c.optim.lr) == (variant, size, lr)
    assert (c.optim.weight_decay, c.model.drop_path, c.total_epochs) == (wd, drop_path, 400)
    assert (c.optim.name, c.loss, c.batch_size, c.masksub.mode, c.masksub.ratio) == \
        ("lamb", "bce", 2048, "masking", 0.5)
    assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.data.crop_ratio) == (0.8, 1.0, 1.0)


def test_800_epoch_argument_and_unknown_arguments():
    c = configs.get("vit_b", "epochs=800")
    assert (c.total_epochs, c.optim.weight_decay, c.model.drop_path) == (800, 0.05, 0.2)
    with pytest.raises(ValueError, match="epochs=300 has no published recipe"):
        configs.get("vit_b", "epochs=300")
    with pytest.raises(ValueError, match="Unknown config argument 'epoch'"):
        configs.get("vit_b", "epoch=800")
    with pytest.raises(ValueError, match="Unknown config argument 'epochs'.*this config takes none"):
        configs.get("digits", "epochs=800")


def test_digits_config_is_valid():
    config_lib.validate(configs.get("digits"), num_devices=8)


@pytest.mark.parametrize("key,value,message", [
    ("masksub.ratio", 1.0, "masksub.ratio=1.0 is invalid: must be in \\[0, 1\\)"),
    ("masksub.ratio", -0.1, "masksub.ratio=-0.1 is invalid"),
    ("masksub.mode", "mask", "masksub.mode='mask' is invalid: use one of"),
    ("data.image_size", 9, "data.image_size=9 is invalid: must be a positive multiple of the patch size 2"),
    ("batch_size", 12, "batch_size=12 is invalid: must be a positive multiple of the device count 8"),
    ("model.variant", "XL/16", "Unknown ViT variant 'XL/16'"),
    ("label_smoothing", 0.1, "label_smoothing=0.1 is invalid: BCE binarises"),
    ("optim.lr", "fast", "Config key 'optim.lr' must be float, got 'fast'"),
    ("model.remat", 1, "Config key 'model.remat' must be bool"),
])
def test_bad_values_are_named(key, value, message):
    raw = tiny_digits_config("/nonexistent", loss="bce", label_smoothing=0.0).to_dict()
    section, _, name = key.rpartition(".")
    (raw[section] if section else raw)[name] = value
    c = ml_collections.ConfigDict(raw)  # as a notebook might build it: no ConfigDict type safety
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c, num_devices=8)


def test_unknown_key_is_named():
    c = tiny_digits_config("/nonexistent")
    with c.unlocked():
        c.model.widht = 3
    with pytest.raises(ValueError, match="Unknown config key 'model.widht'.* Known keys here: .*'model.variant'"):
        config_lib.validate(c)


def test_train_rejects_bad_config_before_touching_the_workdir(tmp_path):
    c = tiny_digits_config("/nonexistent", **{"masksub.ratio": 1.5})
    with pytest.raises(ValueError, match="masksub.ratio"):
        train.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_missing_tfds_data_set_says_how_to_prepare_it(tmp_path):
    c = tiny_digits_config(str(tmp_path), **{"data.source": "tfds", "data.name": "imagenet2012",
                                             "data.image_size": 32, "data.mean": (0.5,) * 3, "data.std": (0.5,) * 3})
    with pytest.raises(types.DataNotFoundError, match="python -m masksub_jax.data.prepare --name=imagenet2012 "):
        pipeline.make(c)


def test_unknown_tfds_name(tmp_path):
    c = tiny_digits_config("/nonexistent", **{"data.source": "tfds", "data.name": "imagenet2013"})
    with pytest.raises(types.DataNotFoundError, match="data.data_dir='/nonexistent' does not exist; give"):
        pipeline.make(c)
    (tmp_path / "my_imgs").mkdir()
    c.data.data_dir = str(tmp_path)
    with pytest.raises(types.DataNotFoundError, match=r"'imagenet2013' is neither in data.data_dir=.* \(it holds "
                                                      r"\[.my_imgs.\]\) nor in the TFDS catalogue"):
        pipeline.make(c)
    c.data.data_dir = None
    with pytest.raises(types.DataNotFoundError, match="'imagenet2013' is not a TFDS data set"):
        pipeline.make(c)
