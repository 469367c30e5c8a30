"""The configs, by name, for notebooks and scripts: `configs.get("digits", total_steps=300)`.

The same files are what the command line takes (`--config=configs/digits.py`, `configs/` being a
link to this folder in a checkout; `--config=masksub_jax/configs/digits.py` also works). Each file's
docstring gives its command and the result to expect.
"""
import importlib
import pathlib

import ml_collections

from masksub_jax import config as config_lib


def names() -> list[str]:
    """The configs there are: digits, vit_b, swin_t, resnet50, ..."""
    return sorted(p.stem for p in pathlib.Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def get(name: str, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
    """Config `name` (a file of this folder, without .py) with its argument (as after `NAME.py:` on
    the command line, e.g. "epochs=800") and `overrides` by dotted key, like `--config.KEY=VALUE`:
    `get("digits", total_steps=300, **{"masksub.mode": "none"})`. Unknown names and keys are errors."""
    if name not in names():
        raise ValueError(f"Unknown config {name!r}; the configs are {names()}.")
    config = importlib.import_module(f"{__name__}.{name}").get_config(arg)
    return config_lib.override(config, overrides)
