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

from masksub_jax import allocator, preemption

allocator.reexec_with_tcmalloc()  # before anything allocates; a no-op where there is no tcmalloc
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is only our input pipeline
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
    # JAX and TensorFlow load here, after the SIGTERM handler is in place.
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
        _report(e, f.workdir, f.verbose, sharding.process_label())
        _exit_now(1, sharding)
    sharding.leaving_normally()


def _divert_library_errors(workdir: str) -> None:
    """Orbax's writer threads and asyncio log each failure of a background write (a full disk: dozens
    of tracebacks) and the trainer then reports it in its own words; their records, failed threads'
    tracebacks and ignored exceptions go to errors.log, not the console."""
    def to_log(text: str) -> None:
        _append_error_log(workdir, "", text)

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


def _report(error: Exception, workdir: str, verbose: bool, process: str) -> None:
    """The traceback into WORKDIR/errors.log (and the console with --verbose); the message last."""
    trace = "".join(traceback.format_exception(error))
    log = _append_error_log(workdir, process, trace)
    if verbose:
        print(trace, file=sys.stderr, end="")
    where = f" (traceback: {log})" if log and not verbose else ""
    name = "" if isinstance(error, (ValueError, OSError, FloatingPointError)) else f"{type(error).__name__}: "
    print(f"error{process}: {name}{error}{where}", file=sys.stderr, flush=True)


def _append_error_log(workdir: str, process: str, trace: str) -> str | None:
    """WORKDIR/errors.log where the workdir exists (a failed first start creates none), else one in
    the temporary directory."""
    import tempfile
    import time

    from masksub_jax import workdir as workdir_lib
    try:
        folder = workdir_lib.path(workdir)
        log = folder / "errors.log" if folder.exists() else (
            workdir_lib.path(tempfile.gettempdir()) / "masksub_jax_errors.log")
        old = log.read_text() if log.exists() else ""
        workdir_lib.write_text(log, f"{old}--- {time.strftime('%Y-%m-%d %H:%M:%S')}{process}\n{trace}")
        return str(log)
    except Exception:  # an unwritable workdir may be the error itself
        return None


def parse_flags(argv):
    """absl's flag parsing; a bad flag or config ends the process with one line (exit 1)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:
        print(f"error: {_flag_error_message(e, argv)}", file=sys.stderr, flush=True)
        sys.exit(1)


def _flag_error_message(error: Exception, argv) -> str:
    from masksub_jax import config as config_lib
    known = dict(config_lib.flatten(config_lib.base()))
    for arg in argv[1:]:
        key = arg[len("--config."):].partition("=")[0] if arg.startswith("--config.") else None
        if key is not None and key not in known:
            return config_lib.unknown_key_message(key)
    text = str(error)
    if "Error whilst parsing config file" in text:  # ml_collections puts the config's traceback in it
        return f"{text.strip().splitlines()[-1]} (from the config file)"
    return f"{text} (see --helpfull)" if isinstance(error, flags.Error) else f"{type(error).__name__}: {text}"


if __name__ == "__main__":
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:
        print("Interrupted (Ctrl-C) during start-up.", flush=True)
        sys.exit(preemption.EXIT_INTERRUPTED)
