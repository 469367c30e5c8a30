"""The study's robustness figure (study.py): the corruptions at their strengths, every run's weights
scored on the same corrupted held-out images, and the table and figure written. The whole command
runs in tests/test_prototyping.py's study test."""
import json

import jax
import numpy as np
import pytest

from masksub_jax import convert, study
from masksub_jax import step as step_lib
from masksub_jax.data import pipeline
from tests.conftest import tiny_digits_config


def test_corruptions_do_what_their_strength_says():
    grey = np.full((50, 16, 16, 3), 128, np.uint8)
    for kind in study.CORRUPTIONS:
        assert study.corrupt(grey, kind, 0.0) is grey
        np.testing.assert_array_equal(study.corrupt(grey, kind, 0.3, seed=1), study.corrupt(grey, kind, 0.3, seed=1))
    for strength in (0.1, 0.2):
        noise = study.corrupt(grey, "noise", strength).astype(float) - 128
        assert abs(noise.std() / (strength * 255) - 1) < 0.02 and abs(noise.mean()) < 0.5
    stripes = np.zeros((2, 16, 16, 1), np.uint8)
    stripes[:, (np.arange(16) // 4) % 2 == 0] = 255  # 4 rows on, 4 off
    spread = [study.corrupt(stripes, "blur", s).std() for s in study.CORRUPTIONS["blur"]]
    assert all(a > b for a, b in zip(spread, spread[1:]))  # each stronger blur flattens the stripes more
    assert study.corrupt(np.full((1, 8, 8, 1), 77, np.uint8), "blur", 2.0).max() == 77  # a flat image stays
    occluded = study.corrupt(np.zeros((20, 8, 8, 3), np.uint8), "occlusion", 0.5, fill=(10, 20, 30))
    for image in occluded:
        rows, cols = np.nonzero(image[..., 0])
        assert len(rows) == 16 and np.ptp(rows) == 3 and np.ptp(cols) == 3  # one 4x4 square
        np.testing.assert_array_equal(image[rows, cols], [[10, 20, 30]] * 16)
    assert len({tuple(np.argwhere(image[..., 0])[0]) for image in occluded}) > 1  # placed per image
    with pytest.raises(ValueError, match="Unknown corruption 'fog'"):
        study.corrupt(grey, "fog", 0.1)


def test_every_runs_weights_score_the_corrupted_held_out_images(digits_dir, tmp_path, monkeypatch):
    config = tiny_digits_config(digits_dir)
    model = step_lib.make_model(config, 10)
    init = jax.jit(model.init)
    weights = {f"{mode}-seed{seed}": jax.device_get(init(jax.random.PRNGKey(10 * i + seed), np.zeros((1, 8, 8, 1))))
               for i, mode in enumerate(("none", "masking")) for seed in (0, 1)}
    monkeypatch.setattr(convert, "read_variables", lambda path, say: weights[path.rpartition("/")[2]])
    results = study.robustness(config, str(tmp_path), [0, 1], ["none", "masking"], say=print)
    data = pipeline.make(config)
    logits = jax.jit(lambda v, x: model.apply(v, step_lib.normaliser(config)(x), train=False))
    noisy = study.corrupt(data.eval_images, "noise", 0.4)
    for mode in ("none", "masking"):
        for seed in (0, 1):
            variables = weights[f"{mode}-seed{seed}"]
            clean = np.mean(np.argmax(np.asarray(logits(variables, data.eval_images)), 1) == data.eval_labels)
            noisy_top1 = np.mean(np.argmax(np.asarray(logits(variables, noisy)), 1) == data.eval_labels)
            for kind, strengths in study.CORRUPTIONS.items():
                row = results[mode][kind][seed]
                assert len(row) == len(strengths) and row[0] == pytest.approx(clean, abs=1e-9)
            assert results[mode]["noise"][seed][-1] == pytest.approx(noisy_top1, abs=1e-9)
    assert results["none"]["noise"] != results["masking"]["noise"]
    history = [{"step": 2, "train/loss_main": 1.0, "eval/top1": 0.5}]
    runs = {mode: [{"seed": seed, "top1": 0.5, "top5": 0.9, "history": history} for seed in (0, 1)]
            for mode in ("none", "masking")}
    study.write(runs, str(tmp_path), "python -m masksub_jax.study ...", results)
    written = json.loads((tmp_path / "study_robustness.json").read_text())
    assert written == {"strengths": {k: list(v) for k, v in study.CORRUPTIONS.items()}, "top1": results}
    table = (tmp_path / "study.md").read_text()
    assert "| mode | occlusion 0 | occlusion 0.25 | occlusion 0.375 | occlusion 0.5 | occlusion 0.625 |" in table
    noise = np.asarray(results["masking"]["noise"])
    assert ("| MaskSub (masking) | " + " | ".join(f"{m:.4f} +- {s:.4f}" for m, s in
                                                 zip(noise.mean(0), noise.std(0, ddof=1))) + " |") in table
    assert (tmp_path / "study_robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_robustness_figure_for_data_not_held_in_memory(tmp_path, monkeypatch):
    config = tiny_digits_config("/unused", **{"data.source": "tfds", "data.name": "mnist"})
    monkeypatch.setattr(pipeline, "make", lambda config, **kwargs: object())  # a source without eval_images
    said = []
    assert study.robustness(config, str(tmp_path), [0], ["none"], say=said.append) is None
    assert said == ["No robustness figure: data.source='tfds' is not held in memory (digits, synthetic)."]
