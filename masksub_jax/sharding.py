"""The device mesh and where each array lives on it.

Mesh axes: `data` (the batch is split over it) and `fsdp` (the batch is split over it too, and so
are the large parameters and optimizer moments, ZeRO-3 style: XLA gathers a weight where it is
used). With fsdp = 1 (the default) every device holds the whole state: plain data parallelism.
"""
import glob
import os
import sys
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Arrays smaller than this many elements are replicated: sharding them saves little memory and
# costs a collective each.
MIN_SHARDED_SIZE = 2**14

# Device files that say a GPU or TPU is attached to this machine, whatever JAX runs on.
ACCELERATOR_FILES = {"GPU": ("/dev/nvidia[0-9]*",), "TPU": ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")}
EXTRA_FOR = {"GPU": "cuda", "TPU": "tpu"}


def describe_devices() -> str:
    """What the run computes on, for its first lines: a CPU-only jax on a GPU node is easy to miss."""
    devices = jax.devices()
    return (f"JAX {jax.__version__}, backend {jax.default_backend()}: {len(devices)} device(s) "
            f"({devices[0].device_kind}) in {jax.process_count()} process(es).")


def topology(mesh: Mesh) -> dict:
    """What a session trains on, as goodput's session records keep it."""
    return {"devices": jax.device_count(), "processes": jax.process_count(), "platform": jax.default_backend(),
            "mesh": {name: int(size) for name, size in mesh.shape.items()}}


def describe_topology_change(now: dict, before: dict) -> str | None:
    """One line when a resumed run trains on other devices than its last session did, else None.
    The batches and the data order are the same on any: only the float reductions' order differs."""
    def said(t):
        mesh = " x ".join(f"{name} {size}" for name, size in t["mesh"].items())
        return f"{t['devices']} {t['platform']} device(s) in {t['processes']} process(es), mesh {mesh}"
    keys = ("devices", "processes", "platform", "mesh")
    if all(now.get(k) == before.get(k) for k in keys) or "devices" not in before:
        return None
    return (f"Resumed on {said(now)}; the run last trained on {said(before)}. The batches and the data order "
            "are the same; only the order of float reductions differs.")


def unused_accelerator(backend: str, accelerator_files=ACCELERATOR_FILES) -> str | None:
    """A warning when this machine has a GPU or TPU but JAX runs on the CPU (unless JAX_PLATFORMS=cpu
    asks for that): the jax installed has no support for it."""
    if backend != "cpu" or os.environ.get("JAX_PLATFORMS", "").lower() == "cpu":
        return None
    for kind, patterns in accelerator_files.items():
        found = sorted(path for pattern in patterns for path in glob.glob(pattern))
        if found:
            return (f"WARNING: this machine has a {kind} ({found[0]}) but JAX runs on the CPU: the jax installed "
                    f"has no {kind} support. Install with `pip install -e '.[{EXTRA_FOR[kind]}]' -c constraints.txt` "
                    "(README: Installing), or set JAX_PLATFORMS=cpu to train on the CPU.")
    return None


def make_mesh(fsdp: int, devices=None) -> Mesh:
    """All devices (or `devices`: a TPU slice described ahead of time, masksub_jax/plan.py) as
    (data, fsdp), fsdp the fastest-varying (neighbouring devices share weights)."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices.")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def to_global(batch: dict, batch_sharding: NamedSharding) -> dict:
    """This process's share of a global batch as global arrays laid out by `batch_sharding`."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_sharding(abstract_state, mesh: Mesh):
    """Per leaf: its largest dimension that `fsdp` divides is split over `fsdp`; small leaves and
    those with no such dimension are replicated."""
    fsdp = mesh.shape["fsdp"]

    def rule(leaf):
        if fsdp == 1 or leaf.size < MIN_SHARDED_SIZE:
            return replicated(mesh)
        for dim in sorted(range(leaf.ndim), key=lambda d: -leaf.shape[d]):
            if leaf.shape[dim] % fsdp == 0:
                return NamedSharding(mesh, P(*(("fsdp" if d == dim else None) for d in range(leaf.ndim))))
        return replicated(mesh)
    return jax.tree.map(rule, abstract_state)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, *, cluster: bool = False,
                           environ=os.environ) -> bool:
    """Starts JAX's multi-process runtime where the run has several processes; True if it did.

    Explicit: all three arguments. `cluster`: JAX's own detection decides everything (Cloud TPU VMs
    and pod slices, SLURM, Open MPI); under SLURM that is one process per GPU, each bound to the GPU of
    its local rank. Without either, a SLURM step of several tasks is detected the same way.
    Then a watchdog ends this process promptly if another one is lost (`watch_peers`).
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together; give all three.")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif cluster or int(environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # the cluster tells JAX the coordinator, the count and the index
    else:
        return False
    if jax.process_count() > 1:
        watch_peers()
    return True


def barrier(name: str) -> None:
    """Every process waits here for all the others (nothing to do with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# A process whose heartbeat is this old is taken for lost. JAX's own limit (100 s) ends the survivors
# with SIGABRT after a long wait; this ends them first, with status 1 and a message.
LOST_AFTER_S = 20.0
_HEARTBEAT_S = 1.0
_HEARTBEAT_KEY = "masksub_jax/heartbeat/"
EXIT_LOST_PEER = 1
_watchdog_stop = threading.Event()
_watchdog = []  # the running watchdog thread, if any


def watch_peers(lost_after_s: float = LOST_AFTER_S, exit_fn=os._exit) -> threading.Thread:
    """A daemon thread that writes this process's heartbeat into JAX's coordination service and
    reads everyone's: a peer silent for `lost_after_s` (or the service gone: process 0, which runs it,
    is lost) ends this process with status 1 and a line naming the lost process. Collectives with a
    dead peer would otherwise block until JAX aborts the process."""
    from jax._src import distributed  # the runtime's client
    client, me, count = distributed.global_state.client, jax.process_index(), jax.process_count()
    # Each beat reads every process's key: on a large pod, beat less often to spare the coordinator.
    interval = _HEARTBEAT_S * max(1.0, count / 64)
    lost_after_s = max(lost_after_s, 5 * interval)

    def lost(process: int, how: str):
        print(f"error: lost process {process} of {count} ({how}): it died, or its host went down or "
              f"off the network. Process {me} stops too (exit {EXIT_LOST_PEER}); restart the whole run "
              "with the same command to resume from the newest checkpoint.", file=sys.stderr, flush=True)
        exit_fn(EXIT_LOST_PEER)

    def beat():
        beats, seen = 0, {p: (None, time.monotonic()) for p in range(count) if p != me}
        while not _watchdog_stop.is_set():
            beats += 1
            try:
                client.key_value_set(f"{_HEARTBEAT_KEY}{me}", str(beats), allow_overwrite=True)
                values = dict(client.key_value_dir_get(_HEARTBEAT_KEY))
            except Exception as e:
                if _watchdog_stop.is_set():
                    return None
                if me != 0:
                    return lost(0, f"the coordination service it runs stopped answering: {type(e).__name__}")
                raise
            now = time.monotonic()
            for process, (value, since) in seen.items():
                current = values.get(f"{_HEARTBEAT_KEY}{process}")
                if current != value:
                    seen[process] = (current, now)
                elif current != "done" and now - since > lost_after_s:
                    return lost(process, f"no heartbeat for {now - since:.0f} s")
            time.sleep(interval)

    thread = threading.Thread(target=beat, name="masksub-peer-watchdog", daemon=True)
    thread.start()
    _watchdog.append(thread)
    return thread


def await_lost_peer(error: Exception) -> None:
    """A runtime error in a multi-process run is most often a collective whose peer died: give the
    watchdog the time to name that peer (it ends the process) before the error is reported as is."""
    if several_processes() and isinstance(error, jax.errors.JaxRuntimeError) and _watchdog:
        _watchdog[0].join(timeout=LOST_AFTER_S + 5 * _HEARTBEAT_S)


def leaving_normally() -> None:
    """Tells the other processes' watchdogs that this one's silence from now on is not a loss, and
    stops this one's (JAX's shutdown, next, closes the coordination service)."""
    _watchdog_stop.set()
    for thread in _watchdog:
        thread.join(timeout=10 * _HEARTBEAT_S)  # its last heartbeat must not land after "done"
    if several_processes():
        from jax._src import distributed
        distributed.global_state.client.key_value_set(f"{_HEARTBEAT_KEY}{jax.process_index()}", "done",
                                                      allow_overwrite=True)


def several_processes() -> bool:
    """Whether this is one of several processes (False before JAX's runtime is up)."""
    from jax._src import distributed
    return distributed.global_state.client is not None and jax.process_count() > 1


def process_label() -> str:
    """' [process I of N]' in a multi-process run, else ''; for lines that every process prints."""
    return f" [process {jax.process_index()} of {jax.process_count()}]" if several_processes() else ""
