"""Model families as plug-ins: the trainer, bench and convert ask the family, never name it."""
import json
import sys
import types

import pytest

from masksub_jax import bench, convert, models, train
from masksub_jax import config as config_lib
from tests.conftest import tiny_digits_config


def test_a_family_from_outside_the_package_trains_with_masksub(tmp_path, digits_dir):
    config = tiny_digits_config(digits_dir, total_steps=20, log_every_steps=5,
                                **{"model.family": "tests.tiny_family"})
    summary = train.run(config, str(tmp_path / "run"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train/loss_sub"' in line]
    assert summary["step"] == 20 and lines[-1]["train/loss_main"] < lines[0]["train/loss_main"]
    assert lines[-1]["train/loss_sub"] == lines[-1]["train/loss_sub"]  # the sub-branch ran: not NaN
    assert bench.step_flops(config, 10) is None  # no forward_flops: bench falls back to XLA's count


def test_unknown_and_incomplete_families_are_named(monkeypatch):
    config = tiny_digits_config("/unused", **{"model.family": "vitt"})
    with pytest.raises(ValueError, match=r"Unknown model.family 'vitt': use one of \('vit', 'swin', 'resnet'\)"):
        config_lib.validate(config)
    config.model.family = "no_such_package.family"
    with pytest.raises(ValueError, match="Unknown model.family 'no_such_package.family'"):
        config_lib.validate(config)
    monkeypatch.setitem(sys.modules, "half_family", types.SimpleNamespace(__name__="half_family",
                                                                                       build=None))
    config.model.family = "half_family"
    with pytest.raises(ValueError, match=r"lacks \['describe', 'check', 'num_units'\]"):
        config_lib.validate(config)


def test_convert_refuses_a_family_without_timm_mapping(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(SystemExit, match="has no timm mapping"):
        convert.main([f"--from={tmp_path / 'w.npz'}", f"--to={tmp_path / 'out'}", "--family=tests.tiny_family",
                      "--variant=x", "--image_size=8"])
    assert not hasattr(models.get("tests.tiny_family"), "from_timm")
