"""The robustness evaluation sets (data/robustness.py): ImageNet-A / R on their 200 classes' logits,
ImageNet-C's per-corruption top-1, mean top-1 and mCE, ImageNet-Sketch and the ImageNet-V2 variants;
their spellings in data.extra_evals, the errors for sets not prepared, the evaluate command's table,
and parity with timm's validate.py --valid-labels (tests/fixtures/valid_labels_parity.npz)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from flax import linen as nn

from masksub_jax import cli, convert, evaluate, metrics, sharding, train
from masksub_jax import config as config_lib
from masksub_jax import step as step_lib
from masksub_jax.data import pipeline, robustness, types
from masksub_jax.models import vit
from tests.conftest import mock_imagenet, tiny_digits_config

IMAGENET_NAMES = tfds.builder("imagenet2012").info.features["label"].names
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "valid_labels_parity.npz")
NEW_SETS = ("imagenet_a:test", "imagenet_r:test", "imagenet_sketch:test", "imagenet_v2/matched-frequency:test",
            "imagenet_v2/threshold-0.7:test", "imagenet_v2/topimages:test")


class PixelLogits(nn.Module):
    """Logits = the image's first pixels (with mean 0 and std 1/255 the normalised image is the raw
    one); counts its traces (compilations)."""
    num_classes: int
    traces = [0]

    def __call__(self, images, *, train: bool):
        self.traces[0] += 1
        return images.reshape(images.shape[0], -1)[:, :self.num_classes]


class Batches:
    """An eval source of given batches."""

    def __init__(self, *batches, num_classes=1000):
        self.batches, self.num_classes = batches, num_classes
        self.num_eval_examples = int(sum(b["mask"].sum() for b in batches))

    def eval_batches(self):
        yield from self.batches


def _pixel_config():
    return tiny_digits_config("/unused", **{"data.mean": (0.0,), "data.std": (1 / 255,)})


def _batch(logits: np.ndarray, labels, real: int | None = None) -> dict:
    """A batch whose PixelLogits are `logits` (uint8 values), padded to 8 examples."""
    n = len(labels)
    image = np.zeros((8, 1, logits.shape[1], 1), np.uint8)
    image[:n, 0, :, 0] = logits
    label = np.zeros(8, np.int32)
    label[:n] = labels
    return {"image": image, "label": label, "mask": (np.arange(8) < (n if real is None else real)).astype(np.float32)}


def _evaluator(source, model=None):
    mesh = sharding.make_mesh(1)
    return evaluate.make_evaluator(_pixel_config(), model or PixelLogits(1000), source, mesh,
                                   sharding.replicated(mesh))


# ------------------------------------------------------------------------------------------------------
# Constructed batches with a known answer


def test_a_model_that_predicts_class_k_scores_exactly_the_examples_of_k():
    k = 7
    logits = np.zeros((6, 1000), np.uint8)
    logits[:, k], logits[:, 100:104] = 200, 50  # its top-5: k and 100-103
    labels = [7, 3, 7, 7, 999, 101]
    result = _evaluator(Batches(_batch(logits, labels)))({})
    assert result == {"top1": 3 / 6, "top5": 4 / 6, "eval_examples": 6}


@pytest.mark.parametrize("name", robustness.SUBSET_SETS)
def test_the_200_class_restriction_scores_the_best_of_the_sets_logits_as_hendrycks_eval_does(name):
    classes = robustness.class_subset(name, IMAGENET_NAMES)
    outside = [i for i in range(1000) if i not in classes]
    logits = np.zeros((4, 1000), np.uint8)
    labels = [classes[5], classes[7], classes[9], classes[3]]
    logits[0, [outside[0], classes[5]]] = 250, 200                      # best of the 200: right
    logits[1, [classes[0], classes[1], classes[7]]] = 250, 240, 230     # third of the 200: top-5 only
    logits[2, classes[10:16]] = 250                                     # sixth or lower of the 200
    logits[2, classes[9]] = 100
    logits[3, outside[:6]] = 250                                        # six others above it, none of the 200
    logits[3, classes[3]] = 100
    batch = _batch(logits, labels)
    restricted = _evaluator(robustness.ClassSubset(Batches(batch), classes))({})
    assert restricted == {"top1": 2 / 4, "top5": 3 / 4, "eval_examples": 4}
    assert _evaluator(Batches(batch))({}) == {"top1": 0.0, "top5": 2 / 4, "eval_examples": 4}  # all 1000 logits
    # Hendrycks' eval.py: argmax of output[:, indices_in_1k] against the label's position in the 200
    picked = np.argmax(logits[:, list(classes)], axis=1)
    assert np.mean(picked == [list(classes).index(label) for label in labels]) == restricted["top1"]


def test_mce_of_a_model_with_alexnets_errors_is_100_and_a_model_with_half_of_them_50():
    def results(error_scale, severities=robustness.SEVERITIES, corruptions=robustness.BENCHMARK_CORRUPTIONS):
        return {(c, s): {"top1": 1 - error_scale * robustness.ALEXNET_ERRORS.get(c, 0.5), "eval_examples": 10}
                for c in corruptions for s in severities}
    alexnet = robustness.corruption_summary(results(1.0))
    assert alexnet["mce"] == pytest.approx(100, abs=1e-9) and alexnet["eval_examples"] == 750
    assert alexnet["fog/top1"] == pytest.approx(1 - 0.819324)
    assert alexnet["top1"] == pytest.approx(1 - np.mean(list(robustness.ALEXNET_ERRORS.values())))
    assert robustness.corruption_summary(results(0.5))["mce"] == pytest.approx(50)
    # with the four held-out corruptions too: they are reported, and left out of mCE
    extra = robustness.corruption_summary(results(1.0, corruptions=robustness.BENCHMARK_CORRUPTIONS
                                                  + robustness.EXTRA_CORRUPTIONS))
    assert extra["mce"] == pytest.approx(100) and extra["saturate/top1"] == 0.5
    # the published normalisers are means over 5 severities: fewer severities or corruptions, no mCE
    assert "mce" not in robustness.corruption_summary(results(1.0, severities=(1, 2, 3)))
    assert "mce" not in robustness.corruption_summary(results(1.0, corruptions=("fog", "snow")))


def test_imagenet_c_evaluates_every_corruption_and_severity_with_one_compilation():
    """75 parts; corruption c at severity s: the model is right on (c_index + s) % 4 of 4 examples."""
    logits = np.zeros((4, 1000), np.uint8)
    logits[:, 1] = 200  # predicts class 1
    parts, want = {}, {}
    for ci, c in enumerate(robustness.BENCHMARK_CORRUPTIONS):
        for s in robustness.SEVERITIES:
            right = (ci + s) % 4
            parts[c, s] = Batches(_batch(logits, [1] * right + [0] * (4 - right)))
            want.setdefault(c, []).append(right / 4)
    PixelLogits.traces[0] = 0
    result = _evaluator(robustness.CorruptionSuite(parts))({})
    assert PixelLogits.traces[0] == 1
    for c, top1 in want.items():
        assert result[f"{c}/top1"] == pytest.approx(np.mean(top1))
    assert result["top1"] == pytest.approx(np.mean([np.mean(v) for v in want.values()]))
    # Hendrycks & Dietterich: CE_c = sum_s E_{s,c} / sum_s E_{s,c}^AlexNet, mCE its mean over c
    ce = [np.sum(1 - np.array(want[c])) / (5 * robustness.ALEXNET_ERRORS[c]) for c in want]
    assert result["mce"] == pytest.approx(100 * np.mean(ce)) and result["eval_examples"] == 300


def test_imagenet_c_lands_in_metrics_jsonl_as_eval_set_corruption_top1_and_mce(tmp_path):
    """The trainer's path: make_evaluations, then train's eval scalars, then metrics.jsonl."""
    logits = np.zeros((4, 1000), np.uint8)
    logits[:, 1] = 200
    parts = {(c, s): Batches(_batch(logits, [1, 1, 0, 0])) for c in robustness.BENCHMARK_CORRUPTIONS
             for s in robustness.SEVERITIES}
    sources = {"": Batches(_batch(logits, [1, 0, 0, 0])), "imagenet2012_corrupted": robustness.CorruptionSuite(parts)}
    mesh = sharding.make_mesh(1)
    said = []
    result = evaluate.make_evaluations(_pixel_config(), PixelLogits(1000), sources, mesh, sharding.replicated(mesh),
                                       ema=False, say=said.append)({})
    assert said == ["evaluating 4 examples...", "evaluating 300 examples (imagenet2012_corrupted)..."]
    writer = metrics.JsonlWriter(str(tmp_path / "metrics.jsonl"))
    writer.write_scalars(10, train._eval_scalars(result))
    writer.flush()
    logged = metrics.read_history(str(tmp_path))[0]
    assert logged["eval/top1"] == 0.25 and logged["eval/imagenet2012_corrupted/fog/top1"] == 0.5
    assert logged["eval/imagenet2012_corrupted/top1"] == 0.5
    assert logged["eval/imagenet2012_corrupted/mce"] == pytest.approx(
        100 * np.mean([0.5 / e for e in robustness.ALEXNET_ERRORS.values()]))
    assert "eval/imagenet2012_corrupted/eval_examples" not in logged


def test_the_markdown_table_has_a_row_per_set_and_dashes_where_a_figure_is_not_defined():
    results = {"top1": 0.8, "top5": 0.95, "eval_examples": 10, "imagenet2012_real/top1": 0.85,
               "imagenet2012_real/eval_examples": 9, "imagenet2012_corrupted/fog/top1": 0.5,
               "imagenet2012_corrupted/top1": 0.6, "imagenet2012_corrupted/mce": 61.234,
               "imagenet2012_corrupted/eval_examples": 750, "ema/top1": 0.81, "ema/top5": 0.96, "ema/eval_examples": 10}
    assert evaluate.table(results, "inits/deit3_b", "imagenet2012:validation") == "\n".join([
        "| model | set | top-1 | top-5 | mCE |",
        "|---|---|---:|---:|---:|",
        "| inits/deit3_b | imagenet2012:validation | 80.00 | 95.00 | - |",
        "| inits/deit3_b | imagenet2012_real | 85.00 | - | - |",
        "| inits/deit3_b | imagenet2012_corrupted | 60.00 | - | 61.23 |",
        "| inits/deit3_b (EMA) | imagenet2012:validation | 81.00 | 96.00 | - |"])


# ------------------------------------------------------------------------------------------------------
# Class lists, spellings, missing sets


@pytest.mark.parametrize("name", robustness.SUBSET_SETS)
def test_the_shipped_class_lists_are_200_imagenet_classes_named_as_the_data_set_names_them(name):
    label_names = tfds.builder(name).info.features["label"].names
    assert label_names == IMAGENET_NAMES  # TFDS labels these sets in ImageNet-1k's label space
    classes = robustness.class_subset(name, label_names)
    assert len(set(classes)) == 200 and list(classes) == sorted(classes)
    swapped = list(label_names)
    swapped[classes[3]], swapped[classes[3] + 1] = swapped[classes[3] + 1], swapped[classes[3]]
    with pytest.raises(ValueError, match=rf"class {classes[3]} is '{swapped[classes[3]]}' in the data set, "
                                         rf"'{label_names[classes[3]]}' in masksub_jax/data/{name}_classes.txt"):
        robustness.class_subset(name, swapped)


def test_imagenet_c_spellings_choose_corruptions_and_severities_and_mistakes_are_named():
    assert robustness.parse_corrupted("imagenet2012_corrupted") == (robustness.BENCHMARK_CORRUPTIONS, (1, 2, 3, 4, 5))
    assert robustness.parse_corrupted("imagenet2012_corrupted/fog,saturate") == (("fog", "saturate"), (1, 2, 3, 4, 5))
    assert robustness.parse_corrupted("imagenet2012_corrupted/gaussian_noise,shot_noise/3") == (
        ("gaussian_noise", "shot_noise"), (3,))
    assert robustness.parse_corrupted("imagenet2012_corrupted/all/1,5") == (robustness.BENCHMARK_CORRUPTIONS, (1, 5))
    assert robustness.parse_corrupted("imagenet2012_corrupted/elastic_transform_2") == (("elastic_transform",), (2,))
    for kind, message in [("imagenet2012_corrupted/fogg", "'fogg' is not a corruption named once; choose from "
                           "gaussian_noise, "), ("imagenet2012_corrupted/fog/6", "severities are '6'; give each of "
                           "1-5 once"), ("imagenet2012_corrupted/fog/1/2", "give 'imagenet2012_corrupted', ")]:
        c = tiny_digits_config("/unused", **{"data.extra_evals": ("imagenet_v2:test", f"{kind}:validation")})
        with pytest.raises(ValueError, match=f"data.extra_evals names ImageNet-C as '{kind}': {message}"):
            pipeline.make_extra_evals(c, [str(i) for i in range(10)])  # before anything is read


def test_every_robustness_set_missing_is_named_with_how_to_prepare_it(tmp_path):
    data_dir = str(tmp_path / "tfds")
    c = tiny_digits_config(data_dir, **{"data.extra_evals": (*NEW_SETS, "imagenet2012_corrupted:validation")})
    with pytest.raises(types.DataNotFoundError) as error:
        pipeline.make_extra_evals(c, IMAGENET_NAMES)
    message = str(error.value)
    assert message.startswith("7 extra eval sets are not prepared: (1) TFDS data set 'imagenet_a' is not prepared")
    for name in ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2/matched-frequency",
                 "imagenet_v2/threshold-0.7", "imagenet_v2/topimages"):
        assert f"python -m masksub_jax.data.prepare --name={name} --data_dir={data_dir}`" in message
    assert (f"(7) ImageNet-C (imagenet2012_corrupted): 75 of its 75 TFDS configs are not prepared in data.data_dir="
            f"'{data_dir}' (imagenet2012_corrupted/gaussian_noise_1, imagenet2012_corrupted/gaussian_noise_2, "
            f"imagenet2012_corrupted/gaussian_noise_3 and 72 more). TFDS makes them from ImageNet's validation "
            f"images: put ILSVRC2012_img_val.tar in {data_dir}/downloads/manual") in message
    assert "for c in gaussian_noise_1 gaussian_noise_2 gaussian_noise_3 gaussian_noise_4 gaussian_noise_5 " in message
    assert (f"jpeg_compression_5; do python -m masksub_jax.data.prepare --name=imagenet2012_corrupted/$c "
            f"--data_dir={data_dir}; done`" in message)


# ------------------------------------------------------------------------------------------------------
# Mock data (tfds.testing.mock_data: random images, the real metadata)


def _imagenet_config(**overrides):
    c = config_lib.base()
    c.data.image_size, c.model.variant, c.batch_size, c.eval_batch_size = 16, "mu/8", 2, 8
    return config_lib.override(c, overrides)


def test_each_spelling_makes_its_set_with_its_protocol_on_mock_data():
    c = _imagenet_config(**{"data.extra_evals": (*NEW_SETS, "imagenet2012_corrupted:validation"),
                            "data.crop_ratio": 0.875})
    with mock_imagenet(num_examples=2):
        sources = pipeline.make_extra_evals(c, IMAGENET_NAMES, batch_multiple=8)
        subset = pipeline.make_extra_evals(_imagenet_config(**{"data.extra_evals": (
            "imagenet2012_corrupted/gaussian_noise,saturate/2,5:validation",)}), IMAGENET_NAMES, batch_multiple=8)
    assert list(sources) == ["imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2/matched-frequency",
                             "imagenet_v2/threshold-0.7", "imagenet_v2/topimages", "imagenet2012_corrupted"]
    for name in robustness.SUBSET_SETS:
        assert sources[name].classes == tuple(index for index, _ in robustness.class_list(name))
    suite = sources["imagenet2012_corrupted"]
    assert list(suite.parts) == [(c, s) for c in robustness.BENCHMARK_CORRUPTIONS for s in range(1, 6)]
    assert suite.num_eval_examples == 150 and suite.num_classes == 1000
    # ImageNet-C's images are already 224 px centre crops: never cropped again by the recipe's crop ratio.
    assert c.data.crop_ratio == 0.875 and {part.config.data.crop_ratio for part in suite.parts.values()} == {1.0}
    assert list(subset["imagenet2012_corrupted"].parts) == [("gaussian_noise", 2), ("gaussian_noise", 5),
                                                            ("saturate", 2), ("saturate", 5)]


def test_the_evaluate_command_runs_every_robustness_set_on_mock_data_and_prints_one_table(tmp_path, capsys):
    """python -m masksub_jax.evaluate --config=configs/vit_b.py --init_from=... with every new set
    (ImageNet-C: two corruptions at one severity; all 75 parts in the tests above), its flags parsed
    as the command parses them, on mock_data."""
    overrides = {"model.variant": "mu/8", "data.image_size": 16, "batch_size": 4, "eval_batch_size": 8}
    c = config_lib.override(config_lib.base(), overrides)
    model = step_lib.make_model(c, 1000)
    convert.save_variables(jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))),
                           str(tmp_path / "init"))
    sets = (*NEW_SETS, "imagenet2012_corrupted/gaussian_noise,fog/5:validation")
    argv = ["evaluate", cli.resolve_config_arg("--config=configs/vit_b.py"), f"--init_from={tmp_path / 'init'}",
            *(f"--config.{k}={v}" for k, v in overrides.items()), f"--config.data.extra_evals={sets!r}"]
    command = flags.FlagValues()
    evaluate._define_flags(command, argv)
    command(argv)
    with mock_imagenet(num_examples=4):
        evaluate._evaluate_command(command)
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("| model | set | top-1 | top-5 |"):]
    assert table[1] == "|---|---|---:|---:|"
    rows = [row.split(" | ") for row in table[2:]]
    assert [row[1] for row in rows] == ["imagenet2012:validation", "imagenet_a", "imagenet_r", "imagenet_sketch",
                                        "imagenet_v2/matched-frequency", "imagenet_v2/threshold-0.7",
                                        "imagenet_v2/topimages", "imagenet2012_corrupted"]
    assert all(row[0] == f"| {tmp_path / 'init'}" for row in rows)
    assert all(0 <= float(row[2]) <= 100 for row in rows) and rows[-1][3] == "- |"
    described = next(line for line in lines if line.startswith("top1 "))
    for part in ("imagenet_a top1 ", "imagenet_v2/topimages top1 ", "imagenet2012_corrupted/gaussian_noise top1 ",
                 "imagenet2012_corrupted/fog top1 ", "imagenet2012_corrupted top1 "):
        assert part in described
    assert "mce" not in described  # two corruptions: no mCE


# ------------------------------------------------------------------------------------------------------
# Parity with timm's validate.py --valid-labels


@pytest.mark.parametrize("name", robustness.SUBSET_SETS)
def test_a_timm_checkpoint_scores_as_timms_validate_with_valid_labels(name, monkeypatch):
    monkeypatch.setitem(vit.VARIANTS, "parity", (32, 2, 2))  # the fixture's timm model
    with np.load(FIXTURE, allow_pickle=False) as data:
        fx = {k: data[k] for k in data.files}
    params = vit.from_timm({k[len("model/"):]: v for k, v in fx.items() if k.startswith("model/")},
                           variant="parity/8", image_size=16)
    model = vit.ViT(num_classes=1000, variant="parity/8")
    classes = robustness.class_subset(name, tfds.builder(name).info.features["label"].names)
    labels = np.array([IMAGENET_NAMES.index(wnid) for wnid in fx[f"{name}/wnids"]], np.int32)
    images = fx["images"]
    c = config_lib.base()  # ImageNet's mean and std, as the fixture's loader
    mesh = sharding.make_mesh(1)
    source = robustness.ClassSubset(Batches(*[
        {"image": images[i:i + 8], "label": labels[i:i + 8], "mask": np.ones(8, np.float32)}
        for i in range(0, len(images), 8)]), classes)
    result = evaluate.make_evaluator(c, model, source, mesh, sharding.replicated(mesh))({"params": params})
    assert result == {"top1": pytest.approx(fx[f"{name}/top1"] / 100, abs=1e-12),
                      "top5": pytest.approx(fx[f"{name}/top5"] / 100, abs=1e-12), "eval_examples": len(images)}
    assert 0 < result["top1"] < result["top5"] < 1  # the fixture's labels: neither all right nor all wrong
    logits = np.asarray(evaluate.RestrictedLogits(model, classes, 1000).apply(
        {"params": params}, step_lib.normaliser(c)(images), train=False))
    assert np.all(np.isneginf(np.delete(logits, classes, axis=1)))
    kept, theirs = logits[:, list(classes)], fx[f"{name}/logits"]
    assert np.linalg.norm(kept - theirs) / np.linalg.norm(theirs) < 1e-5
