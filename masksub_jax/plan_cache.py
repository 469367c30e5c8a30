"""What XLA's compiler said about a lowered step, kept on disk, so that planning the same step for the
same target again (the plan again with --find_batch, a suggestion tried before) takes seconds instead
of a TPU compile of minutes. JAX's persistent compilation cache cannot serve here: a compile-only TPU
client cannot load the executables it wrote (jax 0.10.2: "PjRtCompiler must be constructed with a
Client"). What is kept is only what the plan reads: the memory analysis, XLA's FLOP count, or the
compiler's out-of-memory message.

An entry's key is a SHA-256 of everything the outcome depends on: the lowered program's text (its
shapes, dtypes and shardings), the devices (kind and coordinates), the jax, jaxlib and libtpu
versions, the XLA and libtpu flags from the environment and JAX's compiler-effort settings. An entry
that cannot be read whole (damaged, another layout) is compiled again and rewritten, never used.
"""
import hashlib
import importlib.metadata
import json
import os
import tempfile

import jax

TYPES = {"arguments": (int,), "outputs": (int,), "aliased": (int,), "temporaries": (int,),
         "xla_flops": (float, int, type(None)), "out_of_memory": (str, type(None))}


def default_directory() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "masksub_jax", "plans")


def key(lowered, devices: list) -> str:
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    context = {
        "devices": [(d.platform, d.device_kind, getattr(d, "coords", None), getattr(d, "core_on_chip", None))
                    for d in devices],
        "versions": [version(p) for p in ("jax", "jaxlib", "libtpu")],
        "environment": [os.environ.get(name) for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")],
        "effort": [jax.config.jax_exec_time_optimization_effort, jax.config.jax_memory_fitting_effort],
    }
    digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode())
    digest.update(lowered.as_text().encode())
    return digest.hexdigest()


def unwritable(directory: str) -> str | None:
    """Why entries cannot be written to `directory` (asked before minutes of compiling), or None."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def load(directory: str | None, entry: str) -> dict | None:
    """The outcome kept under `entry`, or None (no directory, no entry, or one not whole)."""
    if not directory:
        return None
    try:
        with open(os.path.join(directory, entry + ".json")) as f:
            outcome = json.load(f)
    except (OSError, ValueError):
        return None
    return outcome if _whole(outcome) else None


def save(directory: str | None, entry: str, outcome: dict) -> None:
    """Writes `outcome` whole or not at all (a temporary file renamed into place)."""
    if not directory:
        return
    assert _whole(outcome), outcome
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=entry, suffix=".tmp")
    with os.fdopen(descriptor, "w") as f:
        json.dump(outcome, f)
    os.replace(temporary, os.path.join(directory, entry + ".json"))


def _whole(outcome) -> bool:
    return (isinstance(outcome, dict) and set(outcome) == set(TYPES)
            and all(isinstance(outcome[name], types) for name, types in TYPES.items()))
