"""Notice of preemption, so that the trainer can save and leave before the machine goes away.

One process: SIGTERM (what Kubernetes, SLURM, spot VMs and `kill` send) sets a flag; further
SIGTERMs while the trainer saves are ignored, so they cannot interrupt the checkpoint write. Several
processes (TPU pods, multi-node GPU): JAX's preemption service, through Orbax, tells every process
at the same step, which the processes must agree on to save one consistent checkpoint.
"""
import signal
import threading

import jax

# The exit status of a run that saved a checkpoint and stopped because it was told to; rerunning the
# same command continues it. 75 is EX_TEMPFAIL of sysexits.h: "try again later".
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised by `train.run` after the checkpoint of `step` is safely written."""

    def __init__(self, step: int, workdir: str):
        super().__init__(f"Preempted: saved the checkpoint of step {step} in {workdir} and stopped. "
                         "Rerun the same command to continue.")
        self.step = step


class Watch:
    """`reached(step)` is True once a preemption notice has arrived. Use as a context manager."""

    def __init__(self, mngr, say=print):
        self._mngr, self._say = mngr, say
        self._signalled = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
        if self._signalled:
            self._say("SIGTERM again: already saving the checkpoint; ignored.")
            return
        self._signalled = True
        self._say("SIGTERM: finishing this step, then saving a checkpoint and exiting "
                  f"with status {EXIT_PREEMPTED}.")

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self._mngr.reached_preemption(step)
        return self._signalled
