"""Writes tests/fixtures/batch_fingerprints.json: SHA-256 digests of the first train batches of a few
tiny configs (tests/batch_fingerprints.py says which), for tests/test_batches_unchanged.py.

  python tools/make_batch_fingerprints.py

Run it only when a change is meant to change the batches (a new draw, a fixed op); a change that
only moves code must pass the test with the digests as they are.
"""
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's package and tests, not an installed copy

import tests.conftest  # noqa: E402, F401  (the tests' environment: 8 CPU devices, TensorFlow's logging)
from tests import batch_fingerprints  # noqa: E402

OUT = os.path.join(REPO, "tests", "fixtures", "batch_fingerprints.json")


def main():
    with tempfile.TemporaryDirectory() as root:
        digests, statistics = batch_fingerprints.fingerprints(root)
    with open(OUT, "w") as f:
        json.dump({"environment": batch_fingerprints.environment(), "batches": digests, "statistics": statistics},
                  f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {OUT}: {len(digests)} cases")


if __name__ == "__main__":
    main()
