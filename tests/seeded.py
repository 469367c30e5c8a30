"""Weights drawn from a seed with NumPy alone, so that a fixture can store logits instead of weights:
tools/make_swin_fixtures.py (with torch) and tests/test_swin.py (with JAX) draw the same ones."""
import numpy as np


def seeded_weights(shapes: dict) -> dict:
    """name -> float32 array, drawn in order from default_rng(0): norms' weights near 1, other 1-D
    parameters small, matrices scaled by 1/sqrt(fan_in) so that activations stay O(1) over depth."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in shapes.items():
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            out[name] = 1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise
        else:
            out[name] = noise / np.float32(np.sqrt(np.prod(shape[1:])))
    return out


def seeded_batchnorm_weights(shapes: dict) -> dict:
    """As `seeded_weights` for a network with BatchNorm (timm's names): every 1-D weight (a BatchNorm
    gamma) near 1, running means small, running variances in [1, 1.2]-ish, counters 0."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.zeros(shape, np.int64)
            continue
        noise = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("running_var"):
            out[name] = 1 + 0.2 * np.abs(noise)
        elif len(shape) == 1:
            out[name] = 1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise
        else:
            out[name] = noise / np.float32(np.sqrt(np.prod(shape[1:])))
    return out
