"""Model families as plug-ins: the trainer, bench and convert ask the family, never name it."""
import json
import sys
import types

import pytest

from masksub_jax import config as config_lib
from masksub_jax import convert, flops, models, train
from tests.conftest import tiny_digits_config


def test_a_family_from_outside_the_package_trains_with_masksub(tmp_path, digits_dir):
    config = tiny_digits_config(digits_dir, total_steps=20, log_every_steps=5,
                                **{"model.family": "tests.tiny_family"})
    summary = train.run(config, str(tmp_path / "run"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train/loss_sub"' in line]
    assert summary["step"] == 20 and lines[-1]["train/loss_main"] < lines[0]["train/loss_main"]
    assert lines[-1]["train/loss_sub"] == lines[-1]["train/loss_sub"]  # the sub-branch ran: not NaN
    assert flops.step_flops(config, 10) is None  # no forward_flops: bench falls back to XLA's count


def test_unknown_and_incomplete_families_are_named(monkeypatch):
    config = tiny_digits_config("/unused", **{"model.family": "vitt"})
    with pytest.raises(ValueError, match=r"Unknown model.family 'vitt': use one of \('vit', 'swin', 'resnet', 'beit'"):
        config_lib.validate(config)
    config.model.family = "no_such_package.family"
    with pytest.raises(ValueError, match="Unknown model.family 'no_such_package.family'"):
        config_lib.validate(config)
    monkeypatch.setitem(sys.modules, "half_family", types.SimpleNamespace(__name__="half_family",
                                                                                       build=None))
    config.model.family = "half_family"
    with pytest.raises(ValueError, match=r"lacks \['describe', 'check', 'num_units'\]"):
        config_lib.validate(config)


def test_convert_refuses_a_family_without_timm_mapping(tmp_path, capsys):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        convert.main([f"--from={tmp_path / 'w.npz'}", f"--to={tmp_path / 'out'}", "--family=tests.tiny_family",
                      "--variant=x", "--image_size=8"])
    assert exit_.value.code == 1 and "has no timm mapping (from_timm)" in capsys.readouterr().err
    assert not hasattr(models.get("tests.tiny_family"), "from_timm")


def test_a_sub_branch_the_family_does_not_implement_is_refused_by_the_command_line(tmp_path):
    """tests/tiny_family ignores the dropout and drop-path rates: DropSub would train a copy of the
    main branch. One line naming the key and the family's modes, before any data or compile."""
    import subprocess

    from tests.conftest import REPO
    done = subprocess.run([sys.executable, "-m", "masksub_jax.main", "--config=digits", f"--workdir={tmp_path}/r",
                           "--config.model.family=tests.tiny_family", "--config.masksub.mode=dropout"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: Config masksub.mode='dropout' is invalid: "
                                                           "RowLinear implements the sub-branches ('masking',)")
    assert "compiling" not in done.stdout and not (tmp_path / "r" / "checkpoints").exists()


def test_the_input_preview_is_drawn_by_the_family():
    """The tiny family masks rows: its preview greys whole rows, where the default would grey 4x4 squares."""
    import jax
    import numpy as np

    from masksub_jax import step
    config = tiny_digits_config("/unused", **{"model.family": "tests.tiny_family", "mixup.mixup_alpha": 0.0})
    images = np.random.default_rng(0).uniform(0.1, 0.9, (8, 8, 8, 1)).astype(np.float32)
    batch = {"image": (images - 0.5) / 0.5, "label": np.arange(8) % 10}
    inputs, sub_inputs = jax.device_get(step.make_input_preview(config, 10)(batch, jax.random.PRNGKey(0)))
    grey = np.all(sub_inputs == 0.5, axis=(2, 3))  # (example, row): the whole row greyed
    untouched = np.all(sub_inputs == inputs, axis=(2, 3))
    assert np.all(grey | untouched) and np.all(grey.sum(1) == 4)  # half of the 8 rows of every example
    # A family whose units are no square grid and that draws nothing gets no picture, not a wrong one.
    assert models.preview_drawer(types.SimpleNamespace(num_units=lambda c: 8), config) is None
    assert models.preview_drawer(types.SimpleNamespace(num_units=lambda c: 16), config) is not None
