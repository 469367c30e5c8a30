"""Command line: `python -m masksub_jax.main --config=configs/digits.py --workdir=runs/digits`.

`--config.KEY=VALUE` overrides any key of the config; unknown keys are rejected. Running the same
command again resumes from the newest checkpoint in the workdir.

Several processes (one per host): on Cloud TPU VMs and under SLURM, JAX finds the other processes by
itself; elsewhere give every process --coordinator_address=HOST:PORT (process 0's), --num_processes
and its --process_id. Process 0 writes the logs and metrics; every process writes its checkpoint shards.

Exit status: 0 when the run is finished; 75 when it was told to stop (SIGTERM, a TPU preemption
notice) and saved a checkpoint first, so rerunning the same command continues it; 1 on an error.
"""
import os
import sys

from masksub_jax import allocator

allocator.reexec_with_tcmalloc()  # before anything allocates; a no-op where there is no tcmalloc
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is only our input pipeline

from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from masksub_jax import preemption, sharding, train  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_b.py[:epochs=800].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the summary go.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs that JAX "
                    "does not detect by itself (TPU VMs and SLURM are detected).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # progress is printed; library INFO logs only on request
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    try:
        train.run(f.config, f.workdir)
    except preemption.Preempted as e:
        print(e, flush=True)
        sys.exit(preemption.EXIT_PREEMPTED)


if __name__ == "__main__":
    app.run(main)
