"""What a run folder holds, and the rules for writing and reading it.

    WORKDIR/config.json      the config the run started with (flattened keys); written once, when the
                             run has really started (after its first step), never rewritten
    WORKDIR/resumes.jsonl    one line per resume that changed keys: {"step": N, "changed": {key: value}}
    WORKDIR/summary.json     the final metrics
    WORKDIR/errors.log       tracebacks of failed starts and runs (main.py), newest last
    metrics.jsonl, tb/       metrics.py;  checkpoints/, damaged_checkpoints/  checkpoint.py

These files describe the checkpoints beside them: without a checkpoint there is no run, and a new
start overwrites them. Process 0 alone writes them, each whole and atomically (a temporary file
renamed over the old one), and every process reads them before the run's first barrier, so no
process reads a file while another writes it.
"""
import json
import os

from etils import epath

# What cannot change between a run and its resumption without breaking the checkpoint or the run.
# The data order and augmentations are a function of these and the step (data/indexed.py).
RUN_DEFINING = ("seed", "model.family", "model.variant", "data.source", "data.name", "data.folder",
                "data.train_split", "data.image_size", "data.augment", "data.augment_on", "data.color_jitter",
                "data.repeated_aug", "batch_size", "ema.decay", "model.pool", "model.pre_norm", "model.act",
                "model.norm_eps", "optim.frozen", "model.scan")
# Keys that change how a run is carried out or reported, not the weights it ends with.
NO_EFFECT_ON_WEIGHTS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                        "eval_batch_size", "data.data_dir", "data.extra_evals", "data.on_corrupt_image",
                        "on_nonfinite", "init_from", "model.remat", "masksub.memory_lean", "accum_steps", "mesh.fsdp",
                        "compilation_cache_dir", "profile.steps", "profile.all_processes", "profile.dump_hlo",
                        "wandb.project", "wandb.entity", "wandb.name", "wandb.tags", "wandb.mode", "probes.fewshot",
                        "probes.linear", "probes.knn", "probes.shots", "probes.seeds", "probes.l2_grid",
                        "probes.heldout_per_class", "probes.knn_k", "probes.knn_temperature")


class WorkdirError(ValueError):
    """The workdir holds another run than the command describes."""


def path(workdir: str) -> epath.Path:
    """The workdir as a path that local directories and gs:// buckets both support."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def write_text(file: epath.Path, text: str) -> None:
    """Writes `text` to a temporary file that then replaces `file`: a reader (or a kill mid-write)
    sees the old version or the new one, never a cut one."""
    write_bytes(file, text.encode())


def write_bytes(file: epath.Path, data: bytes) -> None:
    """`write_text` for bytes."""
    partial = file.parent / (file.name + ".partial")
    partial.write_bytes(data)
    partial.replace(file)


def check_writable(workdir: str, process_index: int) -> None:
    try:
        path(workdir).mkdir(parents=True, exist_ok=True)
        probe = path(workdir) / f".write_test_{process_index}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"Cannot write to --workdir={workdir}: {e}. Use a directory this process can "
                      "create and write to.") from None


def as_record(flat: dict) -> dict:
    """A flattened config as config.json holds it (tuples become lists), so that values compare equal."""
    return json.loads(json.dumps(flat, default=list))


def started_config(workdir: str) -> dict | None:
    """The config the run in `workdir` trains with now: config.json with the changes of its resumes."""
    config_file = path(workdir) / "config.json"
    if not config_file.exists():
        return None
    record = json.loads(config_file.read_text())
    resumes = path(workdir) / "resumes.jsonl"
    if resumes.exists():
        for line in resumes.read_text().splitlines():
            record.update(json.loads(line)["changed"])
    return record


# Run-defining keys added after runs were recorded: a record without one had this value.
ADDED_LATER = {"model.scan": False}


def changed_keys(record: dict | None, flat: dict) -> dict[str, tuple]:
    """key -> (the run's value, the command's value) for every key that differs."""
    if record is None:
        return {}
    now = as_record(flat)
    record = ADDED_LATER | record
    return {k: (record.get(k), now[k]) for k in now if k in record and record[k] != now[k]}


def describe(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))


def check_same_run(workdir: str, changes: dict[str, tuple]) -> None:
    """Refuses a command whose model, data or batch differ from the run the workdir holds."""
    defining = {k: v for k, v in changes.items() if k in RUN_DEFINING}
    if defining:
        raise WorkdirError(
            f"{workdir} holds a run with a different {', '.join(sorted(defining))} ({describe(defining)}). "
            "Use a new --workdir for this config, or the values the run was started with (its config.json).")


def check_finished_run(workdir: str, changes: dict[str, tuple], say) -> None:
    """A finished run is not changed after the fact: keys that shape the weights are refused, the
    others are only noted."""
    shaping = {k: v for k, v in changes.items() if k not in NO_EFFECT_ON_WEIGHTS}
    if shaping:
        raise WorkdirError(
            f"The run in {workdir} is finished, and it was trained with other values of "
            f"{', '.join(sorted(shaping))} ({describe(shaping)}). Its checkpoints and summary do not "
            "describe this command: use a new --workdir, or the run's own values (its config.json).")
    if changes:
        say(f"Note: {describe(changes)} differ from the finished run's values; they do not change its result.")


def record_start(workdir: str, flat: dict) -> None:
    """A fresh run has really started: its config.json, with no records left of an earlier start."""
    write_text(path(workdir) / "config.json", json.dumps(as_record(flat), indent=1))
    for stale in ("resumes.jsonl", "summary.json", "sessions.jsonl"):
        (path(workdir) / stale).unlink(missing_ok=True)


def record_resume(workdir: str, step: int, changes: dict[str, tuple]) -> None:
    resumes = path(workdir) / "resumes.jsonl"
    old = resumes.read_text() if resumes.exists() else ""
    line = json.dumps({"step": step, "changed": {k: new for k, (_, new) in sorted(changes.items())}})
    write_text(resumes, old + line + "\n")


def read_summary(workdir: str) -> dict | None:
    summary = path(workdir) / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


def write_summary(workdir: str, summary: dict) -> epath.Path:
    summary_path = path(workdir) / "summary.json"
    write_text(summary_path, json.dumps(summary, indent=1))
    return summary_path
