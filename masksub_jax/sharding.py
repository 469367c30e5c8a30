"""The device mesh and where each array lives on it.

Mesh axes: `data` (the batch is split over it) and `fsdp` (the batch is split over it too, and so
are the large parameters and optimizer moments, ZeRO-3 style: XLA gathers a weight where it is
used). With fsdp = 1 (the default) every device holds the whole state: plain data parallelism.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Arrays smaller than this many elements are replicated: sharding them saves little memory and
# costs a collective each.
MIN_SHARDED_SIZE = 2**14


def make_mesh(fsdp: int) -> Mesh:
    """All devices as (data, fsdp), fsdp the fastest-varying (neighbouring devices share weights)."""
    devices = jax.devices()
    if len(devices) % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices.")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


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


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, environ=os.environ) -> bool:
    """Starts JAX's multi-process runtime where the run has several processes; True if it did.

    Explicit: all three arguments. Detected: SLURM with several tasks, a Cloud TPU pod slice.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together; give all three.")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if int(environ.get("SLURM_NTASKS", "1")) > 1 or "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # the cluster tells JAX the coordinator, the count and the index
        return True
    return False
