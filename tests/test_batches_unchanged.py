"""The train batches of fixed configs and a seed are bit for bit the ones recorded in
tests/fixtures/batch_fingerprints.json (tools/make_batch_fingerprints.py): host and device
augmentation, a TFDS data set and an image folder, before and after the train step's own ops."""
import json
import os

import pytest

from tests import batch_fingerprints

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "batch_fingerprints.json")


def test_train_batches_are_the_recorded_ones(tmp_path):
    with open(FIXTURE) as f:
        recorded = json.load(f)
    if recorded["environment"] != batch_fingerprints.environment():
        pytest.skip(f"digests recorded with {recorded['environment']}, this is {batch_fingerprints.environment()}: "
                    "other kernels may round a float the other way")
    got = batch_fingerprints.fingerprints(str(tmp_path))
    for name, batches in recorded["batches"].items():
        assert got[name] == batches, f"{name}: the train batches changed"
    assert set(got) == set(recorded["batches"])
