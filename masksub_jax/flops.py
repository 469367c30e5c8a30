"""FLOPs of a train step and the devices' peak FLOP/s: the MFU that `bench` measures and the step
time that `plan` predicts, counted one way."""
from masksub_jax import masksub, models

# Dense matmul peak FLOP/s by jax's Device.device_kind and compute dtype. GPUs: vendor data sheets
# (float32 means TF32). TPUs: Cloud TPU's per-chip bf16 figures (cloud.google.com/tpu/docs/v4, v5e,
# v5p, v6e); float32 matmuls run as bf16 passes on the MXU.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The peak of a device kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite"); None for one not listed.
    Longer names are tried first, so that "TPU v5 lite" is not taken for "TPU v5"."""
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_FLOPS[name][dtype]
    return None


def step_flops(config, num_classes: int) -> float | None:
    """FLOPs of one train step of the global batch: 3x the forward of the main and (if any) the
    sub-branch. None where the model family counts no FLOPs (then XLA's count is all there is)."""
    c, family = config, models.of(config)
    if not hasattr(family, "forward_flops"):
        return None
    flops = family.forward_flops(c, num_classes)
    if c.masksub.mode != "none" and c.masksub.ratio > 0:
        kept = masksub.num_kept(family.num_units(c), c.masksub.ratio) if c.masksub.mode == "masking" else None
        flops += family.forward_flops(c, num_classes, kept)
    return 3 * c.batch_size * flops


def xla_flops(compiled) -> float | None:
    """XLA's own count for one device's compiled program (a loop's body counted once); None where it
    gives none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else None
