"""Orbax checkpoints of the train state (step, params, opt_state, rng) under WORKDIR/checkpoints."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the newest `keep` steps; saves are asynchronous (`wait_until_finished` before exit)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mngr: ocp.CheckpointManager, state: dict, *, force: bool = False) -> None:
    mngr.save(int(jax.device_get(state["step"])), args=ocp.args.StandardSave(state), force=force)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: dict) -> dict | None:
    """The newest checkpoint restored onto `abstract_state`'s shapes and shardings; None if none."""
    step = mngr.latest_step()
    if step is None:
        return None
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


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
    path = os.path.join(checkpoint_dir(workdir), str(step), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": tree["params"]}, restore_args={"params": as_numpy}, partial_restore=True))
    return restored["params"]
