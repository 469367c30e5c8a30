"""The trainer, as one story: config, mesh, data, model and optimizer, checkpoint restore, step,
loop, evaluation. `run(config, workdir)` is what `main.py` calls and what a notebook can call; it
returns the final metrics and resumes from the newest checkpoint in `workdir` by itself.
"""
import functools
import time

import jax
import ml_collections
import numpy as np

from masksub_jax import checkpoint, convert, goodput, metrics, models, preemption, profiling, sharding, xla_cache
from masksub_jax import config as config_lib
from masksub_jax import evaluate as evaluate_lib
from masksub_jax import init_from as init_from_lib
from masksub_jax import probes as probes_lib
from masksub_jax import step as step_lib
from masksub_jax import workdir as workdir_lib
from masksub_jax.data import pipeline


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or Inf and config.on_nonfinite is "stop"."""


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) and evaluates; returns the final metrics (also WORKDIR/summary.json).

    Raises preemption.Preempted after saving if told to stop (SIGTERM, or a TPU preemption notice),
    NonFiniteError if the loss diverges with config.on_nonfinite="stop", and workdir.WorkdirError if
    the workdir holds another run. On every way out the checkpoint write in flight is finished first.
    """
    start_time = time.time()
    # ----------------------------------------------------------------------------------------------
    # Config and workdir: checked whole before anything is loaded or compiled.
    config_lib.validate(config, num_devices=jax.device_count())
    is_chief = jax.process_index() == 0
    say = functools.partial(_say, is_chief)
    flat = dict(config_lib.flatten(config))
    workdir_lib.check_writable(workdir, jax.process_index())
    xla_cache.use(config.compilation_cache_dir, workdir)  # before anything compiles
    with checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints) as checkpoints:
        # The run this workdir holds, read by every process before any of them writes to it.
        run_config = workdir_lib.started_config(workdir) if checkpoints.steps() else None
        changes = workdir_lib.changed_keys(run_config, flat)
        workdir_lib.check_same_run(workdir, changes)
        sharding.barrier("workdir read")
        summary = _train(config, flat, workdir, checkpoints, changes, say, start_time)
    return {**summary, "history": metrics.read_history(workdir) if is_chief else []}


def _train(config, flat, workdir, checkpoints, changes, say, start_time) -> dict:
    is_chief = jax.process_index() == 0
    # ----------------------------------------------------------------------------------------------
    # Device mesh (data x fsdp): the batch is split over all devices, large state arrays over fsdp.
    say(sharding.describe_devices())
    if warning := sharding.unused_accelerator(jax.default_backend()):
        say(warning)
    mesh = sharding.make_mesh(config.mesh.fsdp)
    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    clock = goodput.Clock(workdir, is_chief, start_time, sharding.topology(mesh))

    # ----------------------------------------------------------------------------------------------
    # Data: the train and eval splits, and the extra eval sets (each missing one named now). Process
    # 0 goes first: it lists an image folder once and keeps the lists in the workdir for the others.
    def data_sets(resuming):
        processes = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                         batch_multiple=jax.device_count(), workdir=workdir, resuming=resuming)
        data = pipeline.make(config, **processes)
        return data, {"": data} | pipeline.make_extra_evals(config, data.class_names, **processes)
    if is_chief:
        data, eval_sets = data_sets(resuming=bool(checkpoints.steps()))
    sharding.barrier("data listed")
    if not is_chief:
        data, eval_sets = data_sets(resuming=True)
    total_steps = config.total_steps
    if total_steps is None:
        if data.num_train_examples is None:
            raise ValueError(f"The size of split {config.data.train_split!r} is unknown; set config.total_steps.")
        steps_per_epoch = data.num_train_examples // config.batch_size
        total_steps = max(1, round(config.total_epochs * steps_per_epoch))
    else:
        steps_per_epoch = (data.num_train_examples or config.batch_size) // config.batch_size

    # ----------------------------------------------------------------------------------------------
    # Model and optimizer; the state is created directly with its sharding.
    model = step_lib.make_model(config, data.num_classes)
    tx, schedule = step_lib.make_optimizer(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    init = step_lib.make_init(model, tx, data.image_shape, ema=bool(config.ema.decay))
    rng = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init, rng)
    state_sharding = sharding.state_sharding(abstract_state, mesh)

    # ----------------------------------------------------------------------------------------------
    # Checkpoint restore, else a fresh state.
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, state_sharding)
    with clock.timing("restore"):
        state = checkpoints.restore_latest(abstract_sharded, say=say)
    fresh = state is None
    if fresh:
        state = jax.jit(init, out_shardings=state_sharding)(rng)
        start_step = 0
        if config.init_from:
            loaded = convert.adapt_variables(_read_init_from(config.init_from),
                                             jax.device_get(step_lib.variables(state)), family=config.model.family,
                                             say=say)
            for name, value in loaded.items():
                state[name] = jax.device_put(value, state_sharding[name])
                if "ema" in state:  # the average starts at the weights it averages
                    state["ema"][name] = jax.device_put(value, state_sharding["ema"][name])
            say(f"Initialised the {' and '.join(loaded)} from {config.init_from}.")
            for line in init_from_lib.implied_differences(config, config.init_from):
                say(line)
    else:
        start_step = int(jax.device_get(state["step"]))
        summary = workdir_lib.read_summary(workdir)
        if start_step >= total_steps and summary is not None:
            workdir_lib.check_finished_run(workdir, changes, say)
            say(f"Run in {workdir} already finished at step {start_step}: "
                f"top1 {summary['top1']:.4f}. Nothing to do.")
            return summary
        say(f"Resuming from the checkpoint of step {start_step} in {workdir}."
            + (f" Changed since the run started: {workdir_lib.describe(changes)}." if changes else ""))
        if moved := sharding.describe_topology_change(clock.record, clock.previous() or {}):
            say(moved)
    clock.begin(start_step, fresh=fresh)

    # ----------------------------------------------------------------------------------------------
    # The steps.
    train_step = jax.jit(step_lib.make_train_step(config, model, tx, schedule, data.num_classes),
                         in_shardings=(state_sharding, batch_sharding, replicated),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    input_preview = jax.jit(step_lib.make_input_preview(config, data.num_classes), out_shardings=replicated)
    evaluate = evaluate_lib.make_evaluations(config, model, eval_sets, mesh, step_lib.variables(state_sharding),
                                             ema=bool(config.ema.decay), say=say)
    evaluate = probes_lib.extend(evaluate, config, model, mesh, step_lib.variables(state_sharding),  # config.probes
                                 ema=bool(config.ema.decay), say=say)

    def record_start():
        """Once the first step has run on every process: the run has really started."""
        sharding.barrier("first step")
        if not is_chief:
            return
        if fresh:
            workdir_lib.record_start(workdir, flat)
        elif changes:
            workdir_lib.record_resume(workdir, start_step, changes)

    # ----------------------------------------------------------------------------------------------
    # The loop.
    profiler = profiling.Profiler(workdir, config.profile, is_chief)
    writer = metrics.make_writer(workdir, is_chief, start_step, wandb=config.wandb, flat_config=flat)
    writer.write_hparams(flat)  # kept once per run (metrics.py)
    progress = metrics.Progress(total_steps, config.batch_size, start_step)
    say(f"Training {models.of(config).describe(config)} ({_count(state['params']) / 1e6:.2f}M params) "
        f"with MaskSub mode={config.masksub.mode} ratio={config.masksub.ratio} for "
        f"{total_steps} steps of {config.batch_size} on {jax.device_count()} device(s).")
    pending, window = [], []  # step metrics on the device; fetched ones since the last log line
    first_inputs = None
    step = start_step
    batches = pipeline.prefetch((sharding.to_global(batch, batch_sharding) for batch in data.train_batches(start_step)),
                                size=2)
    say("compiling the train step...")
    with preemption.Watch(checkpoints, jax.process_count()) as watch:
        while step < total_steps:
            waiting_since = time.perf_counter()
            batch = next(batches)
            progress.waited(waited := time.perf_counter() - waiting_since)
            clock.add("input_wait", waited)
            step_rng = jax.random.fold_in(state["rng"], step)
            profiler.before(step)
            state, step_metrics = train_step(state, batch, step_rng)
            if step == start_step:
                jax.block_until_ready(step_metrics)
                first_inputs = input_preview(batch, step_rng)  # compiled here too: before the clock restarts
                compiled = progress.restart(step + 1)
                clock.add("compile", compiled - waited)  # the first batch's wait is input_wait's
                say(f"compiled and ran the first step in {compiled:.1f} s")
                record_start()
                with clock.timing("compile"):
                    profiler.dump_hlo(train_step, abstract_sharded, batch, step_rng)
                progress.restart(step + 1)  # the dump's compile is not the steps' time
                clock.save(step + 1)  # a session that dies before its first log keeps its line
            step += 1
            profiler.after(step, step_metrics)
            pending.append((step, step_metrics))
            preempted = watch.reached(step)
            save_now = step % config.checkpoint_every_steps == 0 or step == total_steps or preempted
            log_now = step % config.log_every_steps == 0 or step == total_steps
            if log_now or save_now:  # no NaN check is skipped before a save
                window += _fetch_and_check(pending, config.on_nonfinite, checkpoints, say)
                pending = []
            if log_now:
                scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "lr"}
                scalars["lr"] = float(window[-1]["lr"])  # this step's, not the window's mean (timm's too)
                window = []
                steps_per_s = progress.rate(step)
                if steps_per_s:
                    scalars["examples_per_s"] = steps_per_s * config.batch_size
                    scalars["input_wait"] = progress.input_wait
                writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                if first_inputs is not None:  # what the branches of this session's first step saw
                    inputs, sub_inputs = jax.device_get(first_inputs)
                    writer.write_images(step, {"train/inputs": inputs} | (
                        {"train/sub_branch_inputs": sub_inputs} if sub_inputs is not None else {}))
                    first_inputs = None
                writer.flush()
                say(progress.line(step, scalars, steps_per_s))
                clock.save(step)
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total_steps:
                with clock.timing("eval"):
                    result = evaluate(state)
                writer.write_scalars(step, _eval_scalars(result))
                writer.flush()
                say(f"eval at step {step}: {evaluate_lib.describe(result)}")
                progress.restart(step)  # the evaluation's time is not the steps'
            if save_now:
                with clock.timing("save"):
                    checkpoints.save(state, force=preempted)
            if preempted and step < total_steps:
                with clock.timing("save"):
                    checkpoints.wait()
                writer.close()
                profiler.stop()
                clock.save(step)
                raise preemption.Preempted(step, workdir)
        with clock.timing("save"):
            checkpoints.wait()  # the last checkpoint is on disk before a SIGTERM may end the process
    profiler.stop()  # a trace whose last step the run did not reach

    # ----------------------------------------------------------------------------------------------
    # Final evaluation, and where the run's time went.
    with clock.timing("eval"):
        result = evaluate(state)
    writer.write_scalars(step, _eval_scalars(result))
    writer.close()
    clock.save(step)
    time_spent = clock.summary()
    summary = {"step": step, **result, "wall_s": time.time() - start_time, "time": time_spent}
    summary_path = workdir_lib.path(workdir) / "summary.json"
    if is_chief:
        workdir_lib.write_summary(workdir, summary)
    say(f"Finished at step {step}: {evaluate_lib.describe(result)} "
        f"on {result['eval_examples']} eval examples, {summary['wall_s']:.0f} s this session; "
        f"{goodput.describe(time_spent)}. Summary: {summary_path}")
    return summary


def _read_init_from(path: str) -> dict:
    """The weights config.init_from names, checked: a workdir's newest checkpoint (its final weights,
    not an older one in their stead) or converted weights, either damaged an error before any step."""
    try:
        return convert.read_variables(path, fall_back=False)
    except checkpoint.DamagedCheckpointError as e:
        raise checkpoint.DamagedCheckpointError(f"config.init_from={path!r}: {e}") from None


def _fetch_and_check(pending, policy: str, checkpoints, say) -> list[dict]:
    """The pending steps' metrics on the host. A NaN or Inf step (whose update the step did not
    apply) stops the run under policy "stop", after the checkpoints in flight are written."""
    fetched = [(step, jax.device_get(m)) for step, m in pending]
    bad = [(step, m) for step, m in fetched if m["nonfinite"]]
    if bad and policy == "stop":
        checkpoints.wait()
        step, m = bad[0]
        raise NonFiniteError(
            f"The loss or gradient is NaN or Inf at step {step} (loss_main {m['loss_main']}, loss_sub "
            f"{m['loss_sub']}, grad_norm {m['grad_norm']}). Its update was not applied and no checkpoint "
            f"after it was written; {checkpoints.describe_latest()}. Lower optim.lr or lengthen "
            "optim.warmup_epochs and rerun (it resumes from the newest checkpoint, or starts afresh), or set "
            "--config.on_nonfinite=skip to skip such steps.")
    if bad:
        say(f"WARNING: NaN or Inf loss or gradient at steps {[step for step, _ in bad]}: "
            "their updates were skipped (config.on_nonfinite='skip').")
    return [{k: float(v) for k, v in m.items()} for _, m in fetched]


def _eval_scalars(result: dict) -> dict:
    """eval/top1, eval/imagenet_v2/top1, eval/ema/top1, ... (the example counts are not metrics)."""
    return {f"eval/{k}": v for k, v in result.items() if not k.endswith("eval_examples")}


def _count(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _say(is_chief: bool, line: str) -> None:
    if is_chief:
        print(line, flush=True)
