"""Feature probes (probes.py): the closed-form ridge against independent solves, the held-out choice
of the ridge term, big_vision's draws, DINO's weighted kNN on features with a known answer, the
classifier's input as the features, probes on digits and an image folder, and the trainer's and
evaluate's results."""
import json
import os

import jax
import numpy as np
import pytest
from sklearn.linear_model import Ridge

from masksub_jax import config as config_lib
from masksub_jax import evaluate, models, probes, sharding, train
from masksub_jax import step as step_lib
from tests.conftest import tiny_digits_config


def _independent_design(x_fit, x):
    """big_vision's whitening and bias feature, written out again."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-5
    return np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])


@pytest.mark.parametrize("n", [30, 200])  # fewer examples than dimensions (X X^T), and more (X^T X)
def test_ridge_equals_an_independent_least_squares_solve(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 48)) * rng.uniform(0.1, 10, 48) + rng.normal(size=48)
    labels = np.arange(n) % 7
    test = rng.normal(size=(50, 48))
    cache = probes.ridge_cache(x.astype(np.float32), labels, 7)
    design, targets = _independent_design(x.astype(np.float32).astype(np.float64), x), 2.0 * np.eye(7)[labels] - 1
    for l2 in (2.0**-4, 1.0, 2.0**10, 2.0**20):
        ours = probes.ridge_weights(cache, l2)
        stacked = np.vstack([design, np.sqrt(l2) * np.eye(49)])
        theirs = np.linalg.lstsq(stacked, np.vstack([targets, np.zeros((49, 7))]), rcond=None)[0]
        sklearn = Ridge(alpha=l2, fit_intercept=False, solver="svd").fit(design, targets).coef_.T
        for reference in (theirs, sklearn):
            np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
        scores = _independent_design(x.astype(np.float32).astype(np.float64), test) @ theirs
        right = np.mean(np.argmax(scores, 1) == np.arange(50) % 7)
        assert probes.ridge_accuracies(cache, test, np.arange(50) % 7, [l2])[0] == right


def test_the_ridge_term_is_the_best_on_held_out_examples_ties_by_squared_error():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32)) * 2
    labels = np.arange(40) % 5
    x = centres[labels] + rng.normal(size=(40, 32)) * 3
    held_labels = np.arange(20) % 5
    held = centres[held_labels] + rng.normal(size=(20, 32)) * 3
    grid = tuple(2.0**k for k in range(-10, 21, 2))
    cache = probes.ridge_cache(x, labels, 5)
    design = _independent_design(x, x)
    ranking = []
    for l2 in grid:
        w = np.linalg.solve(design.T @ design + l2 * np.eye(33), design.T @ (2.0 * np.eye(5)[labels] - 1))
        scores = _independent_design(x, held) @ w
        error = np.mean((scores - (2.0 * np.eye(5)[held_labels] - 1)) ** 2)
        ranking.append((-np.mean(np.argmax(scores, 1) == held_labels), error, l2))
    assert len({r[0] for r in ranking}) > 1 and len([r for r in ranking if r[0] == min(ranking)[0]]) > 1  # ties
    assert probes.choose_l2(cache, held, held_labels, grid) == min(ranking)[2]
    assert probes.choose_l2(cache, held, held_labels, (3.0,)) == 3.0
    assert probes.choose_l2(cache, held[:0], held_labels[:0], grid) == 2.0**10  # nothing held out: big_vision's


def test_shots_are_big_visions_draws_and_never_held_out():
    labels = np.repeat(np.arange(4), [12, 30, 3, 1])
    for seed in range(3):
        rng = np.random.default_rng(seed)  # big_vision fewshot_lsr.py compute_fewshot_metrics
        theirs = [rng.permutation(np.where(labels == c)[0]) for c in range(4)]
        pools, held = probes._draw(labels, 4, seed, heldout_per_class=5)
        for pool, order in zip(pools, theirs):
            np.testing.assert_array_equal(pool, order[:len(pool)])  # shots K: big_vision's first K
            assert len(pool) == max(len(order) - 5, 1 if len(order) else 0)
        assert not set(held) & set(np.concatenate(pools))
        assert sorted(held) == sorted(np.concatenate([order[max(len(order) - 5, 1):] for order in theirs]))


def test_weighted_knn_lets_a_close_neighbour_outvote_two_far_ones():
    """Each test point has one very close training neighbour of its class and two farther ones of
    another: DINO's exp(sim / T) votes pick the close one (majority voting would not)."""
    train_x, train_y, test_x, test_y = [], [], [], []
    for i, (own, other) in enumerate([(0, 1), (1, 2), (2, 0)]):
        base = 100 * i
        train_x += [5.0 * np.array([np.cos(np.deg2rad(base + d)), np.sin(np.deg2rad(base + d))]) for d in (1, 25, -25)]
        train_y += [own, other, other]
        test_x.append(0.5 * np.array([np.cos(np.deg2rad(base)), np.sin(np.deg2rad(base))]))  # length does not count
        test_y.append(own)
    train_y, test_y = np.array(train_y), np.array(test_y)
    assert probes.knn(train_x, train_y, test_x, test_y, 3, k=3, temperature=0.07) == 1.0
    assert probes.knn(train_x, train_y, test_x, test_y, 3, k=3, temperature=1e3) == 0.0  # ~ majority vote
    assert probes.knn(train_x, train_y, test_x, test_y, 3, k=1, temperature=1e3) == 1.0


def test_set_specs_parse_and_bad_ones_are_refused_by_the_config():
    assert probes.parse_set("cifar100") == probes.SetSpec("cifar100", "tfds", "cifar100", "train", "test")
    assert probes.parse_set("imagenet2012:train[:65000]:validation").train_split == "train[:65000]"
    assert probes.parse_set("cars196:2.1.0:train:test") == probes.SetSpec("cars196", "tfds", "cars196:2.1.0",
                                                                           "train", "test")
    assert probes.parse_set("cars196:2.1.0").where == "cars196:2.1.0"
    assert probes.parse_set("folder:gs://b/pets/") == probes.SetSpec("pets", "folder", "gs://b/pets", "train", "test")
    assert probes.parse_set("folder:/d/pets:tr:val") == probes.SetSpec("pets", "folder", "/d/pets", "tr", "val")
    c = tiny_digits_config("/unused", **{"probes.fewshot": ("cifar100:train",)})
    with pytest.raises(ValueError, match=r"probes.fewshot is invalid: Probe set 'cifar100:train': give 'TFDS_NAME'"):
        config_lib.validate(c)
    for key, value, match in (("probes.shots", (0, 5), "probes.shots"), ("probes.l2_grid", (), "probes.l2_grid"),
                              ("probes.heldout_per_class", 0, "probes.heldout_per_class"),
                              ("probes.knn_temperature", 0.0, "probes.knn_temperature")):
        with pytest.raises(ValueError, match=match):
            config_lib.validate(tiny_digits_config("/unused", **{key: value}))
    config_lib.validate(tiny_digits_config("/unused", **{"probes.l2_grid": (1024.0,), "probes.heldout_per_class": 0}))


def _model(config, num_classes=10):
    model = step_lib.make_model(config, num_classes)
    mesh = sharding.make_mesh(1)
    size, channels = config.data.image_size, len(config.data.mean)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, size, size, channels), np.float32))
    variables_sharding = sharding.state_sharding(variables, mesh)
    return model, mesh, jax.device_put(variables, variables_sharding), variables_sharding


@pytest.mark.parametrize("family", ["vit", "tests.tiny_family"])
def test_the_features_are_the_classifiers_input(digits_dir, family):
    """Caught by the classifier's name alone (tiny_family's is "classifier", its input the flattened
    normalised image): features @ kernel + bias are the model's logits."""
    config = tiny_digits_config(digits_dir, **{"model.family": family})
    model, mesh, variables, variables_sharding = _model(config)
    extractor = probes.make_feature_extractor(config, model, mesh, variables_sharding)
    _, test_source, _ = probes._sources(config, probes.parse_set("digits"), dict(process_index=0, process_count=1,
                                                                                  batch_multiple=8))
    features, labels = probes.extract(extractor, variables, test_source, mesh)
    np.testing.assert_array_equal(labels, test_source.eval_labels)
    normalised = np.asarray(step_lib.normaliser(config)(test_source.eval_images))
    if family == "vit":
        assert features.shape == (300, 64)
    else:
        np.testing.assert_allclose(features, normalised.reshape(300, -1), rtol=1e-6)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, normalised)
    head = jax.device_get(variables)["params"][models.classifier(models.of(config))]
    np.testing.assert_allclose(features @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5)


def test_probes_of_digits_features_are_far_above_chance(digits_dir):
    config = tiny_digits_config(digits_dir, **{"probes.shots": (1, 10), "probes.seeds": 2,
                                               "probes.fewshot": ("digits",), "probes.knn": ("digits",),
                                               "probes.linear": ("digits",)})
    model, mesh, variables, variables_sharding = _model(config)
    said = []
    results = probes.make_probes(config, model, mesh, variables_sharding, say=said.append)(variables)
    assert set(results) == {f"digits_{k}/top1" for k in ("1shot", "10shot", "linear", "knn")} | {
        "digits_1shot/top1_std", "digits_10shot/top1_std"}
    assert results["digits_10shot/top1"] > 0.4  # chance: 0.1 (random-init features)
    assert results["digits_10shot/top1"] > results["digits_1shot/top1"] + 0.1
    assert 0 < results["digits_10shot/top1_std"] < 0.1
    assert results["digits_linear/top1"] > 0.6 and results["digits_knn/top1"] > 0.2
    assert said and said[0].startswith("probed digits (1497 + 300 examples, features 64)")


def test_probes_read_an_image_folder(tmp_path):
    """A folder set through the image-folder reader: 3 classes of colour, its own class names."""
    import tensorflow as tf
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]])
    for split, count in (("train", 8), ("test", 4)):
        for c, name in enumerate(("ant", "bee", "cat")):
            os.makedirs(tmp_path / "set" / split / name)
            for i in range(count):
                image = np.clip(colours[c] + rng.normal(0, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
                tf.io.write_file(str(tmp_path / "set" / split / name / f"{i}.png"), tf.io.encode_png(image))
    config = tiny_digits_config("/unused", **{"data.image_size": 8, "data.mean": (0.5,) * 3, "data.std": (0.5,) * 3,
                                              "probes.fewshot": (f"folder:{tmp_path}/set",), "probes.shots": (2,),
                                              "probes.knn": (f"folder:{tmp_path}/set",), "probes.knn_k": 3})
    model, mesh, variables, variables_sharding = _model(config)
    results = probes.make_probes(config, model, mesh, variables_sharding, say=lambda line: None)(variables)
    assert set(results) == {"set_2shot/top1", "set_2shot/top1_std", "set_knn/top1"}
    assert results["set_knn/top1"] == 1.0 and results["set_2shot/top1"] > 0.6  # chance: 1/3
    os.makedirs(tmp_path / "set" / "test" / "dog")
    with pytest.raises(ValueError, match="class folders that the train split has not: \\['dog'\\]"):
        probes.make_probes(config, model, mesh, variables_sharding)
    with pytest.raises(ValueError, match="has colour images; the model takes 1 channel"):
        probes.make_probes(tiny_digits_config("/unused", **{"probes.knn": (f"folder:{tmp_path}/set",)}), model, mesh,
                           variables_sharding)


def test_training_and_evaluate_report_the_probes(digits_dir, tmp_path):
    """eval/NAME_Kshot/top1 at every evaluation in metrics.jsonl and summary.json, and from evaluate."""
    workdir = str(tmp_path / "run")
    config = tiny_digits_config(digits_dir, **{"total_steps": 10, "eval_every_steps": 5, "masksub.mode": "none",
                                               "probes.shots": (1, 5),
                                               "probes.seeds": 2, "probes.fewshot": ("digits",),
                                               "probes.knn": ("digits",)})
    summary = train.run(config, workdir)
    evals = [r for r in summary["history"] if "eval/top1" in r]
    assert [r["step"] for r in evals] == [5, 10]
    for record in evals:
        assert {"eval/digits_1shot/top1", "eval/digits_5shot/top1", "eval/digits_5shot/top1_std",
                "eval/digits_knn/top1"} <= set(record)
        assert record["eval/digits_5shot/top1"] > 0.2  # chance: 0.1
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        written = json.load(f)
    assert written["digits_5shot/top1"] == evals[-1]["eval/digits_5shot/top1"]
    variables = evaluate.load_variables(config, workdir, 10, say=lambda line: None)
    again = evaluate.evaluate(config, variables)
    assert again["digits_5shot/top1"] == pytest.approx(written["digits_5shot/top1"], abs=1e-9)
    assert again["digits_knn/top1"] == pytest.approx(written["digits_knn/top1"], abs=1e-9)
