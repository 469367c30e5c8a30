"""configs/transfer.py: DeiT's transfer protocol with MaskSub, per data set, from weights you have."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from masksub_jax import config as config_lib
from masksub_jax import configs, convert, evaluate, train
from masksub_jax import step as step_lib
from masksub_jax.configs import transfer
from masksub_jax.data import pipeline
from tests.conftest import mock_imagenet

# dataset= -> (source, TFDS name, train split, eval split, image size, lr, epochs, random erasing)
EXPECTED = {
    "cifar10": ("tfds", "cifar10", "train", "test", 224, 7.5e-6, 1000, 0.0),
    "cifar100": ("tfds", "cifar100", "train", "test", 224, 5e-6, 1000, 0.0),
    "oxford_flowers102": ("tfds", "oxford_flowers102", "train+validation", "test", 224, 5e-6, 1000, 0.0),
    "cars196": ("tfds", "cars196", "train", "test", 224, 5e-6, 1000, 0.0),
    "oxford_iiit_pet": ("tfds", "oxford_iiit_pet", "train", "test", 224, 5e-6, 1000, 0.0),
    "i_naturalist2018": ("tfds", "i_naturalist2018", "train", "validation", 224, 7.5e-5, 360, 0.1),
    "i_naturalist2019": ("folder", None, "train", "val", 224, 7.5e-5, 360, 0.1),
    "folder": ("folder", None, "train", "val", 224, 5e-6, 1000, 0.0),
    "digits": ("digits", None, "train", None, 8, 1e-3, 30, 0.0),
}


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_every_data_set_gives_a_valid_config_with_its_splits_and_recipe(dataset):
    source, name, train_split, eval_split, size, lr, epochs, erasing = EXPECTED[dataset]
    folder = {"data.folder": "/data/mine"} if source == "folder" else {}
    c = configs.get("transfer", f"dataset={dataset}", **folder)
    config_lib.validate(c, num_devices=None)
    assert (c.data.source, c.data.train_split, c.data.image_size) == (source, train_split, size)
    assert (c.data.name, c.data.eval_split) == (name or c.data.name, eval_split or c.data.eval_split)
    assert (c.optim.lr, c.total_epochs, c.data.random_erasing) == (lr, epochs, erasing)
    assert (c.masksub.mode, c.masksub.ratio, c.optim.name) == ("masking", 0.5, "adamw")
    assert c.model.variant == ("mu/2" if dataset == "digits" else "B/16") and c.init_from is None
    if dataset != "digits":  # DeiT's transfer protocol
        assert (c.batch_size, c.optim.weight_decay, c.data.augment, c.data.repeated_aug, c.data.crop_ratio) == (
            768, 0.05, "rand-m9-mstd0.5-inc1", 3, 0.875)
        assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.label_smoothing, c.model.drop_path) == (0.8, 1.0, 0.1, 0.1)
    runs = 10 if dataset in transfer.TRAIN_EXAMPLES else None  # evaluations per run
    if runs:
        steps = c.total_epochs * (transfer.TRAIN_EXAMPLES[dataset] // c.batch_size)
        assert steps / runs <= c.eval_every_steps < steps / runs + 1


def test_an_unknown_data_set_is_one_line_naming_the_known_ones():
    with pytest.raises(ValueError) as e:
        configs.get("transfer", "dataset=cifar")
    message = str(e.value)
    assert "\n" not in message and message.startswith("Unknown data set dataset='cifar'; use one of")
    assert all(name in message for name in EXPECTED)
    with pytest.raises(ValueError, match="Unknown config argument 'epochs'"):
        configs.get("transfer", "dataset=digits,epochs=3")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random weights of a ViT-mu/4 with MAE's pool and no LayerScale for 8x8 grey images, a head of
    10 classes, written as `python -m masksub_jax.convert` writes them: the model is not the
    config's default (mu/2, cls token, LayerScale), so the config must have read it."""
    c = config_lib.override(config_lib.base(), {"model.variant": "mu/4", "model.pool": "avg",
                                                "model.layerscale_init": 0.0})
    shapes = jax.eval_shape(step_lib.make_model(c, 10).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    directory = str(tmp_path_factory.mktemp("inits") / "vit_mu4")
    convert.save_variables(variables, directory, family="vit", variant="mu/4", image_size=8,
                           config={"model.layerscale_init": 0.0, "model.pool": "avg"})  # as vit.detect says
    return directory


def test_the_model_is_read_from_the_converted_weights_and_named_keys_override_it(converted):
    c = configs.get("transfer", f"dataset=cifar100,init_from={converted}")
    assert (c.init_from, c.model.family, c.model.variant, c.model.pool, c.model.layerscale_init) == (
        converted, "vit", "mu/4", "avg", 0.0)
    assert c.data.image_size == 224  # the protocol's size; pos_embed is resampled
    assert configs.get("transfer", f"dataset=cifar100,init_from={converted}", **{"model.pool": "token"}).model.pool \
        == "token"
    with pytest.raises(ValueError, match="holds a vit mu/4 model .* --config.model.variant=mu/4"):
        config_lib.validate(configs.get("transfer", f"dataset=cifar100,init_from={converted},variant=S/16"),
                            num_devices=None)


def test_fine_tuning_converted_weights_on_digits_raises_their_accuracy(digits_dir, tmp_path, capsys):
    """A real fine-tune through the trainer from converted weights: the family they record is the one
    trained, they are the start (their head has the 10 classes), and the accuracy rises well above it.
    tests/tiny_family.py's linear model: a ViT's MaskSub train step takes 4x as long to compile (the
    ViT's recorded model is the test above's)."""
    rng = np.random.default_rng(0)
    initial = {"params": {"classifier": {"kernel": (0.02 * rng.standard_normal((64, 10))).astype(np.float32),
                                         "bias": np.zeros(10, np.float32)}}}
    converted = str(tmp_path / "inits" / "linear")
    convert.save_variables(initial, converted, family="tests.tiny_family")
    c = configs.get("transfer", f"dataset=digits,init_from={converted}", **{
        "data.data_dir": digits_dir, "total_steps": 40, "optim.lr": 3e-3, "optim.warmup_epochs": 0.0,
        "eval_every_steps": 0, "checkpoint_every_steps": 40})
    assert c.model.family == "tests.tiny_family"
    start = evaluate.evaluate(c, convert.read_variables(converted))["top1"]  # they fit: no head to replace
    summary = train.run(c, str(tmp_path / "run"))
    assert f"Initialised the params from {converted}." in capsys.readouterr().out
    assert summary["step"] == 40 and summary["top1"] >= start + 0.4, (start, summary["top1"])
    # The run's workdir as the next start: its config.json names the model.
    assert transfer.recorded_model(str(tmp_path / "run")) == {
        "model.family": "tests.tiny_family", "model.variant": "mu/2", "model.pool": "token",
        "model.layerscale_init": 1e-4, "model.pre_norm": False, "model.act": "gelu", "model.norm_eps": 1e-6}


def test_cifar100_is_read_with_its_100_classes_and_upsampled_to_the_recipes_224_px():
    """TFDS's mock CIFAR-100 (32 px images, 100 classes) through the recipe's input pipeline: the
    classes are read from the data (the trainer's head is data.num_classes wide, tests/test_train.py),
    and the 32 px images are upsampled by random-resized-crop and the eval resize + crop. crop_flip,
    not the recipe's RandAugment, whose tf.data graph takes 15 s to build here."""
    with mock_imagenet(num_examples=24):
        data = pipeline.make(configs.get("transfer", "dataset=cifar100", **{"data.augment": "crop_flip",
                                                                            "batch_size": 8, "eval_batch_size": 8}))
        assert tfds.builder("cifar100").info.features["image"].shape == (32, 32, 3)  # what is stored
        shapes = next(data.train_batches())["image"].shape, next(data.eval_batches())["image"].shape
    assert data.num_classes == 100 and data.num_eval_examples == 24
    assert shapes == ((8, 224, 224, 3), (8, 224, 224, 3))


def test_an_unprepared_tfds_set_stops_the_run_before_compiling_naming_the_prepare_command(converted, tmp_path,
                                                                                          capsys):
    c = configs.get("transfer", f"dataset=cifar100,init_from={converted}",
                    **{"data.data_dir": str(tmp_path / "tfds")})
    (tmp_path / "tfds").mkdir()
    with pytest.raises(FileNotFoundError) as e:  # data.types.DataNotFoundError
        train.run(c, str(tmp_path / "w"))
    assert str(e.value).startswith(
        f"TFDS data set 'cifar100' is not prepared in data.data_dir='{tmp_path}/tfds'. Prepare it once with "
        f"`python -m masksub_jax.data.prepare --name=cifar100 --data_dir={tmp_path}/tfds`. "), e.value
    assert "compiling" not in capsys.readouterr().out
