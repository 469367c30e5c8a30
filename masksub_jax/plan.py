"""Know before you book the pod: the train and eval steps of a config compiled ahead of time for a
TPU slice, with their memory per chip, FLOPs and step time.

  python -m masksub_jax.plan --config=configs/vit_l.py --topology=v5p-64
  python -m masksub_jax.plan --config=configs/vit_b.py --topology=v5e:4x4 --find_batch [--mfu=0.4]
  python -m masksub_jax.plan --config=configs/vit_b.py --topology=local     # this machine's GPU(s)

The slice is described by libtpu (`jax.experimental.topologies`; needs the `tpu` extra, on any machine,
no TPU needed: `pip install -e '.[tpu]' -c constraints.txt` in a venv of its own, since with libtpu
installed JAX tries the TPU first). Its devices go into the trainer's mesh (`sharding.make_mesh`), and
the trainer's own steps (`step.make_train_step`, `step.make_eval_step`) are lowered with the trainer's
shardings, the config's global batch and dtype, and compiled by XLA's TPU compiler. Per chip:
arguments (the state's shard and the batch's), temporaries, and the total the step needs
(arguments + outputs + temporaries - what the donated state's buffers are reused for; the eval step
also counts the state it does not take, which stays in HBM), against the chip's HBM; the step's
FLOPs (the model's count: 3x the forward of both branches, as `bench` counts them; XLA's own count
beside it), and the step time and images/s at --mfu. When it does not fit, it says by how much and
which remat, accum_steps and mesh.fsdp settings would fit; --find_batch searches the largest global
batch that fits. It reads no data: the image shape and class count come from the config
(imagenet2012: 1000 classes; other data sets need --num_classes).

GPUs cannot be planned this way: XLA's GPU compiler needs the GPU it compiles for. On a GPU machine,
--topology=local prints the same report from the real devices (their memory limit as JAX reports it).

Example (jax 0.10.2, libtpu 0.0.42.1, on a CPU-only machine of 2 cores, quiet; XLA's TPU compiler
took 145 s here, most of it the train step):

  $ python -m masksub_jax.plan --config=configs/vit_b.py --topology=v5e-8
  Plan: ViT-B/16 at 192 px, 1000 classes, MaskSub masking 0.5, float32, global batch 2048 (accum_steps 1), ...
  Target: v5e-8 = TPU v5e 2x4: 8 chips, 16 GiB HBM and 197 TFLOP/s bf16 each
  Compiling the train and eval steps for v5e-8 with XLA's TPU compiler (ViT-B took 2.4 min on 2 CPU cores, ...
  Compiled the train and eval steps in 145.4 s (jax 0.10.2).
  HBM per chip                      train step     eval step
    arguments (state + batch)         0.99 GiB      0.34 GiB
    outputs not donated               0.00 GiB      0.00 GiB
    temporaries                      13.88 GiB      0.75 GiB
    state held, not an argument       0.00 GiB      0.64 GiB
    total                            14.87 GiB      1.73 GiB
    the train state: 0.97 GiB in all, 0.97 GiB per chip on mesh data=8 x fsdp=1
    capacity 16.00 GiB: needs 14.87 GiB (93%)
  FLOPs per step per chip: 29.450 TFLOP (the model's 3x forward count), XLA counts 33.663 TFLOP
  At 40% MFU (197 TFLOP/s peak per chip): 373.7 ms per step, 5,480 images/s for the global batch of 2048
  Fits: 1.13 GiB to spare per chip.

Where the compile time goes (BENCHMARKS.md): the TPU backend's passes over a program with every
block of both branches unrolled; a lower optimisation effort compiles 4x faster but plans 26% more
temporaries than the trainer's step, so it is not used. ViT's scanned blocks (model.scan) compile one
block (4x faster side by side on ViT-Ti): with --config.model.scan=True --config.model.remat=True the
ViT-B plan above took 90 s here instead of 145 s,
needing 8.13 GiB per chip (XLA's FLOP count then has a loop's body once, so it is not shown).

What the compiler said about each step is kept in ~/.cache/masksub_jax/plans (--cache_dir; '' keeps
nothing), keyed by all the compile depends on (plan_cache): the same plan again, say with --find_batch
after a plain plan, reads it back (the ViT-B plan above: 3.6 s instead of 162 s).

Only one process at a time may load libtpu (/tmp/libtpu_lockfile); ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets
plans run side by side.
"""
from masksub_jax import cli  # noqa: I001  (first: it quiets TensorFlow's C++ logging before TF loads)

import concurrent.futures
import dataclasses
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax import config as config_lib
from masksub_jax import flops as flops_lib
from masksub_jax import models, plan_cache, sharding
from masksub_jax import step as step_lib
from masksub_jax.augment import spec

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation. Capacities and peaks are Cloud TPU's published per-chip figures:
    https://cloud.google.com/tpu/docs/v4 (32 GiB HBM2, 275 TFLOP/s bf16),
    https://cloud.google.com/tpu/docs/v5e (16 GB HBM2, 197 TFLOP/s bf16),
    https://cloud.google.com/tpu/docs/v5p (95 GiB HBM2e usable of 96, 459 TFLOP/s bf16),
    https://cloud.google.com/tpu/docs/v6e (32 GB HBM, 918 TFLOP/s bf16).
    The v5e and v6e pages write GB for the same 2^30-byte units the chips have (as v4's page says GiB)."""
    name: str
    libtpu_name: str  # what libtpu's topology descriptions call it ("v5" is v5p)
    device_kind: str  # jax's Device.device_kind on it
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip; float32 matmuls run as bf16 passes on the MXU
    cores_in_name: int  # v4-N and v5p-N count TensorCores (two per chip); v5e-N and v6e-N count chips
    dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    chip_config: str  # "megacore": one JAX device per chip of two TensorCores (as on the real slice)


_PEAK = {kind: peaks["bfloat16"] for kind, peaks in flops_lib.PEAK_FLOPS.items()}
CHIPS = {
    "v4": Chip("v4", "v4", "TPU v4", 32 * GiB, _PEAK["TPU v4"], 2, 3, "megacore"),
    "v5p": Chip("v5p", "v5", "TPU v5", 95 * GiB, _PEAK["TPU v5"], 2, 3, "megacore"),
    "v5e": Chip("v5e", "v5e", "TPU v5 lite", 16 * GiB, _PEAK["TPU v5 lite"], 1, 2, "default"),
    "v6e": Chip("v6e", "v6e", "TPU v6 lite", 32 * GiB, _PEAK["TPU v6 lite"], 1, 2, "default"),
}
KIND_ALIASES = {"v5litepod": "v5e"}

# Chips -> slice shape of the accelerator types, from Cloud TPU's configuration tables
# (https://cloud.google.com/tpu/docs/v5e#configurations, .../v6e, .../v5p#configurations, .../v4):
# v5e and v6e are 2D (v5litepod-16 = 4x4), v4 and v5p 3D (v5p-64 = 64 TensorCores = 32 chips = 2x4x4).
SHAPES = {
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
        512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)},
}
FORMS = ("v4-N or v5p-N (N TensorCores, two per chip: v5p-64 is 32 chips), v5litepod-N, v5e-N or v6e-N "
         "(N chips), KIND:AxB or KIND:AxBxC (chips per side, e.g. v5e:4x4, v5p:2x4x4; 2D for v5e and v6e, 3D for "
         "v4 and v5p), or local (this machine's devices)")

# Classes of the TFDS data sets whose size is known without reading them.
KNOWN_CLASSES = {"imagenet2012": 1000, "imagenet2012_real": 1000, "imagenet_v2": 1000, "imagenette": 10}
KNOWN_TRAIN_EXAMPLES = {"imagenet2012": 1_281_167}

@dataclasses.dataclass(frozen=True)
class Target:
    """What --topology names: a TPU slice (chip and shape) or, with chip None, this machine's devices."""
    name: str
    chip: Chip | None = None
    shape: tuple = ()

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    def describe(self) -> str:
        if self.chip is None:
            return "this machine's devices"
        cores = f" ({self.chips * 2} TensorCores)" if self.chip.cores_in_name == 2 else ""
        return (f"TPU {self.chip.name} {'x'.join(map(str, self.shape))}: {self.chips} chips{cores}, "
                f"{self.chip.hbm_bytes / GiB:.0f} GiB HBM and {self.chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each")


def parse_topology(name: str) -> Target:
    """--topology as Cloud TPU names slices; ValueError naming the forms for anything else."""
    text = name.strip().lower()
    if text == "local":
        return Target("local")
    if re.search(r"gpu|cuda|^[ahbl]\d{2,3}", text):
        raise ValueError(f"--topology={name}: GPUs cannot be planned without the GPU (XLA's GPU compiler needs the "
                         "device it compiles for); run with --topology=local on the GPU machine.")
    if m := re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", text):
        chip = CHIPS[KIND_ALIASES.get(m[1], m[1])]
        count = int(m[2])
        chips, odd = divmod(count, chip.cores_in_name)
        if odd or chips not in SHAPES[chip.dims]:
            sizes = ", ".join(str(n * chip.cores_in_name) for n in SHAPES[chip.dims])
            raise ValueError(f"--topology={name}: {m[1]} slices come as {m[1]}-N with N in {sizes}; for another "
                             f"shape give {chip.name}:{'AxBxC' if chip.dims == 3 else 'AxB'} (chips per side).")
        return Target(name, chip, SHAPES[chip.dims][chips])
    if m := re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e):(\d+(?:x\d+)+)", text):
        chip = CHIPS[KIND_ALIASES.get(m[1], m[1])]
        shape = tuple(int(s) for s in m[2].split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise ValueError(f"--topology={name}: {chip.name} slices are {chip.dims}D, e.g. "
                             f"{chip.name}:{'x'.join(map(str, SHAPES[chip.dims][4]))}.")
        return Target(name, chip, shape)
    raise ValueError(f"--topology={name} is not a slice name; use {FORMS}.")


def topology_args(target: Target) -> dict:
    """What libtpu is asked to describe for a slice (`jax.experimental.topologies.get_topology_desc`)."""
    shape = target.shape + (1,) * (3 - len(target.shape))
    host = tuple(min(side, bound) for side, bound in zip(shape, (2, 2, 1)))  # chips per host, as MaxText's AOT
    wrap = tuple(side >= 4 for side in shape) if target.chips >= 64 else (False,) * 3  # full cubes are tori
    return dict(platform="tpu", topology_name=target.topology_name, chip_config_name=target.chip.chip_config,
                chips_per_host_bounds=host, num_slices=1, wrap=wrap)


def slice_devices(target: Target) -> list:
    """The slice's devices as libtpu describes them (compile-only: nothing runs on them), or this
    machine's devices for `local`."""
    if target.chip is None:
        return jax.devices()
    from jax.experimental import topologies
    # libtpu asks the VM's metadata for these; off a TPU VM it warns at length without them.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
    try:
        devices = topologies.get_topology_desc(**topology_args(target)).devices
    except RuntimeError as e:  # jax's "JAX TPU support not installed", or libtpu refusing the shape
        if "not installed" in str(e):
            raise cli.CommandError("planning for a TPU slice needs libtpu: pip install -e '.[tpu]' -c constraints.txt "
                                   "in a venv of its own (with libtpu installed, JAX tries the TPU first).") from None
        if "lockfile" in str(e):
            raise cli.CommandError("another process has libtpu loaded (/tmp/libtpu_lockfile): wait for it, or set "
                                   "ALLOW_MULTIPLE_LIBTPU_LOAD=1 to plan beside it.") from None
        raise ValueError(f"--topology={target.name}: libtpu does not describe {target.topology_name}: {e}") from None
    if len(devices) != target.chips:
        raise RuntimeError(f"libtpu described {len(devices)} devices for {target.topology_name}, not {target.chips}.")
    return list(devices)


def capacity_and_peak(target: Target, devices: list, dtype: str) -> tuple[int | None, float | None]:
    """HBM bytes and peak FLOP/s per device: the table's for a slice; for local devices what JAX
    reports as the memory limit (CPU: the machine's memory shared by its devices) and a known peak."""
    if target.chip is not None:
        return target.chip.hbm_bytes, target.chip.peak_flops
    device = devices[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        capacity = int(stats["bytes_limit"])
    elif device.platform == "cpu":
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
    else:
        capacity = None
    chip = next((c for c in CHIPS.values() if c.device_kind.lower() == device.device_kind.lower()), None)
    if chip is not None:
        return capacity, chip.peak_flops
    return capacity, flops_lib.peak_flops(device.device_kind, dtype)


def data_shape(config, num_classes: int | None = None) -> tuple[tuple, int]:
    """(image shape, classes) of the config's data without reading it; `num_classes` overrides."""
    d = config.data
    image_shape = (d.image_size, d.image_size, len(d.mean))
    if num_classes:
        return image_shape, num_classes
    if d.source == "synthetic":
        return image_shape, d.num_classes
    if d.source == "digits":
        return image_shape, 10
    if d.source == "tfds" and d.name.partition("/")[0].partition(":")[0] in KNOWN_CLASSES:
        return image_shape, KNOWN_CLASSES[d.name.partition("/")[0].partition(":")[0]]
    raise ValueError(f"The class count of data.source={d.source!r} (data.name={d.name!r}) is not known without "
                     "reading the data; give it with --num_classes.")


def train_batch_spec(config, batch: int, image_shape: tuple) -> dict:
    """Shapes and dtypes of a global train batch as the input pipeline hands it to the step."""
    if spec.on_device(config.data):  # crops on canvases and their sizes; the step resizes them
        canvas = spec.canvas_size(config.data)
        return {"image": jax.ShapeDtypeStruct((batch, canvas, canvas, image_shape[-1]), jnp.uint8),
                "crop_size": jax.ShapeDtypeStruct((batch, 2), jnp.int32),
                "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    return {"image": jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}


def eval_batch_spec(batch: int, image_shape: tuple) -> dict:
    return {"image": jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32), "mask": jax.ShapeDtypeStruct((batch,), jnp.float32)}


def _placed(specs, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs, shardings)


def bytes_per_device(specs, shardings) -> int:
    """Bytes one device holds of arrays laid out by `shardings` (the largest shard: uneven splits)."""
    return sum(math.prod(sh.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
               for s, sh in zip(jax.tree.leaves(specs), jax.tree.leaves(shardings)))


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's buffer assignment of a compiled step, bytes per device. `resident`: state the step does
    not take but that stays in HBM meanwhile (the optimizer state during evaluation)."""
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    resident: int = 0

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.resident

    @classmethod
    def of(cls, outcome: plan_cache.Outcome, resident: int = 0) -> "StepMemory":
        return cls(outcome.arguments, outcome.outputs, outcome.aliased, outcome.temporaries, resident)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One compiled configuration on one target, per device."""
    batch: int
    devices: int
    mesh: dict
    state_bytes: int  # the whole train state
    state_bytes_per_device: int  # its shard on one device per the trainer's shardings
    train: StepMemory
    eval: StepMemory | None
    capacity: int | None
    peak_flops: float | None
    flops: float | None  # model FLOPs per step, whole batch
    xla_flops: float | None  # XLA's count for one device's program
    compile_s: float  # to compile the steps, or to read what the compiler said from the plan cache
    out_of_memory: str | None = None  # XLA's TPU compiler refused a step: "train step: " or "eval step: " its message
    cached: bool = False  # what the compiler said was read from the plan cache, not compiled now

    @property
    def refused_step(self) -> str | None:
        """"train step" or "eval step" where XLA's compiler refused one, else None."""
        return self.out_of_memory.partition(": ")[0] if self.out_of_memory else None

    @property
    def needed(self) -> int:
        return max(self.train.total, self.eval.total if self.eval else 0)

    @property
    def fits(self) -> bool | None:
        if self.out_of_memory:
            return False
        return None if self.capacity is None else self.needed <= self.capacity

    def step_time(self, mfu: float) -> float | None:
        flops = self.flops / self.devices if self.flops else self.xla_flops
        return flops / (self.peak_flops * mfu) if flops and self.peak_flops else None


def plan(config, devices: list, *, num_classes: int, image_shape: tuple, capacity: int | None = None,
         peak_flops: float | None = None, evaluate: bool = True, cache: plan_cache.Cache | None = None) -> Plan:
    """Lowers and compiles the trainer's train (and eval) step for `config` on a mesh of `devices`, the
    two side by side (more host memory; on spare cores the eval step compiles behind the train step);
    what the compiler says is kept in and read from `cache`."""
    config_lib.validate(config, num_devices=len(devices))  # the trainer's checks against the device count
    mesh = sharding.make_mesh(config.mesh.fsdp, devices)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    model = step_lib.make_model(config, num_classes)
    # The schedule's constants change no shape: the compiled step is the same for any run length.
    tx, schedule = step_lib.make_optimizer(config, total_steps=config.total_steps or 1000, steps_per_epoch=100)
    init = step_lib.make_init(model, tx, image_shape, ema=bool(config.ema.decay))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    abstract_state = jax.eval_shape(init, rng)
    state_sharding = sharding.state_sharding(abstract_state, mesh)
    state_bytes = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(abstract_state))
    state_per_device = bytes_per_device(abstract_state, state_sharding)

    start = time.perf_counter()
    train_step = jax.jit(step_lib.make_train_step(config, model, tx, schedule, num_classes),
                         in_shardings=(state_sharding, batch_sharding, replicated),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    batch = train_batch_spec(config, config.batch_size, image_shape)
    batch_shardings = jax.tree.map(lambda _: batch_sharding, batch)
    lowered = train_step.lower(_placed(abstract_state, state_sharding), _placed(batch, batch_shardings),
                               jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # XLA compiles without holding Python's lock
        if evaluate:
            variables_sharding = step_lib.variables(state_sharding)
            eval_step = jax.jit(step_lib.make_eval_step(config, model, num_classes),
                                in_shardings=(variables_sharding, batch_sharding), out_shardings=replicated)
            eval_batch = eval_batch_spec(config.eval_batch_size, image_shape)
            eval_batch_shardings = jax.tree.map(lambda _: batch_sharding, eval_batch)
            eval_lowered = eval_step.lower(_placed(step_lib.variables(abstract_state), variables_sharding),
                                           _placed(eval_batch, eval_batch_shardings))
            eval_future = pool.submit(_compile, eval_lowered, devices, cache)
        train, cached = _compile(lowered, devices, cache)
        if evaluate:
            evaluation, eval_cached = eval_future.result()
            cached = cached and eval_cached
    flops = flops_lib.step_flops(config, num_classes)
    common = dict(batch=config.batch_size, devices=len(devices), mesh=dict(mesh.shape), state_bytes=state_bytes,
                  state_bytes_per_device=state_per_device, capacity=capacity, peak_flops=peak_flops, flops=flops,
                  compile_s=time.perf_counter() - start, cached=cached)
    if train.out_of_memory:  # the eval step's outcome is not needed
        memory = StepMemory(arguments=state_per_device + bytes_per_device(batch, batch_shardings), outputs=0,
                            aliased=0, temporaries=_required_temporaries(train.out_of_memory))
        return Plan(**common, train=memory, eval=None, xla_flops=None,
                    out_of_memory="train step: " + train.out_of_memory)
    evaluation_memory = None
    if evaluate:
        variables_per_device = bytes_per_device(step_lib.variables(abstract_state), variables_sharding)
        not_taken = state_per_device - variables_per_device
        if evaluation.out_of_memory:
            common["out_of_memory"] = "eval step: " + evaluation.out_of_memory
            evaluation_memory = StepMemory(variables_per_device + bytes_per_device(eval_batch, eval_batch_shardings),
                                           0, 0, _required_temporaries(evaluation.out_of_memory), not_taken)
        else:
            evaluation_memory = StepMemory.of(evaluation, resident=not_taken)
    return Plan(**common, train=StepMemory.of(train), eval=evaluation_memory,
                xla_flops=None if config.model.scan else train.xla_flops)  # XLA counts a scanned loop's body once


def _compile(lowered, devices: list, cache: plan_cache.Cache | None) -> tuple[plan_cache.Outcome, bool]:
    """What the compiler says about `lowered`, and whether it was read from `cache`."""
    key = cache.key(lowered, devices) if cache else None
    if cache and (kept := cache.load(key)) is not None:
        return kept, True
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a step that cannot fit its HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        outcome = plan_cache.Outcome(out_of_memory=" ".join(str(e).split()))
    else:
        outcome = plan_cache.Outcome.of(compiled, flops_lib.xla_flops(compiled))
    if cache:
        cache.save(key, outcome)
    return outcome, False


def _required_temporaries(message: str) -> int:
    """The temporaries' bytes in XLA's out-of-memory message ("... required for HLO temporaries
    (32.14G) exceeds available HBM (15.75G)"); 0 where it names none."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    return int(float(m[1]) * 1024 ** "KMGT".index(m[2]) * 1024) if m else 0


def with_changes(config, **changes):
    """A copy of `config` with dotted keys changed ("model.remat": True)."""
    return config_lib.override(config.copy_and_resolve_references(), changes)


def find_batch(fits, unit: int, start: int, limit: int) -> tuple[int | None, int | None]:
    """The largest multiple of `unit` up to `limit` for which `fits(batch)` is True, taking memory to
    grow with the batch: doubling (or halving) from `start`, then bisection. Returns (largest that
    fits or None, smallest multiple tried that does not or None); when both are given they are
    `unit` apart, each one checked by `fits`. Where the activations do not dominate (tiny models)
    XLA's memory can fall as the batch grows; the two answers still hold, a larger batch might too."""
    start = max(unit, start // unit * unit)
    good, bad = None, None
    if fits(start):
        good = start
        while bad is None and good < limit:
            probe = min(good * 2, limit // unit * unit)
            if probe <= good:
                break
            if fits(probe):
                good = probe
            else:
                bad = probe
    else:
        bad = start
        while good is None and bad > unit:
            probe = max(unit, bad // 2 // unit * unit)
            if fits(probe):
                good = probe
            else:
                bad = probe
    if good is None or bad is None:
        return good, bad
    while bad - good > unit:
        middle = (good + bad) // 2 // unit * unit
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, bad


def alternatives(config, fits_with, num_devices: int) -> list[tuple[str, bool]]:
    """Settings that would make `config` fit, each one change tried by `fits_with(changes)`: remat,
    (ViT) scanned blocks with remat, the fewest accumulation micro-batches, the smallest mesh.fsdp;
    remat, accumulation and fsdp together if none alone does. [(flags, fits)] in that order."""
    found = []
    if not config.model.remat:
        found.append((_flags({"model.remat": True}), fits_with({"model.remat": True})))
    if config.model.family == "vit" and not config.model.scan:  # with remat, less memory than remat alone
        both = {"model.scan": True, "model.remat": True}
        found.append((_flags(both), fits_with(both)))
    per_device = config.batch_size // num_devices
    accums = [a for a in _doublings(config.accum_steps, per_device) if per_device % a == 0]
    fsdps = [f for f in _doublings(config.mesh.fsdp, num_devices) if num_devices % f == 0]
    for key, options in (("accum_steps", accums), ("mesh.fsdp", fsdps)):
        least = _least(options, lambda value, key=key: fits_with({key: value}))
        found.append((_flags({key: least}) if least else _flags({key: options[-1]}) if options else
                      f"--config.{key} (no larger setting possible)", least is not None))
    if not any(ok for _, ok in found) and (accums or fsdps):
        combined = {"model.remat": True, **({"accum_steps": accums[-1]} if accums else {}),
                    **({"mesh.fsdp": fsdps[-1]} if fsdps else {})}
        found.append((_flags(combined), fits_with(combined)))
    return found


def _doublings(current: int, limit: int) -> list[int]:
    """current*2, current*4, ... up to limit."""
    values, value = [], current * 2
    while value <= limit:
        values.append(value)
        value *= 2
    return values


def _least(options: list[int], fits) -> int | None:
    """The first of increasing `options` that fits (memory falling along them): bisection."""
    low, high = 0, len(options)
    while low < high:
        middle = (low + high) // 2
        if fits(options[middle]):
            high = middle
        else:
            low = middle + 1
    return options[low] if low < len(options) else None


def _flags(changes: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in changes.items())


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB // 10 or n == 0 else f"{n / 2**20:.2f} MiB"


def format_plan(p: Plan, mfu: float) -> list[str]:
    """The report's per-device lines."""
    rows = [("arguments (state + batch)", lambda m: m.arguments),
            ("outputs not donated", lambda m: m.outputs - m.aliased), ("temporaries", lambda m: m.temporaries),
            ("state held, not an argument", lambda m: m.resident), ("total", lambda m: m.total)]
    steps = [("train step", p.train)] + ([("eval step", p.eval)] if p.eval else [])
    lines = [f"{'HBM per chip':<30}" + "".join(f"{name:>14}" for name, _ in steps)]
    for label, value in rows:
        lines.append(f"  {label:<28}" + "".join(f"{_gib(value(m)):>14}" for _, m in steps))
    lines.append(f"  the train state: {_gib(p.state_bytes)} in all, {_gib(p.state_bytes_per_device)} per chip "
                 f"on mesh data={p.mesh['data']} x fsdp={p.mesh['fsdp']}")
    if p.capacity is not None:
        lines.append(f"  capacity {_gib(p.capacity)}: needs {_gib(p.needed)} ({p.needed / p.capacity:.0%})")
    per_device = p.flops / p.devices if p.flops else None
    xla = f"{p.xla_flops / 1e12:.3f} TFLOP" if p.xla_flops else "none"
    lines.append(f"FLOPs per step per chip: {per_device / 1e12:.3f} TFLOP (the model's 3x forward count), XLA counts "
                 f"{xla}" if per_device else f"FLOPs per step per chip: XLA counts {xla}")
    step_s = p.step_time(mfu)
    if step_s:
        lines.append(f"At {mfu:.0%} MFU ({p.peak_flops / 1e12:.0f} TFLOP/s peak per chip): {step_s * 1e3:.1f} ms per "
                     f"step, {p.batch / step_s:,.0f} images/s for the global batch of {p.batch}")
    else:
        lines.append("Step time: no peak FLOP/s known for this device.")
    return lines


def verdict(p: Plan) -> str:
    if p.out_of_memory:
        message = p.out_of_memory.partition(": ")[2]
        said = message.partition("RESOURCE_EXHAUSTED: ")[2] or message
        lower = "; a smaller --config.eval_batch_size would" if p.refused_step == "eval step" else ""
        return f"Does not fit: XLA's TPU compiler ran out of HBM for the {p.refused_step}: {said}{lower}"
    if p.fits is None:
        return "Fit unknown: JAX reports no memory limit for this device."
    if p.fits:
        return f"Fits: {_gib(p.capacity - p.needed)} to spare per chip."
    return f"Does not fit by {_gib(p.needed - p.capacity)} per chip."


def main(argv):
    from absl import flags, logging
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    with cli.errors_in_one_line(None, verbose=f.verbose):
        if len(argv) > 1:
            raise cli.CommandError(f"Unexpected arguments: {argv[1:]}")
        _plan_command(f)


def _plan_command(f) -> None:
    target = parse_topology(f.topology)
    if target.chip is not None:
        if "JAX_PLATFORMS" not in os.environ:
            jax.config.update("jax_platforms", "cpu")  # this machine computes nothing; libtpu only describes the slice
        # JAX's cache would write each TPU executable and then fail to load it (a compile-only client).
        jax.config.update("jax_enable_compilation_cache", False)
    config = f.config.copy_and_resolve_references()
    with config.unlocked():
        config.init_from = None  # the weights do not change what the steps need
    config_lib.validate(config, num_devices=None)
    image_shape, num_classes = data_shape(config, f.num_classes)
    devices = slice_devices(target)
    capacity, peak = capacity_and_peak(target, devices, config.model.dtype)
    if f.hbm_gib:
        capacity = int(f.hbm_gib * GiB)
    if capacity is None and f.find_batch:
        raise cli.CommandError(f"--find_batch needs the memory per device, which {f.topology}'s devices do not report: "
                               "give it with --hbm_gib=GIB.")
    described = repr(topology_args(target)) if target.chip else "local"
    cache = plan_cache.Cache(f.cache_dir, described) if f.cache_dir else None
    if cache and (why := plan_cache.unwritable(f.cache_dir)):
        if f.cache_dir != plan_cache.default_directory():
            raise cli.CommandError(f"--cache_dir={f.cache_dir} cannot hold the plan cache ({why}): give a directory "
                                   "you can write, or --cache_dir= to keep nothing.")
        print(f"warning: no plan cache: {f.cache_dir} cannot be written ({why}); --cache_dir=DIR gives another.",
              file=sys.stderr, flush=True)
        cache = None
    family = models.of(config)
    print(f"Plan: {family.describe(config)} at {config.data.image_size} px, {num_classes} classes, MaskSub "
          f"{config.masksub.mode} {config.masksub.ratio}, {config.model.dtype}, global batch {config.batch_size} "
          f"(accum_steps {config.accum_steps}), eval batch {config.eval_batch_size}, mesh.fsdp {config.mesh.fsdp}, "
          f"remat {config.model.remat}" + (", scanned blocks" if config.model.scan else ""), flush=True)
    print(f"Target: {f.topology} = {target.describe() if target.chip else sharding.describe_devices()}", flush=True)
    common = dict(num_classes=num_classes, image_shape=image_shape, capacity=capacity, peak_flops=peak,
                  cache=cache)
    if target.chip is not None:  # XLA's TPU compiler takes minutes on a small machine: say so before it starts
        print(f"Compiling the train and eval steps for {target.name} with XLA's TPU compiler unless the plan cache "
              "has them (ViT-B took 2.4 min on 2 CPU cores, 1.5 min with model.scan and model.remat)...", flush=True)
    base = plan(config, devices, **common)
    done = (f"Read what the compiler said from the plan cache ({f.cache_dir}; --cache_dir= compiles again) in "
            f"{base.compile_s:.1f} s"
            if base.cached else f"Compiled the train and eval steps in {base.compile_s:.1f} s")
    print(f"{done}: XLA's TPU compiler refused the {base.refused_step}, out of HBM (jax {jax.__version__})."
          if base.refused_step else f"{done} (jax {jax.__version__}).")
    print("\n".join(format_plan(base, f.mfu)))
    print(verdict(base), flush=True)
    eval_needs = base.eval.total if base.eval else 0

    def fits_with(changes: dict) -> bool:
        if changes == {"batch_size": config.batch_size}:  # the plan above
            return bool(base.fits)
        changed = with_changes(config, **changes)
        p = plan(changed, devices, **common, evaluate="mesh.fsdp" in changes)
        needs = max(p.train.total, p.eval.total if p.eval else eval_needs)
        ok = p.out_of_memory is None and needs <= capacity
        print(f"  {_flags(changes)}: needs {'more than ' if p.out_of_memory else ''}{_gib(needs)}"
              f" -> {'fits' if ok else 'does not fit'}", flush=True)
        return ok

    if base.fits is False and f.suggest:
        print("Trying what would fit (each a compile):", flush=True)
        found = alternatives(config, fits_with, len(devices))
        fitting = [flag for flag, ok in found if ok]
        print("What fits instead: " + ("; ".join(fitting) if fitting else "none of these; lower the batch "
                                         "(--find_batch)") + ".", flush=True)
    if f.find_batch and capacity is not None:
        unit = config.accum_steps * len(devices)
        print(f"Searching the largest global batch that fits (multiples of {unit}):", flush=True)
        good, bad = find_batch(lambda b: fits_with({"batch_size": b}), unit, config.batch_size,
                               limit=f.max_batch or 64 * max(config.batch_size, unit))
        print(f"Largest global batch that fits: {good if good else 'none'}"
              + (f" (--config.batch_size={good}; {bad} does not fit)." if good and bad else
                 f"; even {bad} does not fit." if bad else " (the search's limit; --max_batch raises it)."), flush=True)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file whose training run is planned.", lock_config=True)
    flags.DEFINE_string("topology", None, f"The slice: {FORMS}.", required=True)
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the step time and images/s are given at.")
    flags.DEFINE_integer("num_classes", None, "Classes of the head (default: the data set's, where known).")
    flags.DEFINE_bool("find_batch", False, "Search the largest global batch that fits (a compile per try).")
    flags.DEFINE_integer("max_batch", None, "The largest global batch --find_batch tries (default 64x the config's).")
    flags.DEFINE_bool("suggest", True, "When it does not fit, try remat, accum_steps and mesh.fsdp settings.")
    flags.DEFINE_float("hbm_gib", None, "HBM per chip to plan against, GiB (default: the chip's), e.g. to keep a "
                       "margin.")
    flags.DEFINE_string("cache_dir", plan_cache.default_directory(), "Where what the compiler said about each step "
                        "is kept, so the same plan again is read, not compiled; '' compiles every time.")
    flags.DEFINE_bool("verbose", False, "On an error, print its traceback too.")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
