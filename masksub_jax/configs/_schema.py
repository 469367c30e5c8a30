"""The schema's defaults (`config.base()`). Not a recipe: `python -m masksub_jax.evaluate --workdir=DIR`
parses its --config.KEY=VALUE overrides against it when no --config is given, and evaluates with
the run's own config (DIR/config.json) and those overrides."""
from masksub_jax import config as config_lib


def get_config(arg=None):
    config_lib.parse_arg(arg)
    return config_lib.base()
