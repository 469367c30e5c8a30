"""Orbax checkpoints of the train state (step, params, opt_state, rng) under WORKDIR/checkpoints.

What keeps a run from being lost here:
  - Orbax writes each step into a temporary folder and renames it when complete, so a process killed
    mid-write leaves no half checkpoint under a step's name; such leftovers are removed on restart.
  - Each checkpoint carries a checksum of every array, computed on the devices before the write and
    checked after a restore: a flipped bit in a file is found, not trained on.
  - `Checkpoints.restore_latest` tries the newest step first. A checkpoint that cannot be restored (or
    a step's name held by something that is no checkpoint folder) is moved to
    WORKDIR/damaged_checkpoints/ (never deleted), with a message naming the step and the cause, and the
    next older one is tried. A checkpoint of a different model is an error that lists the mismatch.
  - A failed write (disk full, permissions) is raised as `CheckpointWriteError` naming the step whose
    write failed and the intact earlier steps; leaving the `Checkpoints` context on any path (an error,
    Ctrl-C) first finishes the save in flight and closes Orbax's threads.
  - The readers (`load_variables`, and through it evaluate, convert and init_from) check the arrays
    they read against the same checksums, and for NaN / Inf; they move nothing. Without a step given
    they fall back to the newest intact step, saying which step they skipped and why; with one they
    raise `DamagedCheckpointError` naming the damage.
Nothing is unpickled: Orbax stores arrays with TensorStore and metadata as JSON.
"""
import contextlib
import logging
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from masksub_jax import preemption, sharding
from masksub_jax import step as step_lib
from masksub_jax import workdir as workdir_lib

DAMAGED_DIR = "damaged_checkpoints"


class IncompatibleCheckpointError(ValueError):
    """The checkpoint holds another model or optimizer than the config describes."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the earlier ones are intact."""


class DamagedCheckpointError(OSError):
    """Stored weights do not read back as they were written: unreadable, NaN / Inf, or checksums differ."""


def checkpoint_dir(workdir: str) -> str:
    return str(workdir_lib.path(workdir) / "checkpoints")


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax's INFO and WARNING lines (read-only options, absent optional files) are not the
    user's business; errors still show."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the newest `keep` steps; saves are asynchronous (`wait_until_finished` before exit)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                           read_only=read_only, enable_async_checkpointing=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           save_interval_steps=0 if read_only else 1)
    with _quiet_orbax():
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                     item_handlers=ocp.StandardCheckpointHandler())


def _bits(x):
    """The array's raw bits as uint32 (each element on its own)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)


@jax.jit
def fingerprints(state):
    """Per leaf, sum_i bits_i * w_i mod 2^32 with odd weights w_i that depend on the position i: any
    one flipped bit changes it (2^b times an odd number is never 0 mod 2^32), and so do moved values.
    A sharded reduction on the devices: no array leaves them."""
    def fingerprint(x):
        position = jnp.zeros(x.shape, jnp.uint32)
        stride = 1
        for d in reversed(range(x.ndim)):
            position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
            stride *= x.shape[d]
        weights = (position * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
        return jnp.sum(_bits(x) * weights, dtype=jnp.uint32)
    return jax.tree.map(fingerprint, state)


def fingerprint_record(tree) -> dict[str, int]:
    """`fingerprints` of any pytree (a train state, variables, NumPy arrays as read back) by the
    leaves' `jax.tree_util.keystr` paths: what a checkpoint's custom metadata and a converted
    directory's masksub_weights.json hold, and what a reader compares with them."""
    values = jax.device_get(fingerprints(tree))
    return {jax.tree_util.keystr(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(values)}


def damage(tree, record: dict[str, int] | None) -> str | None:
    """Why arrays read back are not the ones written (None if they are): a leaf holding NaN or Inf,
    or fingerprints that differ from `record`, the record written with them over a tree with these
    paths or more (None: written before checkpoints carried checksums; only NaN / Inf is seen)."""
    nonfinite = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
                 if jnp.issubdtype(x.dtype, jnp.floating) and not np.isfinite(x).all()]
    if nonfinite:
        return f"{nonfinite[0]} holds NaN or Inf"
    return None if record is None else _mismatch(record, fingerprint_record(tree))


def _mismatch(saved: dict[str, int], now: dict[str, int]) -> str | None:
    bad = [k for k in now if saved.get(k) != now[k]]
    return (f"{len(bad)} array(s) do not match the checksums written with them, e.g. {bad[0]} "
            "(a damaged file or bit rot)") if bad else None


class Checkpoints:
    """The run's checkpoints. Use as a context manager: leaving it on any path finishes the save in
    flight and closes the manager, so an error or Ctrl-C is the last thing a run prints."""

    def __init__(self, workdir: str, keep: int = 3):
        self.workdir = workdir
        self._mngr = manager(workdir, keep)
        self._pending = None  # the step of the asynchronous save in flight

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        with preemption.signals_deferred("finishing the checkpoint write first"):
            try:
                self.wait()
            except CheckpointWriteError:
                if exc_type is None:
                    raise
                # Another error is on its way out; it is the one to report, and it came first.
            finally:
                with _quiet_orbax():
                    self._mngr.close()

    @property
    def directory(self) -> epath.Path:
        return epath.Path(self._mngr.directory)

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def describe_latest(self) -> str:
        step = self.latest_step()
        return "there is none yet" if step is None else f"the newest is step {step}"

    def reached_preemption(self, step: int) -> bool:
        return self._mngr.reached_preemption(step)

    def save(self, state: dict, *, force: bool = False) -> None:
        """Starts an asynchronous save. A failure of this or the previous save raises CheckpointWriteError."""
        self.wait()  # a failed previous write is reported with its own step
        step = int(jax.device_get(state["step"]))
        record = fingerprint_record(state)
        try:
            with preemption.signals_deferred("starting the checkpoint write first"):
                self._mngr.save(step, args=ocp.args.StandardSave(state), force=force,
                                custom_metadata={"fingerprints": record})
                self._pending = step
        except Exception as e:
            raise self._write_error(step, e) from None

    def wait(self) -> None:
        """Blocks until the save in flight is on disk; raises CheckpointWriteError if it failed."""
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # Orbax re-raises the background write's error
            raise self._write_error(step, e) from None

    def _write_error(self, step, cause) -> CheckpointWriteError:
        intact = self._finished_steps(exclude=step)
        return CheckpointWriteError(
            f"Writing the checkpoint{'' if step is None else f' of step {step}'} to {self.directory} failed: "
            f"{_in_brief(cause)}. The earlier checkpoints are intact (steps {intact}). Free disk space or fix "
            f"the permissions, then rerun the same command to resume from step {max(intact) if intact else 0}.")

    def _finished_steps(self, exclude) -> list[int]:
        try:
            self._mngr.reload()
            return [s for s in self.steps() if s != exclude]
        except Exception:  # only used to word an error
            return []

    def restore_latest(self, abstract_state: dict, *, say=print) -> dict | None:
        """The newest restorable checkpoint on `abstract_state`'s shapes and shardings; None if none.

        Damaged checkpoints are moved aside (see the module docstring) and older ones tried.
        """
        self._set_aside_impostors(say)
        for step in reversed(self.steps()):
            try:
                metadata = self._mngr.item_metadata(step)
            except Exception as e:
                self._set_aside(step, f"its metadata cannot be read ({_in_brief(e)})", say)
                continue
            if metadata is None:
                self._set_aside(step, "its metadata is missing", say)
                continue
            _check_compatible(metadata, abstract_state, step)
            try:
                state = self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
                problem = _implausible(state, step) or self._checksum_problem(step, state)
            except Exception as e:
                problem = f"its arrays cannot be read ({_in_brief(e)})"
            if problem is None:
                return state
            self._set_aside(step, problem, say)
        return None

    def _checksum_problem(self, step: int, state) -> str | None:
        saved = _saved_record(self._mngr, step)
        if saved is None:
            return None  # written before checkpoints carried checksums
        return _mismatch(saved, fingerprint_record(state))

    def _set_aside_impostors(self, say) -> None:
        """A step's name held by a regular file: Orbax lists no such step, and its next save of that
        step would delete the file. Kept, like other damage."""
        names = [p.name for p in self.directory.iterdir()] if self.directory.exists() else []
        for name in sorted(n for n in names if n.isdigit() and not (self.directory / n).is_dir()):
            self._set_aside(int(name), "it is a regular file, not a checkpoint folder", say)

    def _set_aside(self, step: int, problem: str, say) -> None:
        """Moves a damaged step to WORKDIR/damaged_checkpoints/STEP-TIME (process 0) and says so."""
        source = self.directory / str(step)
        target = self.directory.parent / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            say(f"WARNING: the checkpoint of step {step} is damaged: {problem}. Moved it to {target} "
                "(not deleted); trying the next older checkpoint.")
        sharding.barrier(f"set aside checkpoint {step}")
        self._mngr.reload()


def _saved_record(mngr: ocp.CheckpointManager, step: int) -> dict[str, int] | None:
    """The fingerprints written with a step (None: written before checkpoints carried checksums)."""
    return (mngr.metadata(step).custom_metadata or {}).get("fingerprints")


def _in_brief(error: Exception) -> str:
    """An Orbax / TensorStore error's first line, without the object reprs some of them carry."""
    first = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    first = " ".join(part for part in first.split() if not part.startswith("<") and "0x" not in part)
    return f"{type(error).__name__}: {first[:240]}"


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


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_variables(workdir: str, step: int | None = None, *, ema: bool = False, fall_back: bool = True,
                   say=None) -> dict:
    """The model's variables (params, and the collections such as ResNet's batch_stats) of the
    newest (or the given) checkpoint in `workdir`, as NumPy arrays; with `ema`, their moving average
    (a run with config.ema.decay > 0).

    What is read is checked against the checksums written with it and for NaN / Inf. A damaged given
    step raises DamagedCheckpointError naming the damage; without a step, a damaged newest one is
    skipped, with a line to `say` naming it and why, for the newest intact one (with `fall_back`
    False it raises instead: for a reader that means the run's final weights). Nothing is moved or
    written: setting damage aside is the trainer's job.

    For evaluation, conversion, notebooks and comparisons; needs neither the config nor a device
    layout.
    """
    say = say or _warn
    mngr = manager(workdir, read_only=True)
    steps = sorted(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}; train first with "
                                f"`python -m masksub_jax.main --config=... --workdir={workdir}`.")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {checkpoint_dir(workdir)}; "
                                f"it has steps {steps}.")
    candidates = [step] if step is not None else list(reversed(steps)) if fall_back else [steps[-1]]
    damaged = []
    for candidate in candidates:
        variables, problem = _read_step(mngr, workdir, candidate, ema)
        if problem is None:
            for skipped, why in damaged:
                say(f"WARNING: the checkpoint of step {skipped} in {checkpoint_dir(workdir)} is damaged: {why}. "
                    f"Skipped it: read step {candidate}, the newest intact one.")
            return variables
        damaged.append((candidate, problem))
    raise DamagedCheckpointError(_damage_message(workdir, damaged, steps))


def _read_step(mngr, workdir: str, step: int, ema: bool) -> tuple[dict | None, str | None]:
    """(the step's variables, None), or (None, what is wrong with them)."""
    try:
        with _quiet_orbax():
            record = _saved_record(mngr, step)
        item = os.path.join(checkpoint_dir(workdir), str(step), "default")
        tree = _restore_variables(item, ema)
    except NoAverageError:
        raise
    except Exception as e:
        _silence_echoes_of(item)
        return None, f"it cannot be read ({_in_brief(e)})"
    problem = damage(tree, record)
    if problem is not None:
        return None, problem
    return (tree["ema"] if ema else tree), None


_FAILED_READS: set[str] = set()  # the step folders whose read failed and was reported


def _silence_echoes_of(item: str) -> None:
    """A failed Orbax read of `item` leaves TensorStore reads in flight: later, each of them reports
    its own error on that folder as an asyncio task's "exception never retrieved", and their callbacks
    into Orbax's closed event loop print "Event loop is closed" tracebacks (through sys.unraisablehook,
    or, from TensorStore's threads under load, sys.excepthook and threading.excepthook), hundreds of
    lines after the reader has named the damage in one. Those, and only those, are dropped."""
    _FAILED_READS.update({item, os.path.abspath(item)} if "://" not in item else {item})
    if getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        return

    def closed_loop(error) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    def dropping(hook, error_of):
        def drop(*args):
            if not closed_loop(error_of(*args)):
                hook(*args)
        drop.drops_closed_loop_callbacks = True
        return drop
    sys.unraisablehook = dropping(sys.unraisablehook, lambda unraisable: unraisable.exc_value)
    sys.excepthook = dropping(sys.excepthook, lambda kind, error, trace: error)
    threading.excepthook = dropping(threading.excepthook, lambda args: args.exc_value)

    class ReportedAlready(logging.Filter):
        def filter(self, record):
            error = record.exc_info[1] if record.exc_info else None
            return error is None or not any(item in str(error) for item in _FAILED_READS)
    logging.getLogger("asyncio").addFilter(ReportedAlready())


def _damage_message(workdir: str, damaged: list[tuple[int, str]], steps: list[int]) -> str:
    """Names each damaged step and the cause, and what to do."""
    where = checkpoint_dir(workdir)
    rerun = (f"rerun the run's command (`python -m masksub_jax.main ... --workdir={workdir}`): it moves damaged "
             f"checkpoints to {DAMAGED_DIR}/ and trains again from the newest intact one")
    if len(damaged) == len(steps):
        named = "; ".join(f"step {step}: {problem}" for step, problem in damaged)
        return f"Every checkpoint in {where} is damaged ({named}). Restore the folder from a copy, or {rerun}."
    (step, problem), = damaged
    others = [s for s in steps if s != step]
    fix = f"To use the run's final weights, {rerun}." if step == steps[-1] else "Read another step."
    return (f"The checkpoint of step {step} in {where} is damaged: {problem} (the run also has steps {others}, "
            f"unchecked). {fix}")


def load_params(workdir: str, step: int | None = None, *, say=None) -> dict:
    """The parameter pytree of the newest (or the given) checkpoint in `workdir` (see load_variables)."""
    return load_variables(workdir, step, say=say)["params"]


class NoAverageError(FileNotFoundError):
    """A moving average of the weights was asked of a checkpoint that keeps none."""


def variables_from(directory: str, *, ema: bool = False) -> dict:
    """The model's variables in the Orbax pytree checkpoint in `directory` (a train state, or weights
    written by `convert.save_variables`): every entry but the optimizer's and the step's (with `ema`:
    the train state's moving average of them), as NumPy arrays, without reading the rest. Unchecked:
    `damage` compares them with their checksums (load_variables and convert.read_variables do)."""
    tree = _restore_variables(directory, ema)
    return tree["ema"] if ema else tree


def _restore_variables(directory: str, ema: bool) -> dict:
    """The variables as stored: with `ema` under "ema", so that the paths are the saved record's."""
    checkpointer = ocp.PyTreeCheckpointer()
    with _quiet_orbax():
        tree = checkpointer.metadata(directory).item_metadata.tree
        if ema and "ema" not in tree:
            raise NoAverageError(f"{directory} holds no moving average of the weights: the run kept none "
                                 "(config.ema.decay=0). Leave out --ema to use its weights.")
        wanted = {"ema": dict(tree["ema"])} if ema else step_lib.variables(dict(tree))
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=as_numpy, partial_restore=True))
