"""The persistent XLA compilation cache: a resumed or restarted run loads the train and eval steps it
compiled before instead of compiling them again (minutes for a large model on a pod). Entries are
keyed by the program, the XLA flags, the devices and the jax version, so a hit is the same executable.
"""
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

IN_WORKDIR = "workdir"


def directory(setting: str | None, workdir: str) -> str | None:
    """config.compilation_cache_dir as a directory: None (the default) $JAX_COMPILATION_CACHE_DIR or
    ~/.cache/masksub_jax/xla; "workdir" WORKDIR/xla_cache (a pod's processes share it when the workdir
    is on a shared disk or bucket); "" none."""
    if setting == "":
        return None
    if setting == IN_WORKDIR:
        return workdir.rstrip("/") + "/xla_cache"
    return setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "masksub_jax", "xla")


def use(setting: str | None, workdir: str) -> str | None:
    """Points JAX's persistent cache at `directory(setting, workdir)` (or turns it off) before anything
    compiles; returns the directory."""
    path = directory(setting, workdir)
    if path != jax.config.jax_compilation_cache_dir:
        compilation_cache.reset_cache()  # a cache already opened in this process keeps its directory otherwise
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", path)
    return path
