"""The train batches of fixed configs and a seed are bit for bit the ones recorded in
tests/fixtures/batch_fingerprints.json (tools/make_batch_fingerprints.py): host and device
augmentation, a TFDS data set and an image folder, before and after the train step's own ops."""
import json
import os

import numpy as np

from tests import batch_fingerprints

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "batch_fingerprints.json")


def test_train_batches_are_the_recorded_ones(tmp_path):
    with open(FIXTURE) as f:
        recorded = json.load(f)
    got, statistics = batch_fingerprints.fingerprints(str(tmp_path))
    assert set(got) == set(recorded["batches"]) == set(statistics)
    if recorded["environment"] == batch_fingerprints.environment():
        for name, batches in recorded["batches"].items():
            assert got[name] == batches, f"{name}: the train batches changed"
    # Anywhere (other kernels may round a float's last bit the other way): the same shapes and moments.
    for name, batches in recorded["statistics"].items():
        for step, (want, have) in enumerate(zip(batches, statistics[name], strict=True)):
            assert want.keys() == have.keys(), (name, step)
            for field in want:
                where = f"{name} step {step} {field}: the train batches changed"
                assert have[field]["shape"] == want[field]["shape"], where
                np.testing.assert_allclose([have[field]["sum"], have[field]["sum_sq"]],
                                           [want[field]["sum"], want[field]["sum_sq"]], rtol=1e-4, atol=1e-3,
                                           err_msg=where)
