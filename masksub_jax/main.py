"""Command line: `python -m masksub_jax.main --config=configs/digits.py --workdir=runs/digits`.

`--config.KEY=VALUE` overrides any key of the config; unknown keys are rejected. Running the same
command again resumes from the newest checkpoint in the workdir.

Several processes (one per host, or under SLURM one per GPU): `--cluster` lets JAX's own detection
find the others (Cloud TPU VMs and pod slices, SLURM, Open MPI; the launch scripts pass it, and a
SLURM step of several tasks is detected without it); elsewhere give every process
--coordinator_address=HOST:PORT (process 0's), --num_processes and its --process_id. Process 0
writes the logs and metrics; every process writes its checkpoint shards.

Exit status: 0 when the run is finished; 75 when it was told to stop (SIGTERM, a TPU preemption
notice), having saved what it trained, so rerunning the same command continues it; 130 after Ctrl-C
(the checkpoint write in flight is finished first); 1 on an error, with the message as the last
line and the traceback in WORKDIR/errors.log (before the workdir exists, in
$TMPDIR/masksub_jax_errors.log; printed too with --verbose), or when another process of the run is lost.
"""
import os
import sys

from masksub_jax import allocator, cli, preemption

allocator.reexec_with_tcmalloc()  # before anything allocates; a no-op where there is no tcmalloc
preemption.stop_on_sigterm()  # before anything slow: a scheduler's SIGTERM during start-up still means 75

import logging as std_logging  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Unlocked, so that a mistyped key reaches config.validate, which names it and the closest known one.
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_b.py[:epochs=800].",
                                lock_config=False, accept_new_attributes=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the summary go.")
flags.DEFINE_bool("cluster", False, "Start JAX's multi-process runtime as JAX's cluster detection says "
                  "(Cloud TPU VMs and pod slices, SLURM, Open MPI). The launch scripts pass it.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs that JAX "
                    "does not detect by itself.")
flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 (with --coordinator_address).")
flags.DEFINE_bool("verbose", False, "On an error, print its traceback too (it always goes to WORKDIR/errors.log).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # progress is printed; library INFO logs only on request
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    # The config, init_from's path included, checked in seconds: before the data and JAX's devices
    # (train.run checks it again with the device count).
    from masksub_jax import config as config_lib
    with cli.errors_in_one_line(f.workdir, verbose=f.verbose):
        config_lib.validate(f.config, num_devices=None)
    # TensorFlow and JAX's backend load here, after the SIGTERM handler is in place.
    from masksub_jax import sharding, train
    _divert_library_errors(f.workdir)
    try:
        sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, cluster=f.cluster)
        train.run(f.config, f.workdir)
    except preemption.Preempted as e:
        print(e, flush=True)
        sharding.leaving_normally()
        sys.exit(preemption.EXIT_PREEMPTED)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not cut the exit short
        print("Interrupted (Ctrl-C); any checkpoint write in flight was finished first. Rerun the same command "
              "to resume from the newest checkpoint.", flush=True)
        _exit_now(preemption.EXIT_INTERRUPTED, sharding)
    except Exception as e:  # every error ends in one readable line
        sharding.await_lost_peer(e)
        cli.report(e, f.workdir, verbose=f.verbose, process=sharding.process_label())
        _exit_now(1, sharding)
    sharding.leaving_normally()


def _divert_library_errors(workdir: str) -> None:
    """Orbax's writer threads and asyncio log each failure of a background write (a full disk: dozens
    of tracebacks) and the trainer then reports it in its own words; their records, failed threads'
    tracebacks and ignored exceptions go to errors.log, not the console."""
    def to_log(text: str) -> None:
        cli.append_error_log(workdir, "", text)

    class ErrorsToLog(std_logging.Filter):
        def filter(self, record):
            if record.levelno < std_logging.ERROR:
                return True
            to_log(std_logging.Formatter().format(record))
            return False
    for handler in std_logging.getLogger().handlers:
        handler.addFilter(ErrorsToLog())
    threading.excepthook = lambda a: to_log("".join(traceback.format_exception(a.exc_type, a.exc_value,
                                                                               a.exc_traceback)))
    sys.unraisablehook = lambda u: to_log(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n" + "".join(
        traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))


def _exit_now(status: int, sharding) -> None:
    """With several processes, leave without JAX's shutdown barrier, which would wait minutes for the
    peers that this failure leaves waiting; their watchdogs end them (sharding.watch_peers)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if sharding.several_processes():
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    try:
        app.run(main, flags_parser=cli.parse_flags)
    except KeyboardInterrupt:
        print("Interrupted (Ctrl-C) during start-up.", flush=True)
        sys.exit(preemption.EXIT_INTERRUPTED)
