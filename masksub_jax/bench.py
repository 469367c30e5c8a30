"""Benchmarks. `step`: the train step of every MaskSub mode, measured side by side. `input`: the
host input pipeline.

  python -m masksub_jax.bench step --config=configs/vit_s.py --batch=16 [--dtype=bfloat16]
  python -m masksub_jax.bench step --config=configs/swin_t.py --batch=16 --modes=none,masking
      [--modes=none,masking,dropout,droppath] [--rounds=5] [--memory_lean] [--json=FILE]

Each mode's step is the trainer's own (`step.make_train_step`) on synthetic uint8 images, compiled
once, warmed up, then timed in interleaved rounds (one step of each mode per round) so that load
on a shared machine hits every mode alike; the median is reported. FLOPs are counted from the model
(3x the forward: forward + backward; the family's `forward_flops`, else XLA's count) and compared with
XLA's cost analysis; peak memory is XLA's
buffer assignment for the compiled step (arguments + outputs + temporaries - donated aliases).
MFU is given where the device's peak is known.

  python -m masksub_jax.bench input --config=configs/vit_b.py --image_size=224 [--batch=128]
      [--recipes=3augment,rand-m9-mstd0.5-inc1] [--sources=tfds,folder] [--rounds=30] [--json=FILE]
  python -m masksub_jax.bench listing [--files=100000]

  python -m masksub_jax.bench checkpoint --config=configs/vit_b.py [--rounds=5]

Saving (until on disk) and restoring the config's whole train state with `checkpoint.Checkpoints`,
in a temporary folder (TMPDIR), and the cost of the per-array
checksums that each save computes and each restore checks.

The train pipeline (`data/indexed.py`: read by index, crop-then-decode, the recipe's
augmentations, batching) on generated JPEGs of ImageNet's typical size (`data/generated.py`,
built once under --data_dir), from the array_record data set (`tfds`) and from the same JPEG files
in an image-folder tree (`folder`). `images_per_s_per_core` is images per CPU-second the process
used (user + system), so it holds however many cores tf.data got; cores_to_feed(rate) = rate / it.

`listing`: how long the image-folder source takes to list a tree of --files empty files in 1000
class folders (in TMPDIR), and to read the list back from a workdir.
"""
import json
import os
import platform
import time

from masksub_jax import allocator, cli

if __name__ == "__main__":
    allocator.reexec_with_tcmalloc()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from masksub_jax import config as config_lib  # noqa: E402
from masksub_jax import masksub, models  # noqa: E402
from masksub_jax import step as step_lib  # noqa: E402
from masksub_jax.augment import spec  # noqa: E402
from masksub_jax.flops import peak_flops, step_flops, xla_flops  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file whose model and recipe are measured.",
                                lock_config=True)
flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
flags.DEFINE_string("variant", None, "The family's variant, e.g. B/16 or T/4 (default: the config's).")
flags.DEFINE_integer("image_size", None, "Image size (default: the config's).")
flags.DEFINE_enum("dtype", None, list(config_lib.DTYPES), "Compute dtype (default: the config's).")
flags.DEFINE_list("modes", list(masksub.MODES), "Step kinds to measure; MODE+pixels: with the recipe's per-pixel "
                  "ops in the step (data.augment_on=device).")
flags.DEFINE_float("ratio", 0.5, "MaskSub ratio of the masking, dropout and droppath modes.")
flags.DEFINE_integer("num_classes", 1000, "Classes of the head.")
flags.DEFINE_integer("rounds", 5, "Timed rounds; each runs one step of every mode (input: batches, default 30).")
flags.DEFINE_integer("warmup", 2, "Untimed steps of each mode after compiling.")
flags.DEFINE_bool("memory_lean", False, "Measure the memory-lean MaskSub order.")
flags.DEFINE_string("json", None, "Also write the results to this file as a JSON list.")
flags.DEFINE_list("recipes", ["3augment", "rand-m9-mstd0.5-inc1"], "input: data.augment recipes to measure.")
flags.DEFINE_list("sources", ["tfds"], "input: tfds (array_record) and/or folder (the same JPEG files as a tree).")
flags.DEFINE_list("augment_on", ["host"], "input: where the per-pixel ops run, host and/or device (then the host "
                  "pipeline stops after the flip).")
flags.DEFINE_integer("files", 100_000, "listing: files in the tree.")
flags.DEFINE_string("data_dir", os.path.join(os.path.expanduser("~"), ".cache", "masksub_jax", "generated"),
                    "input: where the generated JPEG data set is built (once).")

def _peak_memory(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


class StepRunner:
    """One mode's train step on a synthetic batch: built, compiled and warmed up on creation. A mode
    "MODE+pixels" is MODE with the resize and the config's recipe in the step (data.augment_on=device)."""

    def __init__(self, config, mode: str, *, ratio: float, num_classes: int, warmup: int):
        c = self.config = config.copy_and_resolve_references()
        mode, _, extra = mode.partition("+")
        c.masksub.mode, c.masksub.ratio = mode, (0.0 if mode == "none" else ratio)
        if extra == "pixels":
            c.data.source, c.data.augment_on = "tfds", "device"
        shape = (c.batch_size, c.data.image_size, c.data.image_size, len(c.data.mean))
        data_rng = np.random.default_rng(0)
        self.batch = {"image": jax.device_put(data_rng.integers(0, 256, shape, dtype=np.uint8)),
                      "label": jax.device_put(data_rng.integers(0, num_classes, shape[0]).astype(np.int32))}
        if spec.on_device(c.data):  # what the host hands over then: crops on canvases, and their sizes
            canvas = spec.canvas_size(c.data)
            self.batch["image"] = jax.device_put(data_rng.integers(0, 256, (shape[0], canvas, canvas, 3), np.uint8))
            self.batch["crop_size"] = jax.device_put(
                data_rng.integers(shape[1] // 2, canvas + 1, (shape[0], 2)).astype(np.int32))
        self.rng = jax.random.PRNGKey(1)
        model = step_lib.make_model(c, num_classes)
        tx, schedule = step_lib.make_optimizer(c, total_steps=1000, steps_per_epoch=100)
        self.state = jax.jit(step_lib.make_init(model, tx, shape[1:], ema=bool(c.ema.decay)))(jax.random.PRNGKey(0))
        train_step = jax.jit(step_lib.make_train_step(c, model, tx, schedule, num_classes), donate_argnums=(0,))
        start = time.perf_counter()
        self.compiled = train_step.lower(self.state, self.batch, self.rng).compile()
        self.compile_s = time.perf_counter() - start
        for _ in range(warmup):
            self.timed_step()

    def timed_step(self) -> float:
        """Runs one step to completion; returns its wall time in seconds."""
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


def measure_steps(config, modes, *, ratio: float, num_classes: int, rounds: int, warmup: int) -> list[dict]:
    """Compiles every mode's train step, then times them interleaved. One dict per mode."""
    runners = {mode: StepRunner(config, mode, ratio=ratio, num_classes=num_classes, warmup=warmup)
               for mode in modes}
    times = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, runner in runners.items():
            times[mode].append(runner.timed_step())

    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, config.model.dtype)
    results = []
    for mode, runner in runners.items():
        step_s = float(np.median(times[mode]))
        flops = step_flops(runner.config, num_classes) or xla_flops(runner.compiled)
        results.append({
            "mode": mode, "ratio": runner.config.masksub.ratio, "variant": models.of(config).describe(config),
            "image_size": config.data.image_size, "batch": config.batch_size, "dtype": config.model.dtype,
            "memory_lean": config.masksub.memory_lean, "step_time_s": step_s, "step_times_s": times[mode],
            "images_per_s": config.batch_size / step_s, "compile_s": runner.compile_s,
            "flops_per_step": flops, "xla_flops_per_step": xla_flops(runner.compiled),
            "mfu": flops / step_s / peak if peak else None, "peak_memory_bytes": _peak_memory(runner.compiled),
            "device": device.device_kind, "device_count": 1, "jax": jax.__version__,
            "host": platform.node(), "cpu_count": os.cpu_count(),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
        })
    return results


def format_table(results: list[dict]) -> str:
    base = next((r for r in results if r["mode"] == "none"), None)
    lines = [f"{results[0]['variant']} at {results[0]['image_size']} px, batch {results[0]['batch']}, "
             f"{results[0]['dtype']}, memory_lean {results[0]['memory_lean']}, "
             f"on {results[0]['device']} (jax {results[0]['jax']})",
             f"{'mode':<9} {'step ms':>9} {'img/s':>8} {'compile s':>9} {'GFLOP':>9} {'XLA GFLOP':>9} "
             f"{'MFU':>6} {'peak MiB':>9} {'time/none':>9} {'FLOP/none':>9}"]
    for r in results:
        rel_t = f"{r['step_time_s'] / base['step_time_s']:.3f}" if base else "-"
        rel_f = f"{r['flops_per_step'] / base['flops_per_step']:.3f}" if base else "-"
        xla = f"{r['xla_flops_per_step'] / 1e9:.1f}" if r["xla_flops_per_step"] else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] is not None else "-"
        lines.append(f"{r['mode']:<9} {r['step_time_s'] * 1e3:>9.1f} {r['images_per_s']:>8.1f} "
                     f"{r['compile_s']:>9.1f} {r['flops_per_step'] / 1e9:>9.1f} {xla:>9} {mfu:>6} {mem:>9} "
                     f"{rel_t:>9} {rel_f:>9}")
    return "\n".join(lines)


def measure_input(config, recipes, *, data_dir: str, rounds: int, sources=("tfds",), augment_on=("host",),
                  generated_config: str = "imagenet_like") -> list[dict]:
    """Train-pipeline throughput of each recipe on generated JPEGs, from each source, with the
    per-pixel ops on the host and/or left to the device; one dict per (recipe, where, source). The
    batches the pipeline prepares ahead are drawn before the clock starts, so `rounds` are made
    while timed."""
    import tensorflow as tf

    from masksub_jax.data import generated, indexed, pipeline
    name = generated.prepare(generated_config, data_dir)
    folder = _as_folder(name, data_dir) if "folder" in sources else None
    results = []
    for recipe, where, source in ((r, w, s) for r in recipes for w in augment_on for s in sources):
        c = config.copy_and_resolve_references()
        c.data.source, c.data.name, c.data.data_dir, c.data.augment = source, name, data_dir, recipe
        c.data.augment_on = where
        c.data.folder, c.data.eval_split = folder, ("val" if source == "folder" else c.data.eval_split)
        config_lib.validate(c)
        batches = pipeline.make(c).train_batches()
        for _ in range(indexed.STEPS_IN_FLIGHT + 3):
            next(batches)
        cpu, start = time.process_time(), time.perf_counter()  # every thread's CPU time, to the ns (not ticks)
        for _ in range(rounds):
            next(batches)
        wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        images = rounds * c.batch_size
        results.append({
            "recipe": recipe, "augment_on": where, "source": source, "image_size": c.data.image_size,
            "batch": c.batch_size, "cpu": _cpu_name(),
            "images": images,
            "wall_s": wall, "cpu_s": cpu_s, "images_per_s": images / wall, "images_per_s_per_core": images / cpu_s,
            "cores_busy": cpu_s / wall, "cores_available": len(os.sched_getaffinity(0)),
            "data": name, "tensorflow": tf.__version__, "host": platform.node()})
    return results


def _cpu_name() -> str:
    """The CPU model and whether it has AVX-512 (per-core input rates move 2x between hosts)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{model}, {'with' if ' avx512f' in info else 'without'} AVX-512"


def _as_folder(name: str, data_dir: str) -> str:
    """The generated data set's JPEG files as an image-folder tree under data_dir (written once)."""
    import tensorflow_datasets as tfds
    root = os.path.join(data_dir, "folders", name.replace("/", "_"))
    if os.path.isdir(os.path.join(root, "val")):
        return root
    builder = tfds.builder(name, data_dir=data_dir)
    for split, folder in (("train", "train"), ("validation", "val")):
        records = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        for i in range(len(records)):
            example = records[i]
            os.makedirs(os.path.join(root, folder, f"class_{example['label']:02d}"), exist_ok=True)
            with open(os.path.join(root, folder, f"class_{example['label']:02d}", f"{i:06d}.JPEG"), "wb") as f:
                f.write(example["image"])
    return root


def format_input_table(results: list[dict], feed_rate: float = 2042.0) -> str:
    lines = [f"Train input pipeline at {results[0]['image_size']} px, batch {results[0]['batch']}, "
             f"{results[0]['data']}, {results[0]['cores_available']} cores available",
             f"{results[0]['cpu']}",
             f"{'recipe':<24} {'pixels':<7} {'source':<7} {'img/s':>8} {'cores busy':>10} {'img/s/core':>10} "
             f"{f'cores for {feed_rate:.0f} img/s':>22}"]
    for r in results:
        lines.append(f"{r['recipe']:<24} {r['augment_on']:<7} {r['source']:<7} {r['images_per_s']:>8.1f} "
                     f"{r['cores_busy']:>10.2f} "
                     f"{r['images_per_s_per_core']:>10.1f} {feed_rate / r['images_per_s_per_core']:>22.1f}")
    return "\n".join(lines)


def measure_listing(num_files: int, num_classes: int = 1000) -> dict:
    """Seconds for the image-folder source to list a tree of `num_files` empty files in
    `num_classes` class folders (TMPDIR), and to write and read the list in a workdir."""
    import tempfile

    from masksub_jax.data import folder_source
    with tempfile.TemporaryDirectory() as tmp:
        split = os.path.join(tmp, "images", "train")
        for k in range(num_classes):
            os.makedirs(os.path.join(split, f"n{k:08d}"))
        for i in range(num_files):
            open(os.path.join(split, f"n{i % num_classes:08d}", f"n{i % num_classes:08d}_{i}.JPEG"), "w").close()
        start = time.perf_counter()
        listing = folder_source.list_split(split)
        list_s = time.perf_counter() - start
        workdir = os.path.join(tmp, "run")
        start = time.perf_counter()
        folder_source.file_list(split, "train", workdir)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = folder_source.file_list(split, "train", workdir, reuse=True)
        read_s = time.perf_counter() - start
        assert len(listing["files"]) == len(cached["files"]) == num_files
        size = os.path.getsize(os.path.join(workdir, folder_source.LISTS, "train.json.gz"))
    return {"files": num_files, "classes": num_classes, "list_s": list_s, "list_and_write_s": write_s,
            "read_cached_s": read_s, "cached_bytes": size, "host": platform.node()}


def measure_checkpoint(config, *, num_classes: int, rounds: int) -> dict:
    """Seconds to save (until on disk) and to restore the config's train state, and what the
    checksums (`checkpoint.fingerprints`) add to each: they are computed once per save and once
    per restore, on the devices."""
    import tempfile

    from masksub_jax import checkpoint
    model = step_lib.make_model(config, num_classes)
    tx, _ = step_lib.make_optimizer(config, total_steps=100, steps_per_epoch=10)
    shape = (config.data.image_size, config.data.image_size, 3)
    state = jax.jit(step_lib.make_init(model, tx, shape, ema=bool(config.ema.decay)))(jax.random.PRNGKey(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    times = {"save_s": [], "restore_s": [], "fingerprint_s": []}
    with tempfile.TemporaryDirectory() as workdir:
        with checkpoint.Checkpoints(workdir, keep=2) as checkpoints:
            jax.block_until_ready(checkpoint.fingerprints(state))  # compiled once
            for r in range(rounds):
                state["step"] = state["step"] + 1
                start = time.perf_counter()
                jax.block_until_ready(checkpoint.fingerprints(state))
                times["fingerprint_s"].append(time.perf_counter() - start)
                start = time.perf_counter()
                checkpoints.save(state)
                checkpoints.wait()
                times["save_s"].append(time.perf_counter() - start)
                start = time.perf_counter()
                assert checkpoints.restore_latest(abstract, say=print) is not None, r
                times["restore_s"].append(time.perf_counter() - start)
    result = {k: float(np.median(v)) for k, v in times.items()}
    result["state_mb"] = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
    result["variant"] = models.of(config).describe(config)
    return result


def main(argv):
    if argv[1:] not in (["step"], ["input"], ["checkpoint"], ["listing"]):
        raise app.UsageError("Usage: python -m masksub_jax.bench step|input|checkpoint|listing --config=FILE [flags]")
    f = flags.FLAGS
    if argv[1] == "listing":
        result = measure_listing(f.files)
        print(f"Listed {result['files']} files in {result['classes']} class folders in {result['list_s']:.2f} s "
              f"({result['files'] / result['list_s']:.0f} files/s); listed and kept in a workdir in "
              f"{result['list_and_write_s']:.2f} s ({result['cached_bytes'] / 1e6:.1f} MB); read back in "
              f"{result['read_cached_s']:.2f} s", flush=True)
        _write_json([result], f.json)
        return
    config = f.config
    with config.unlocked():
        config.batch_size = f.batch or (128 if argv[1] == "input" else config.batch_size)
        config.model.variant = f.variant or config.model.variant
        config.data.image_size = f.image_size or config.data.image_size
        config.model.dtype = f.dtype or config.model.dtype
        config.masksub.memory_lean = f.memory_lean
    config_lib.validate(config, num_devices=1)
    if argv[1] == "checkpoint":
        result = measure_checkpoint(config, num_classes=f.num_classes, rounds=f.rounds)
        print(f"{result['variant']} train state {result['state_mb']:.0f} MB: save {result['save_s']:.2f} s, "
              f"restore {result['restore_s']:.2f} s (both with checksums), checksums alone "
              f"{result['fingerprint_s']:.3f} s, once in each", flush=True)
        _write_json([result], f.json)
        return
    if argv[1] == "input":
        results = measure_input(config, f.recipes, data_dir=f.data_dir, sources=f.sources, augment_on=f.augment_on,
                                rounds=f.rounds if f["rounds"].present else 30)
        print(format_input_table(results), flush=True)
        _write_json(results, f.json)
        return
    unknown = {mode.removesuffix("+pixels") for mode in f.modes} - set(masksub.MODES)
    if unknown:
        raise app.UsageError(f"Unknown modes {sorted(unknown)}; use some of {masksub.MODES}.")
    results = measure_steps(config, f.modes, ratio=f.ratio, num_classes=f.num_classes, rounds=f.rounds,
                            warmup=f.warmup)
    print(format_table(results), flush=True)
    _write_json(results, f.json)


def _write_json(results, path):
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
