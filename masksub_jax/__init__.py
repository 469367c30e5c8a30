"""masksub_jax: MaskSub (masked sub-branch supervision, CVPR 2025) in JAX/Flax.

In a notebook:

    import masksub_jax
    config = masksub_jax.configs.get("digits", total_steps=300)
    result = masksub_jax.train.run(config, "runs/digits")   # result["history"]: the logged metrics
    variables = masksub_jax.evaluate.load_variables(config, "runs/digits", num_classes=10)
    logits = masksub_jax.evaluate.predict(config, variables, images)

The submodules load on first use, so that `python -m masksub_jax.main` can restart itself under
tcmalloc before JAX or TensorFlow is imported.
"""
import importlib

__version__ = "0.2.0"

_SUBMODULES = ("checkpoint", "config", "configs", "convert", "evaluate", "models", "step", "study", "train")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES])
