"""Stopping on request without losing work.

SIGTERM (what Kubernetes, SLURM, spot VMs and `kill` send): during start-up (imports, restore,
compilation) or the final evaluation the process stops at once, as there is nothing new to save;
during training it finishes the step, saves a checkpoint and stops. Either way the exit status is
75, so that a scheduler that requeues on 75 always requeues. Several processes (TPU pods,
multi-node GPU): JAX's preemption service, through Orbax, tells every process at the same step,
which the processes must agree on to save one consistent checkpoint.

Ctrl-C (SIGINT) stops at once; the checkpoint write in flight is finished first (exit 130).
While a checkpoint write is being started or finished, signals are announced and take effect after.

This module imports nothing heavy: `main.py` installs the start-up handler before anything slow.
"""
import contextlib
import os
import signal
import sys
import threading

# The exit status of a run that saved a checkpoint and stopped because it was told to; rerunning the
# same command continues it. 75 is EX_TEMPFAIL of sysexits.h: "try again later".
EXIT_PREEMPTED = 75
# What shells report for a process ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130

_training = {"active": False, "requested": False}


class Preempted(Exception):
    """Raised by `train.run` after the checkpoint of `step` is safely written; its message (step
    None) is also what a SIGTERM outside the training loop prints."""

    def __init__(self, step: int | None, workdir: str | None = None):
        if step is None:
            message = ("Preempted: SIGTERM outside the training loop (start-up or the final evaluation), "
                       "where every step done is already in a checkpoint. Rerun the same command to continue.")
        else:
            message = (f"Preempted: saved the checkpoint of step {step} in {workdir} and stopped. "
                       "Rerun the same command to continue.")
        super().__init__(message)
        self.step = step


def _on_sigterm(signum, frame):
    if not _training["active"]:
        # Nothing is being written (checkpoint writes finish inside the training loop or under
        # `signals_deferred`), so leave at once. Raising instead would be lost wherever the handler
        # happens to run inside a callback (Python ignores exceptions of GC callbacks).
        print(Preempted(None), flush=True)
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)
    if _training["requested"]:
        print("SIGTERM again: already stopping after this step; ignored.", flush=True)
        return
    _training["requested"] = True
    print(f"SIGTERM: finishing this step, then saving a checkpoint and exiting with status {EXIT_PREEMPTED}.",
          flush=True)


def stop_on_sigterm() -> None:
    """From now on SIGTERM stops the process with status 75 (see the module docstring)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def signals_deferred(reason: str):
    """SIGINT and SIGTERM that arrive inside this block take effect when it ends (main thread only),
    so that what it does (start or finish a checkpoint write) is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    # With several processes JAX's preemption service catches SIGTERM itself (at the C level, out of
    # Python's sight): replacing its handler here, even for a moment, would lose every later notice.
    deferred = (signal.SIGINT,) if _jax_handles_sigterm() else (signal.SIGINT, signal.SIGTERM)

    def defer(signum, frame):
        if signum not in arrived:
            print(f"{signal.Signals(signum).name}: {reason}; it takes effect after that.", flush=True)
            arrived.append(signum)
    previous = {s: signal.signal(s, defer) for s in deferred}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in arrived:
            signal.raise_signal(signum)


def _jax_handles_sigterm() -> bool:
    distributed = sys.modules.get("jax._src.distributed")
    return distributed is not None and distributed.global_state.client is not None


class Watch:
    """`reached(step)` is True once a preemption notice has arrived. Use as a context manager
    around the training loop."""

    def __init__(self, checkpoints, process_count: int):
        self._checkpoints, self._process_count = checkpoints, process_count
        self._previous = None

    def __enter__(self):
        if self._process_count == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
        _training.update(active=True, requested=False)
        return self

    def __exit__(self, *exc):
        _training.update(active=False, requested=False)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        if self._process_count > 1:
            return self._checkpoints.reached_preemption(step)
        return _training["requested"]
