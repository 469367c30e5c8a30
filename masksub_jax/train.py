"""The trainer, as one story: config, mesh, data, model and optimizer, checkpoint restore, step,
loop, evaluation. `run(config, workdir)` is what `main.py` calls and what a notebook can call; it
returns the final metrics and resumes from the newest checkpoint in `workdir` by itself.
"""
import functools
import json
import time

import jax
import ml_collections
import numpy as np

from masksub_jax import checkpoint, convert, metrics, preemption, sharding
from masksub_jax import config as config_lib
from masksub_jax import step as step_lib
from masksub_jax.data import pipeline


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or Inf and config.on_nonfinite is "stop"."""


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) and evaluates; returns the final metrics (also WORKDIR/summary.json).

    Raises preemption.Preempted after saving if told to stop (SIGTERM, or a TPU preemption notice),
    and NonFiniteError if the loss diverges with config.on_nonfinite="stop".
    """
    start_time = time.time()
    # ----------------------------------------------------------------------------------------------
    # Config and workdir: checked whole before anything is loaded or compiled.
    config_lib.validate(config, num_devices=jax.device_count())
    is_chief = jax.process_index() == 0
    say = functools.partial(_say, is_chief)
    _check_writable(workdir)
    _check_same_run(config, workdir)
    summary_path = checkpoint.path(workdir) / "summary.json"

    # ----------------------------------------------------------------------------------------------
    # Device mesh (data x fsdp): the batch is split over all devices, large state arrays over fsdp.
    mesh = sharding.make_mesh(config.mesh.fsdp)
    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    # ----------------------------------------------------------------------------------------------
    # Data.
    data = pipeline.make(config, jax.process_index(), jax.process_count())
    total_steps = config.total_steps
    if total_steps is None:
        if data.num_train_examples is None:
            raise ValueError(f"The size of split {config.data.train_split!r} is unknown; set config.total_steps.")
        steps_per_epoch = data.num_train_examples // config.batch_size
        total_steps = max(1, round(config.total_epochs * steps_per_epoch))
    else:
        steps_per_epoch = (data.num_train_examples or config.batch_size) // config.batch_size

    def to_global(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}

    # ----------------------------------------------------------------------------------------------
    # Model and optimizer; the state is created directly with its sharding.
    model = step_lib.make_model(config, data.num_classes)
    tx, schedule = step_lib.make_optimizer(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    init = step_lib.make_init(model, tx, data.image_shape)
    rng = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init, rng)
    state_sharding = sharding.state_sharding(abstract_state, mesh)

    # ----------------------------------------------------------------------------------------------
    # Checkpoint restore, else a fresh state.
    mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, state_sharding)
    state = checkpoint.restore_latest(mngr, abstract_sharded, say=say)
    if state is None:
        state = jax.jit(init, out_shardings=state_sharding)(rng)
        start_step = 0
        if config.init_from:
            params = convert.adapt_params(convert.read_params(config.init_from), jax.device_get(state["params"]),
                                          say=say)
            state["params"] = jax.device_put(params, state_sharding["params"])
            say(f"Initialised the parameters from {config.init_from}.")
    else:
        start_step = int(jax.device_get(state["step"]))
        if start_step >= total_steps and summary_path.exists():
            summary = json.loads(summary_path.read_text())
            say(f"Run in {workdir} already finished at step {start_step}: "
                f"top1 {summary['top1']:.4f}. Nothing to do.")
            return summary
        say(f"Resuming from the checkpoint of step {start_step} in {workdir}.")

    # ----------------------------------------------------------------------------------------------
    # The steps.
    train_step = jax.jit(step_lib.make_train_step(config, model, tx, schedule, data.num_classes),
                         in_shardings=(state_sharding, batch_sharding, replicated),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    eval_step = jax.jit(step_lib.make_eval_step(config, model, data.num_classes),
                        in_shardings=(state_sharding["params"], batch_sharding), out_shardings=replicated)

    def evaluate(params):
        sums = [eval_step(params, to_global(batch)) for batch in data.eval_batches()]
        sums = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
        return {"top1": sums["correct1"] / sums["count"], "top5": sums["correct5"] / sums["count"],
                "eval_examples": int(sums["count"])}

    # ----------------------------------------------------------------------------------------------
    # The loop.
    writer = metrics.make_writer(workdir, is_chief)
    if start_step == 0:
        writer.write_hparams(dict(config_lib.flatten(config)))
    progress = metrics.Progress(total_steps, config.batch_size, start_step)
    say(f"Training ViT-{config.model.variant} ({_count(state['params']) / 1e6:.2f}M params) "
        f"with MaskSub mode={config.masksub.mode} ratio={config.masksub.ratio} for "
        f"{total_steps} steps of {config.batch_size} on {jax.device_count()} device(s).")
    pending, window = [], []  # step metrics on the device; fetched ones since the last log line
    step = start_step
    batches = pipeline.prefetch(map(to_global, data.train_batches(start_step)), size=2)
    with preemption.Watch(mngr, say) as watch:
        while step < total_steps:
            state, step_metrics = train_step(state, next(batches),
                                             jax.random.fold_in(state["rng"], step))
            step += 1
            pending.append((step, step_metrics))
            preempted = watch.reached(step)
            save_now = step % config.checkpoint_every_steps == 0 or step == total_steps or preempted
            log_now = step % config.log_every_steps == 0 or step == total_steps
            if log_now or save_now:  # no NaN check is skipped before a save
                window += _fetch_and_check(pending, config.on_nonfinite, mngr, say)
                pending = []
            if log_now:
                scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                window = []
                scalars["examples_per_s"] = progress.rate(step) * config.batch_size
                writer.write_scalars(step, scalars)
                writer.flush()
                say(progress.line(step, scalars, scalars["examples_per_s"] / config.batch_size))
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total_steps:
                result = evaluate(state["params"])
                writer.write_scalars(step, {f"eval_{k}": v for k, v in result.items()})
                writer.flush()
                say(f"eval at step {step}: top1 {result['top1']:.4f} top5 {result['top5']:.4f}")
            if save_now:
                checkpoint.save(mngr, state, force=preempted)
            if preempted and step < total_steps:
                checkpoint.wait(mngr)
                writer.flush()
                raise preemption.Preempted(step, workdir)

    # ----------------------------------------------------------------------------------------------
    # Final evaluation, once the last checkpoint is safely written.
    checkpoint.wait(mngr)
    result = evaluate(state["params"])
    writer.write_scalars(step, {f"eval_{k}": v for k, v in result.items()})
    writer.flush()
    summary = {"step": step, **result, "wall_s": time.time() - start_time}
    if is_chief:
        summary_path.write_text(json.dumps(summary, indent=1))
    say(f"Finished at step {step}: top1 {result['top1']:.4f} top5 {result['top5']:.4f} "
        f"on {result['eval_examples']} eval examples, {summary['wall_s']:.0f} s this session. "
        f"Summary: {summary_path}")
    return summary


def _fetch_and_check(pending, policy: str, mngr, say) -> list[dict]:
    """The pending steps' metrics on the host. A NaN or Inf step (whose update the step did not
    apply) stops the run under policy "stop", after the checkpoints in flight are written."""
    fetched = [(step, jax.device_get(m)) for step, m in pending]
    bad = [(step, m) for step, m in fetched if m["nonfinite"]]
    if bad and policy == "stop":
        checkpoint.wait(mngr)
        step, m = bad[0]
        raise NonFiniteError(
            f"The loss or gradient is NaN or Inf at step {step} (loss_main {m['loss_main']}, loss_sub "
            f"{m['loss_sub']}, grad_norm {m['grad_norm']}). Its update was not applied and no checkpoint "
            f"after it was written; the newest is step {mngr.latest_step()}. Lower optim.lr or lengthen "
            "optim.warmup_epochs and rerun (it resumes from there), or set --config.on_nonfinite=skip "
            "to skip such steps.")
    if bad:
        say(f"WARNING: NaN or Inf loss or gradient at steps {[step for step, _ in bad]}: "
            "their updates were skipped (config.on_nonfinite='skip').")
    return [{k: float(v) for k, v in m.items()} for _, m in fetched]


def _check_writable(workdir: str) -> None:
    try:
        checkpoint.path(workdir).mkdir(parents=True, exist_ok=True)
        probe = checkpoint.path(workdir) / f".write_test_{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"Cannot write to --workdir={workdir}: {e}. Use a directory this process can "
                      "create and write to.") from None


def _count(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _say(is_chief: bool, line: str) -> None:
    if is_chief:
        print(line, flush=True)


# What cannot change between a run and its resumption without breaking the checkpoint or the run.
# The data order and augmentations are a function of these and the step (data/tfds_source.py).
_RUN_DEFINING = ("seed", "model.variant", "data.source", "data.name", "data.train_split", "data.image_size",
                 "data.augment", "data.color_jitter", "data.repeated_aug", "batch_size")


def _check_same_run(config, workdir: str) -> None:
    """Writes WORKDIR/config.json; refuses to resume a workdir trained with a different model or data."""
    path = checkpoint.path(workdir) / "config.json"
    flat = dict(config_lib.flatten(config))
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [k for k in _RUN_DEFINING if k in saved and saved[k] != flat[k]]
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different {', '.join(changed)} "
                f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}; now "
                f"{', '.join(f'{k}={flat[k]!r}' for k in changed)}). Use a new --workdir, or the old values.")
    if jax.process_index() == 0:
        path.write_text(json.dumps(flat, indent=1, default=list))
