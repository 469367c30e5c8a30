"""Orbax checkpoints of the train state (step, params, opt_state, rng) under WORKDIR/checkpoints.

What keeps a run from being lost here:
  - Orbax writes each step into a temporary folder and renames it when complete, so a process killed
    mid-write leaves no half checkpoint under a step's name; such leftovers are removed on restart.
  - `restore_latest` tries the newest step first. A checkpoint that cannot be restored is moved to
    WORKDIR/damaged_checkpoints/ (never deleted), with a message naming the step and the cause, and the
    next older one is tried. A checkpoint of a different model is an error that lists the mismatch.
  - A failed write (disk full, permissions) is raised as `CheckpointWriteError` naming the step and the
    intact earlier steps.
Nothing is unpickled: Orbax stores arrays with TensorStore and metadata as JSON.
"""
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

DAMAGED_DIR = "damaged_checkpoints"


class IncompatibleCheckpointError(ValueError):
    """The checkpoint holds another model or optimizer than the config describes."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the earlier ones are intact."""


def path(workdir: str) -> epath.Path:
    """The workdir as a path that local directories and gs:// buckets both support."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def checkpoint_dir(workdir: str) -> str:
    return str(path(workdir) / "checkpoints")


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the newest `keep` steps; saves are asynchronous (`wait_until_finished` before exit)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only,
                                           cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def save(mngr: ocp.CheckpointManager, state: dict, *, force: bool = False) -> None:
    """Starts an asynchronous save. A failure of this or the previous save raises CheckpointWriteError."""
    step = int(jax.device_get(state["step"]))
    try:
        mngr.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # Orbax re-raises a failed background write at the next call
        raise _write_error(mngr, step, e) from e


def wait(mngr: ocp.CheckpointManager) -> None:
    """Blocks until the pending save is on disk; raises CheckpointWriteError if it failed."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _write_error(mngr, None, e) from e


def _write_error(mngr, step, cause) -> CheckpointWriteError:
    intact = _finished_steps(mngr)
    return CheckpointWriteError(
        f"Writing a checkpoint{'' if step is None else f' (at step {step})'} to {mngr.directory} failed: "
        f"{type(cause).__name__}: {cause}. The earlier checkpoints are intact (steps {intact}). Free disk "
        "space or fix the permissions, then rerun the same command to resume from step "
        f"{max(intact) if intact else 0}.")


def _finished_steps(mngr) -> list[int]:
    try:
        mngr.reload()
        return sorted(mngr.all_steps())
    except Exception:  # pylint: disable=broad-except  (only used to word an error)
        return []


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: dict, *, say=print) -> dict | None:
    """The newest restorable checkpoint on `abstract_state`'s shapes and shardings; None if none.

    Damaged checkpoints are moved aside (see the module docstring) and older ones tried.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            metadata = mngr.item_metadata(step)
        except Exception as e:  # pylint: disable=broad-except
            _set_aside(mngr, step, f"its metadata cannot be read ({type(e).__name__}: {e})", say)
            continue
        if metadata is None:
            _set_aside(mngr, step, "its metadata is missing", say)
            continue
        _check_compatible(metadata, abstract_state, step)
        try:
            state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
            problem = _implausible(state, step)
        except Exception as e:  # pylint: disable=broad-except
            problem = f"restoring it failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        if problem is None:
            return state
        _set_aside(mngr, step, problem, say)
    return None


def _check_compatible(metadata, abstract_state, step: int) -> None:
    """Raises IncompatibleCheckpointError listing the leaves whose path or shape differ."""
    saved, wanted = _shapes(metadata), _shapes(abstract_state)
    if saved == wanted:
        return
    lines = [f"{k}: checkpoint {saved.get(k, 'absent')}, config {wanted.get(k, 'absent')}"
             for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    raise IncompatibleCheckpointError(
        f"The checkpoint of step {step} holds a different model or optimizer than the config "
        f"({len(lines)} mismatches, e.g. {'; '.join(lines[:3])}). Use a new --workdir for this config, or "
        "the config the run was started with.")


def _shapes(tree) -> dict[str, tuple]:
    """'params/head/kernel' -> shape. Orbax's metadata stores named tuples as dicts, so paths are
    compared by their names and indices only."""
    def name(entry):
        return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))
    return {"/".join(map(name, path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


@jax.jit
def _finite_leaves(state):
    """Per floating-point leaf, whether it is all finite: one device computation, one host read."""
    return jax.tree.map(lambda x: jax.numpy.isfinite(x).all(),
                        {k: v for k, v in state.items() if k != "rng"})


def _implausible(state, step: int) -> str | None:
    saved_step = int(jax.device_get(state["step"]))
    if saved_step != step:
        return f"it holds step {saved_step}, not {step}"
    finite = jax.device_get(_finite_leaves(state))
    bad = [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(finite) if not ok]
    return f"{bad[0]} holds NaN or Inf" if bad else None


def _set_aside(mngr, step: int, problem: str, say) -> None:
    """Moves a damaged step to WORKDIR/damaged_checkpoints/STEP-TIME (process 0) and says so."""
    source = epath.Path(mngr.directory) / str(step)
    target = epath.Path(mngr.directory).parent / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        say(f"WARNING: the checkpoint of step {step} is damaged: {problem}. Moved it to {target} "
            "(not deleted); trying the next older checkpoint.")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    mngr.reload()


def load_params(workdir: str, step: int | None = None) -> dict:
    """The parameter pytree of the newest (or the given) checkpoint in `workdir`, as NumPy arrays.

    For evaluation, conversion, notebooks and comparisons; needs neither the config nor a device
    layout.
    """
    mngr = manager(workdir, read_only=True)
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}; train first with "
                                f"`python -m masksub_jax.main --config=... --workdir={workdir}`.")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {checkpoint_dir(workdir)}; "
                                f"it has steps {sorted(steps)}.")
    # The manager saved one unnamed item, which Orbax stores in the step's "default" folder.
    return params_from(os.path.join(checkpoint_dir(workdir), str(step), "default"))


def params_from(directory: str) -> dict:
    """The "params" entry of the Orbax pytree checkpoint in `directory` (a train state, or weights
    written by `convert.save_params`), as NumPy arrays, without reading the rest."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(directory).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item={"params": tree["params"]}, restore_args={"params": as_numpy}, partial_restore=True))
    return restored["params"]
