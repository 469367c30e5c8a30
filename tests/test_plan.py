"""masksub_jax.plan: slice names, the chip table, the report's arithmetic, the batch search, a local
report from this machine's CPU devices, and (with libtpu, CI job 3) the steps compiled for a TPU slice.

The TPU tests need libtpu (the `tpu` extra), which the CPU venv must not have (with it JAX tries the
TPU first). Without it they are skipped with the reason shown and a warning in pytest's summary;
with MASKSUB_REQUIRE_TPU_PLAN_TESTS=1 (CI job 3: `-m libtpu` in job 1's venv with the extra added) a
missing libtpu fails them.
"""
import dataclasses
import importlib.util
import json
import math
import os
import types
import warnings

import jax
import jax.numpy as jnp
import pytest

from masksub_jax import cli, flops, plan, plan_cache
from masksub_jax import config as config_lib

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
REQUIRED = os.environ.get("MASKSUB_REQUIRE_TPU_PLAN_TESTS") == "1"
NO_TPU_REASON = ("libtpu is not installed: the TPU plan tests run in CI job 3 (.ci/run: pytest -m libtpu "
                 "after pip install -e '.[tpu]'); they were NOT run here")
if not HAS_LIBTPU and not REQUIRED:
    warnings.warn(NO_TPU_REASON, stacklevel=1)


def needs_libtpu(test):
    """Marked `libtpu` (what CI job 3 selects) and skipped without libtpu unless it is required."""
    return pytest.mark.libtpu(pytest.mark.skipif(not HAS_LIBTPU and not REQUIRED, reason=NO_TPU_REASON)(test))


@pytest.mark.libtpu
def test_libtpu_present_where_required():
    """CI job 3 sets MASKSUB_REQUIRE_TPU_PLAN_TESTS=1: there a missing libtpu is a failure, not a skip."""
    assert HAS_LIBTPU or not REQUIRED, "MASKSUB_REQUIRE_TPU_PLAN_TESTS=1 but libtpu is not installed: " + NO_TPU_REASON


@pytest.mark.parametrize("name, kind, shape", [
    ("v5p-64", "v5p", (2, 4, 4)), ("v5p-8", "v5p", (2, 2, 1)), ("v4-8", "v4", (2, 2, 1)), ("v4-128", "v4", (4, 4, 4)),
    ("v5litepod-16", "v5e", (4, 4)), ("v5e-8", "v5e", (2, 4)), ("v6e-256", "v6e", (16, 16)), ("v6e-1", "v6e", (1, 1)),
    ("v5e:4x4", "v5e", (4, 4)), ("V5P:2x4x4", "v5p", (2, 4, 4)), ("v4:4x4x8", "v4", (4, 4, 8))])
def test_topology_names(name, kind, shape):
    target = plan.parse_topology(name)
    assert (target.chip.name, target.shape, target.chips) == (kind, shape, math.prod(shape))


def test_topology_names_count_cores_or_chips():
    """v4-N and v5p-N count TensorCores (two per chip), v5e and v6e chips; libtpu's names differ."""
    assert plan.parse_topology("v5p-64").chips == 32 and plan.parse_topology("v5litepod-64").chips == 64
    assert plan.parse_topology("v5p-64").topology_name == "v5:2x4x4"
    assert plan.parse_topology("v5litepod-4").topology_name == "v5e:2x2"
    assert plan.parse_topology("local").chip is None


@pytest.mark.parametrize("name, says", [
    ("v5p-63", "v5p-N with N in 8, 16"), ("v5e-12", "v5e:AxB"), ("v5e:2x2x2", "2D"), ("v4:2x2", "3D"),
    ("tpu-64", "v4-N or v5p-N"), ("h100-8", "GPUs cannot be planned"), ("gpu", "--topology=local")])
def test_bad_topology_is_one_line_naming_the_forms(name, says):
    with pytest.raises(ValueError, match=says) as error:
        plan.parse_topology(name)
    assert "\n" not in str(error.value)


def test_chip_table():
    """Cloud TPU's published figures (plan.Chip's docstring cites the pages)."""
    table = {name: (chip.hbm_bytes / 2**30, chip.peak_flops / 1e12) for name, chip in plan.CHIPS.items()}
    assert table == {"v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459), "v6e": (32, 918)}


def test_report_arithmetic():
    step = plan.StepMemory(arguments=3 * 2**30, outputs=2 * 2**30, aliased=2 * 2**30, temporaries=5 * 2**30)
    evaluation = plan.StepMemory(arguments=2**30, outputs=0, aliased=0, temporaries=2**30, resident=2 * 2**30)
    p = plan.Plan(batch=1024, devices=8, mesh={"data": 8, "fsdp": 1}, state_bytes=3 * 2**30,
                  state_bytes_per_device=3 * 2**30, train=step, eval=evaluation, capacity=16 * 2**30,
                  peak_flops=200e12, flops=8 * 40e12, xla_flops=45e12, compile_s=1.0)
    assert step.total == 8 * 2**30 and evaluation.total == 4 * 2**30 and p.needed == 8 * 2**30 and p.fits
    assert p.step_time(0.5) == pytest.approx(40e12 / 100e12)  # the model's FLOPs per chip at half the peak
    assert plan.verdict(p) == "Fits: 8.00 GiB to spare per chip."
    tight = plan.Plan(**{**p.__dict__, "capacity": 6 * 2**30})
    assert plan.verdict(tight) == "Does not fit by 2.00 GiB per chip." and tight.fits is False
    lines = "\n".join(plan.format_plan(p, 0.5))
    assert "400.0 ms per step, 2,560 images/s" in lines and "5.000 TFLOP" in lines
    no_peak = plan.Plan(**{**p.__dict__, "peak_flops": None, "capacity": None})
    assert no_peak.step_time(0.5) is None and no_peak.fits is None


def test_out_of_memory_from_the_compiler():
    """XLA's TPU compiler refuses a step that cannot fit (measured: ViT-B/16 batch 2048 on v5e-8 at the
    lowest optimisation effort); the plan says so with the compiler's figures."""
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(32.14G) exceeds available HBM (15.75G).")
    assert plan._required_temporaries(message) == int(32.14 * 2**30)
    step = plan.StepMemory(arguments=2**30, outputs=0, aliased=0, temporaries=plan._required_temporaries(message))
    p = plan.Plan(batch=2048, devices=8, mesh={"data": 8, "fsdp": 1}, state_bytes=2**30, state_bytes_per_device=2**30,
                  train=step, eval=None, capacity=16 * 2**30, peak_flops=197e12, flops=None, xla_flops=None,
                  compile_s=1.0, out_of_memory="train step: " + message)
    assert p.fits is False and p.needed > p.capacity
    assert plan.verdict(p).startswith("Does not fit: XLA's TPU compiler ran out of HBM for the train step: Ran out")
    assert plan.verdict(p).endswith("exceeds available HBM (15.75G).") and "\n" not in plan.verdict(p)
    in_eval = plan.verdict(dataclasses.replace(p, out_of_memory="eval step: " + message))
    assert "for the eval step: Ran out" in in_eval and in_eval.endswith("a smaller --config.eval_batch_size would")


@pytest.mark.parametrize("start", [8, 64, 96, 4096])
@pytest.mark.parametrize("limit_bytes", [0, 100, 1000, 5000, 10**6])
def test_find_batch_on_a_fake_memory_function(start, limit_bytes):
    """Memory 10 * batch + 40: the largest multiple of 8 that fits, each answer checked by a probe."""
    probes = {}

    def fits(batch):
        probes[batch] = 10 * batch + 40 <= limit_bytes
        return probes[batch]
    good, bad = plan.find_batch(fits, unit=8, start=start, limit=8192)
    best = max((b for b in range(8, 8193, 8) if 10 * b + 40 <= limit_bytes), default=None)
    assert good == best
    assert good is None or probes[good]
    assert bad is None or not probes[bad]
    if good and bad:
        assert bad == good + 8
    assert len(probes) <= 2 * math.log2(8192 / 8) + 2


def test_find_batch_stops_at_the_limit():
    assert plan.find_batch(lambda b: True, unit=4, start=4, limit=100) == (100, None)


def test_alternatives_name_the_least_change():
    """Each setting searched alone (fewest micro-batches, smallest fsdp); the combination only if none fits."""
    c = config_lib.base()
    c.batch_size = 512
    tried = []

    def fits_with(changes):
        tried.append(changes)
        return changes.get("accum_steps", 1) >= 4 or changes.get("mesh.fsdp", 1) >= 8
    found = plan.alternatives(c, fits_with, num_devices=16)
    assert found == [("--config.model.remat=True", False),
                     ("--config.model.scan=True --config.model.remat=True", False),
                     ("--config.accum_steps=4", True), ("--config.mesh.fsdp=8", True)]
    nothing = plan.alternatives(c, lambda changes: False, num_devices=16)
    assert nothing[-1] == ("--config.model.remat=True --config.accum_steps=32 --config.mesh.fsdp=16", False)


def test_data_shape_without_reading_data():
    c = config_lib.base()
    assert plan.data_shape(c) == ((224, 224, 3), 1000)  # imagenet2012
    c.data.source, c.data.num_classes, c.data.image_size = "synthetic", 7, 32
    assert plan.data_shape(c) == ((32, 32, 3), 7)
    c.data.source, c.data.name = "tfds", "my_flowers"
    with pytest.raises(ValueError, match="--num_classes"):
        plan.data_shape(c)
    assert plan.data_shape(c, num_classes=102) == ((32, 32, 3), 102)


@pytest.fixture
def test_variants(monkeypatch):
    """Two ViT sizes for compiling fast: "plan_tiny" (width 64, 1 block) and "plan_wide" (width 512,
    2 blocks: every sharded dimension a multiple of TPU's 128 lanes, so the layout pads nothing)."""
    from masksub_jax.models import vit
    monkeypatch.setitem(vit.VARIANTS, "plan_tiny", (64, 1, 4))
    monkeypatch.setitem(vit.VARIANTS, "plan_wide", (512, 2, 8))


def tiny_vit(**overrides):
    c = config_lib.base()
    c.data.source, c.data.num_classes, c.data.image_size = "synthetic", 10, 32
    c.model.variant = "plan_tiny/8"  # 16 tokens
    c.batch_size, c.eval_batch_size = 32, 32
    c.data.repeated_aug = 1
    return config_lib.override(c, overrides)


def test_local_cpu_report_and_the_plan_cache(test_variants, tmp_path):
    """--topology=local on this machine's (8 simulated) CPU devices: the real steps, compiled. The same
    plan again is read from the plan cache, the same figures; damaged entries are compiled again and
    rewritten, not read (another program is another key: test_the_cache_key_...)."""
    devices = jax.devices()
    config = tiny_vit()
    target = plan.parse_topology("local")
    capacity, peak = plan.capacity_and_peak(target, devices, "float32")
    cache = plan_cache.Cache(str(tmp_path / "plans"))

    def local_plan(config):
        return plan.plan(config, devices, num_classes=10, image_shape=(32, 32, 3), capacity=capacity,
                         peak_flops=peak, cache=cache)
    p = local_plan(config)
    assert p.devices == len(devices) and p.fits and p.train.temporaries > 0
    assert p.state_bytes_per_device == p.state_bytes  # fsdp 1: every device holds the whole state
    assert p.train.arguments >= p.state_bytes
    assert p.eval.resident > 0  # the optimizer state stays while the eval step runs
    assert p.flops == pytest.approx(flops.step_flops(config, 10)) and p.flops > 0

    entries = sorted((tmp_path / "plans").iterdir())
    assert not p.cached and [e.suffix for e in entries] == [".json", ".json"]  # the train and eval steps
    again = local_plan(config)
    assert again.cached and dataclasses.replace(again, compile_s=p.compile_s, cached=False) == p
    entries[0].write_text(entries[0].read_text()[:-5])  # cut short
    kept = json.loads(entries[1].read_text())
    entries[1].write_text(json.dumps({**kept, "temporaries": str(kept["temporaries"])}))  # whole JSON, not a number
    recompiled = local_plan(config)
    assert not recompiled.cached and dataclasses.replace(recompiled, compile_s=p.compile_s) == p
    assert all(cache.load(e.stem) is not None for e in entries)  # rewritten whole
    assert json.loads(entries[1].read_text())["temporaries"] == kept["temporaries"]
    assert len(list((tmp_path / "plans").iterdir())) == 2  # no temporary file left


def test_an_outcome_is_read_only_whole():
    whole = {"arguments": 1, "outputs": 2, "aliased": 0, "temporaries": 3, "xla_flops": 4.5, "out_of_memory": None}
    assert plan_cache.Outcome.from_json(json.dumps(whole)) == plan_cache.Outcome(1, 2, 0, 3, 4.5, None)
    refused = {**whole, "xla_flops": None, "out_of_memory": "RESOURCE_EXHAUSTED: ..."}
    assert plan_cache.Outcome.from_json(json.dumps(refused)).out_of_memory == "RESOURCE_EXHAUSTED: ..."
    missing = {k: v for k, v in whole.items() if k != "aliased"}
    for damaged in [json.dumps(missing), json.dumps({**whole, "extra": 1}), json.dumps({**whole, "outputs": "2"}),
                    json.dumps({**whole, "xla_flops": "4.5"}), json.dumps([1, 2]), json.dumps(whole)[:-1], ""]:
        assert plan_cache.Outcome.from_json(damaged) is None, damaged


KEY_OF_A_TINY_STEP = """
import json, jax, jax.numpy as jnp
from masksub_jax import plan_cache
lowered = jax.jit(lambda x: jnp.tanh(x @ x.T).sum()).lower(jnp.ones((16, 16)))
print(plan_cache.Cache("unused", "slice").key(lowered, jax.devices()))
"""


def test_the_cache_key_holds_what_the_compile_depends_on(monkeypatch):
    """The same step in another process has the same key; XLA's flags, a JAX setting, the slice or
    the devices change it."""
    import subprocess
    import sys
    lowered = jax.jit(lambda x: jnp.tanh(x @ x.T).sum()).lower(jnp.ones((16, 16)))
    cache, devices = plan_cache.Cache("unused", "slice"), jax.devices()
    key = cache.key(lowered, devices)
    there = subprocess.run([sys.executable, "-c", KEY_OF_A_TINY_STEP], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == key
    assert cache.key(jax.jit(lambda x: jnp.tanh(x @ x.T).mean()).lower(jnp.ones((16, 16))), devices) != key
    assert plan_cache.Cache("unused", "another slice").key(lowered, devices) != key
    assert cache.key(lowered, devices[:4]) != key
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_latency_hiding_scheduler=false")
    assert cache.key(lowered, devices) != key
    monkeypatch.delenv("LIBTPU_INIT_ARGS")
    assert cache.key(lowered, devices) == key
    jax.config.update("jax_compiler_enable_remat_pass", False)
    try:
        assert cache.key(lowered, devices) != key
    finally:
        jax.config.update("jax_compiler_enable_remat_pass", True)


def command_flags(**overrides):
    """What `_plan_command` reads of absl's flags, for a tiny ViT on this machine's devices."""
    defaults = dict(config=tiny_vit(), topology="local", num_classes=None, hbm_gib=None, find_batch=False,
                    suggest=True, mfu=0.4, max_batch=None, cache_dir=None)
    return types.SimpleNamespace(**{**defaults, **overrides})


def test_an_unwritable_default_cache_is_a_warning_and_no_cache(test_variants, monkeypatch, tmp_path, capsys):
    """A read-only home planned before the cache existed: it still plans, compiling every time."""
    (tmp_path / "a_file").write_text("")
    unwritable = str(tmp_path / "a_file" / "plans")
    monkeypatch.setattr(plan_cache, "default_directory", lambda: unwritable)
    asked = []
    monkeypatch.setattr(plan, "plan", lambda *args, **kwargs: asked.append(kwargs) or pytest.fail("planned"))
    flags = command_flags(cache_dir=unwritable)
    with pytest.raises(pytest.fail.Exception, match="planned"):
        plan._plan_command(flags)
    assert asked[0]["cache"] is None
    assert capsys.readouterr().err.startswith(f"warning: no plan cache: {unwritable} cannot be written")


def slice_plan(config, num_classes=10, topology="v5e:2x2", **kwargs):
    target = plan.parse_topology(topology)
    devices = plan.slice_devices(target)
    return plan.plan(config, devices, num_classes=num_classes, image_shape=(32, 32, 3),
                     capacity=target.chip.hbm_bytes, peak_flops=target.chip.peak_flops, **kwargs)


@needs_libtpu
@pytest.mark.parametrize("fsdp, scan", [(4, False), (1, False), (4, True)])
def test_tpu_argument_bytes_are_the_state_over_the_chips(test_variants, fsdp, scan):
    """On v5e:2x2 (4 chips) with fsdp 4 each chip holds a quarter of the state, with fsdp 1 all of it,
    as XLA's TPU buffer assignment reports (within 5%: the batch, the small replicated leaves and the
    patch embedding's 3 channels padded to 8); the scanned blocks' stacked weights alike."""
    config = tiny_vit(**{"mesh.fsdp": fsdp, "model.variant": "plan_wide/8", "data.num_classes": 128,
                         "model.scan": scan})
    p = slice_plan(config, num_classes=128, evaluate=False)
    assert p.devices == 4 and p.mesh == {"data": 4 // fsdp, "fsdp": fsdp}
    assert p.train.arguments == pytest.approx(p.state_bytes / fsdp, rel=0.05)
    assert p.state_bytes_per_device == pytest.approx(p.state_bytes / fsdp, rel=0.05)
    assert p.fits and (scan or p.xla_flops > 0)  # with scan XLA counts a loop's body once: left out


@needs_libtpu
def test_tpu_find_batch_is_monotone(test_variants):
    """Against a small HBM: the batch it finds fits per its own report and the next one (by its unit)
    does not. XLA's TPU memory is not monotone in the batch on a model this small (measured with
    plan_tiny: 10.0, 9.5 and 9.0 MiB at batches 32, 64 and 128; its scheduler trades temporaries), so
    the answers are checked against the reports, not against a formula."""
    config = tiny_vit(**{"eval_batch_size": 4})
    reports = {}

    def report(batch):
        if batch not in reports:
            reports[batch] = slice_plan(config_lib.override(config.copy_and_resolve_references(),
                                                            {"batch_size": batch}), evaluate=False)
        return reports[batch]
    capacity = (report(256).train.total + report(512).train.total) // 2
    good, bad = plan.find_batch(lambda b: report(b).train.total <= capacity, unit=64, start=256, limit=4096)
    assert good is not None or bad is not None
    assert good is None or reports[good].train.total <= capacity
    assert bad is None or reports[bad].train.total > capacity
    if good is not None and bad is not None:
        assert bad - good == 64
    assert len(reports) <= 6


@needs_libtpu
@pytest.mark.parametrize("step, changes", [("train", {"batch_size": 2**18}), ("eval", {"eval_batch_size": 2**20})])
def test_tpu_compiler_refusing_a_step_is_a_plan_that_does_not_fit_and_is_cached(test_variants, tmp_path, step,
                                                                                  changes):
    """A train batch of 256k or an eval batch of 1M on v5e:2x2: XLA's TPU compiler runs out of HBM; the
    plan says which step does not fit, with the temporaries the compiler named, and the same plan
    again reads that from the plan cache."""
    config, cache = tiny_vit(**changes), plan_cache.Cache(str(tmp_path))
    refused = slice_plan(config, evaluate=step == "eval", cache=cache)
    assert refused.out_of_memory.startswith(f"{step} step: RESOURCE_EXHAUSTED") and refused.fits is False
    memory = refused.train if step == "train" else refused.eval
    assert memory.temporaries == plan._required_temporaries(refused.out_of_memory) > refused.capacity
    assert f"for the {step} step" in plan.verdict(refused)
    again = slice_plan(config, evaluate=step == "eval", cache=cache)
    assert again.cached and dataclasses.replace(again, compile_s=refused.compile_s, cached=False) == refused


def test_a_cache_dir_that_cannot_be_written_is_an_error_before_compiling(test_variants, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(plan, "plan", lambda *args, **kwargs: pytest.fail("compiled before the error"))
    (tmp_path / "a_file").write_text("")
    flags = command_flags(cache_dir=str(tmp_path / "a_file" / "plans"))
    with pytest.raises(cli.CommandError, match=r"a_file/plans cannot hold the plan cache \(NotADirectoryError.*"
                       r"or --cache_dir= to keep nothing"):
        plan._plan_command(flags)
    assert capsys.readouterr().out == ""


def test_find_batch_without_a_memory_limit_is_an_error_before_compiling(test_variants, monkeypatch, capsys):
    """Devices that report no memory limit (some GPUs): --find_batch cannot search, so it says so and
    names --hbm_gib, before any compile; with --hbm_gib it has a capacity to search against."""
    monkeypatch.setattr(plan, "capacity_and_peak", lambda *args: (None, None))
    monkeypatch.setattr(plan, "plan", lambda *args, **kwargs: pytest.fail("compiled before the error"))
    flags = command_flags(find_batch=True)
    with pytest.raises(cli.CommandError, match="--find_batch needs the memory per device.*--hbm_gib"):
        plan._plan_command(flags)
    assert capsys.readouterr().out == ""
