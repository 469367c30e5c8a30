"""Evaluation and prediction outside the trainer, for notebooks and the command line.

  python -m masksub_jax.evaluate --workdir=runs/digits
  python -m masksub_jax.evaluate --workdir=runs/vit_b --ema --config.data.data_dir=DIR \
      '--config.data.extra_evals=("imagenet_v2:test", "imagenet2012_real:validation")'
  python -m masksub_jax.evaluate --config=configs/vit_b.py --init_from=inits/deit3_b --config.data.data_dir=...

evaluates a training workdir's newest intact checkpoint (or its moving average of the weights,
--ema) with the run's own config (WORKDIR/config.json; `--config.KEY=VALUE` changes a key, e.g. the
data_dir on another machine), or weights converted with `masksub_jax.convert` (timm, DeiT-III, MAE,
...) with --config, on the config's eval split and extra eval sets, and prints top-1 / top-5 (ReaL:
top-1; ImageNet-C: top-1 per corruption, mean top-1 and mCE), then one markdown table of every set
(`table`). The robustness sets (imagenet_a, imagenet_r, imagenet_sketch, imagenet_v2/CONFIG,
imagenet2012_corrupted[/CORRUPTIONS[/SEVERITIES]]) and their protocols: data/robustness.py. The
weights are checked against their checksums; a damaged newest checkpoint is skipped, saying so. It
writes nothing.
From Python: `load_variables`, `evaluate` and `predict` (logits for any images, optionally as the
sub-branch sees them), and `run_config` (the config a workdir's run trains with).
"""
from masksub_jax import cli  # noqa: I001  (first: it quiets TensorFlow's C++ logging before TF loads)

import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax import convert, init_from, masksub, models, sharding
from masksub_jax import step as step_lib
from masksub_jax.data import pipeline, robustness


def make_evaluator(config, model, data, mesh, variables_sharding, *, compiled: dict | None = None):
    """variables -> {"top1", "top5", "eval_examples"} over `data`'s eval split, on `mesh`; every
    example counts once (eval batches are padded, the padding masked out). ReaL sets: no top5, and
    eval_examples counts the images with a non-empty set. ImageNet-A / R (`robustness.ClassSubset`):
    scored on their 200 classes' logits. ImageNet-C (`robustness.CorruptionSuite`): every corruption
    and severity, summarised (per-corruption top1, mean top1, mCE). `compiled`: eval steps to share
    with other sets (a dict `make_evaluations` keeps), so that sets of the same batch shape compile once."""
    compiled = {} if compiled is None else compiled

    def eval_step(num_classes: int, classes: tuple | None = None):
        if (num_classes, classes) not in compiled:
            scored = model if classes is None else RestrictedLogits(model, classes, num_classes)
            compiled[num_classes, classes] = _compiled_eval_step(config, scored, num_classes, mesh, variables_sharding)
        return compiled[num_classes, classes]

    if isinstance(data, robustness.CorruptionSuite):
        parts = {key: _evaluator(eval_step(part.num_classes), part, mesh) for key, part in data.parts.items()}
        return lambda variables: data.summarise({key: evaluate(variables) for key, evaluate in parts.items()})
    classes = tuple(data.classes) if isinstance(data, robustness.ClassSubset) else None
    return _evaluator(eval_step(data.num_classes, classes), data, mesh)


class RestrictedLogits:
    """`model` with the logits of classes outside `classes` at -inf: its top-k are among those
    classes, ranked as the model ranks them, which is scoring `logits[:, classes]` against labels
    renumbered 0..len(classes)-1 (Hendrycks' eval.py for ImageNet-A / R; timm's --valid-labels)."""

    def __init__(self, model, classes, num_classes: int):
        self.model = model
        self.keep = np.zeros(num_classes, bool)
        self.keep[list(classes)] = True

    def apply(self, variables, images, **kwargs):
        logits = self.model.apply(variables, images, **kwargs)
        return jnp.where(self.keep, logits, -jnp.inf)


def _compiled_eval_step(config, model, num_classes: int, mesh, variables_sharding):
    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(step_lib.make_eval_step(config, model, num_classes),
                   in_shardings=(variables_sharding, batch_sharding), out_shardings=sharding.replicated(mesh))


def _evaluator(eval_step, data, mesh):
    batch_sharding = sharding.batch_sharding(mesh)

    def evaluate(variables):
        sums = [eval_step(variables, sharding.to_global(batch, batch_sharding)) for batch in data.eval_batches()]
        sums = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
        count = max(sums["count"], 1.0)
        top5 = {"top5": sums["correct5"] / count} if "correct5" in sums else {}
        return {"top1": sums["correct1"] / count, **top5, "eval_examples": int(sums["count"])}
    return evaluate


def make_evaluations(config, model, sources: dict, mesh, variables_sharding, *, ema: bool, say=print):
    """state -> every evaluation of a run: each eval set of `sources` ({"": the eval split, name: an
    extra set}) with the live weights and, with `ema`, with their average. Keys: "top1", "top5",
    "eval_examples" (the eval split's), "NAME/top1", ..., and the same under "ema/"."""
    compiled = {}
    evaluators = {name: make_evaluator(config, model, data, mesh, variables_sharding, compiled=compiled)
                  for name, data in sources.items()}

    def evaluate(state) -> dict:
        weights = {"": step_lib.variables(state)} | ({"ema/": state["ema"]} if ema else {})
        results = {}
        for which, variables in weights.items():
            for name, evaluator in evaluators.items():
                prefix = which + (f"{name}/" if name else "")
                say(f"evaluating {sources[name].num_eval_examples} examples"
                    + (f" ({prefix.rstrip('/')})" if prefix else "") + "...")
                results.update({prefix + k: v for k, v in evaluator(variables).items()})
        return results
    return evaluate


def describe(results: dict) -> str:
    """'top1 0.8123 top5 0.9512, imagenet_v2 top1 0.7012 ..., ema top1 ...' of `make_evaluations`' results."""
    groups = {}
    for key, value in results.items():
        prefix, _, metric = key.rpartition("/")
        if metric != "eval_examples":
            groups.setdefault(prefix, []).append(f"{metric} {value:.4f}")
    return ", ".join((f"{prefix} " if prefix else "") + " ".join(values) for prefix, values in groups.items())


def table(results: dict, model: str, eval_set: str) -> str:
    """`make_evaluations`' results as the markdown table a paper pastes: a row per set (the eval split,
    named `eval_set`, then each extra set; the moving average's rows after), with top-1 and top-5 in
    percent, and mCE (percent of AlexNet's errors) when an ImageNet-C set has one; '-' where a set has
    no such figure (ReaL: no top-5)."""
    sets = [key[:-len("eval_examples")].rstrip("/") for key in results if key.rpartition("/")[2] == "eval_examples"]
    with_mce = any(f"{prefix}/mce" in results for prefix in sets)
    header = ["model", "set", "top-1", "top-5"] + (["mCE"] if with_mce else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for prefix in sorted(sets, key=lambda p: (p == "ema" or p.startswith("ema/"), p not in ("", "ema"))):
        ema = prefix == "ema" or prefix.startswith("ema/")
        name = prefix[4:] if ema and prefix != "ema" else "" if ema else prefix
        key = f"{prefix}/" if prefix else ""
        row = [model + (" (EMA)" if ema else ""), name or eval_set]
        row += [f"{100 * results[key + m]:.2f}" if key + m in results else "-" for m in ("top1", "top5")]
        if with_mce:
            row.append(f"{results[key + 'mce']:.2f}" if key + "mce" in results else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def eval_set_name(config) -> str:
    """The config's eval split as the table names it, e.g. imagenet2012:validation."""
    d = config.data
    return {"tfds": f"{d.name}:{d.eval_split}", "folder": f"folder:{d.folder}/{d.eval_split}",
            "digits": "digits:test"}.get(d.source, d.source)


def load_variables(config, path: str, num_classes: int, *, ema: bool = False, say=print) -> dict:
    """The variables (params, and ResNet's batch_stats) for `config`'s model from `path`: a training
    workdir (its newest intact checkpoint, a damaged one skipped and said; with `ema`, its moving
    average) or weights written by `python -m masksub_jax.convert`, checked against their checksums
    and adapted to the model as `config.init_from` is (a new head or image size is said, not
    silent). NumPy arrays. Weights of another family or variant than the config's, as far as their
    record says (init_from.check), are an error before anything is read."""
    init_from.check(config, path, flag="path")
    return fit_variables(config, convert.read_variables(path, ema=ema, say=say), num_classes, say=say)


def fit_variables(config, loaded: dict, num_classes: int, *, say=print) -> dict:
    """Variables as read (`convert.read_variables`) fitted to `config`'s model with `num_classes`."""
    model = step_lib.make_model(config, num_classes)
    image = jnp.zeros((1, config.data.image_size, config.data.image_size, len(config.data.mean)), jnp.float32)
    initial = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(config.seed), image))
    return convert.adapt_variables(loaded, initial, family=config.model.family, say=say)


def run_config(workdir: str, overrides: dict | None = None):
    """The config the run in `workdir` trains with (its config.json, with the changes its resumes
    recorded) over the schema's defaults, and `overrides` (dotted keys) on top. None if the workdir
    has no config.json."""
    from masksub_jax import config as config_lib
    from masksub_jax import workdir as workdir_lib
    record = workdir_lib.started_config(workdir)
    if record is None:
        return None
    config = config_lib.base()
    schema = dict(config_lib.flatten(config))
    values = {k: tuple(v) if isinstance(schema.get(k), tuple) and isinstance(v, list) else v
              for k, v in record.items()}
    try:
        config_lib.override(config, values)
    except ValueError as e:
        raise ValueError(f"{workdir_lib.path(workdir) / 'config.json'}: {e} Pass --config=FILE with the run's "
                         "model and data.") from None
    return config_lib.override(config, overrides or {})


def evaluate(config, variables, data=None, extra_evals=None, *, say=lambda line: None) -> dict:
    """Top-1 / top-5 of `variables` on `config`'s eval split (of `data`, the source, if given) and on
    `extra_evals` ({name: source}, `pipeline.make_extra_evals`), on all devices: {"top1", "top5",
    "eval_examples", "NAME/top1", ...}."""
    data = data or _source(config)
    mesh = sharding.make_mesh(config.mesh.fsdp)
    variables_sharding = sharding.state_sharding(variables, mesh)
    model = step_lib.make_model(config, data.num_classes)
    evaluations = make_evaluations(config, model, {"": data} | (extra_evals or {}), mesh, variables_sharding,
                                   ema=False, say=say)
    from masksub_jax import probes  # config.probes: few-shot, linear and kNN probes of the features
    evaluations = probes.extend(evaluations, config, model, mesh, variables_sharding, ema=False, say=say)
    return evaluations(jax.device_put(variables, variables_sharding))


def _source(config, workdir=None):
    """The config's data; a training workdir's file lists and class map for an image-folder run."""
    return pipeline.make(config, jax.process_index(), jax.process_count(), batch_multiple=jax.device_count(),
                         workdir=workdir, resuming=True, write_lists=False)


def predict(config, variables, images, *, sub_branch_rng=None) -> np.ndarray:
    """Eval-mode logits (N, classes) for uint8 images (N, H, W, C) at the config's image size. With
    `sub_branch_rng`, as the masking sub-branch sees them: `int(L * (1 - masksub.ratio))` of the L
    units kept, drawn from that key (`step.make_input_preview` shows which)."""
    check_images(config, images)
    family = models.of(config)
    model = step_lib.make_model(config, models.num_classes(family, variables["params"]))
    corruption = {}
    if sub_branch_rng is not None:
        if config.masksub.mode != "masking":
            raise ValueError(f"masksub.mode={config.masksub.mode!r}: only masking's sub-branch differs from the "
                             "main branch in eval mode.")
        corruption = masksub.corruption("masking", config.masksub.ratio, sub_branch_rng, len(images),
                                        family.num_units(config))
    normalise = step_lib.normaliser(config)
    apply = jax.jit(lambda v, x, c: model.apply(v, normalise(x), train=False, **c))
    return np.asarray(apply(variables, jnp.asarray(images), corruption))


def check_images(config, images) -> None:
    """ValueError, in one line, unless `images` are what `predict` takes: uint8 pixels (N, S, S, C)
    with S = config.data.image_size and C = len(config.data.mean)."""
    size, channels = config.data.image_size, len(config.data.mean)
    takes = (f"predict takes uint8 images of shape (N, {size}, {size}, {channels}) (config.data.image_size={size}, "
             f"{channels} channel(s) as config.data.mean has)")
    dtype, shape = getattr(images, "dtype", None), tuple(getattr(images, "shape", ()))
    if dtype != np.uint8:
        raise ValueError(f"{takes}; got {dtype or type(images).__name__} images. Pass the 0-255 pixels as uint8: "
                         "predict normalises them with config.data.mean and std itself.")
    if len(shape) != 4:
        hint = (" (one image: images[None])" if shape == (size, size, channels) else
                " (single-channel images: images[..., None])" if shape[1:] == (size, size) and channels == 1 else "")
        raise ValueError(f"{takes}; got shape {shape}{hint}.")
    if shape[0] == 0:
        raise ValueError(f"{takes}; got no images (shape {shape}).")
    if shape[1:] != (size, size, channels):
        fix = (f"resize them to {size}x{size}" if shape[3] == channels else
               f"give them {channels} channel(s), or use a config whose data.mean has {shape[3]}")
        raise ValueError(f"{takes}; got shape {shape}: {fix}.")


def _define_flags(flag_values=None, argv=None):
    """The command's flags, on absl's global FLAGS or on `flag_values` (a test's own FlagValues, with
    the `argv` it parses: the --config.KEY flags are defined from it)."""
    import os

    from absl import flags
    from ml_collections import config_flags
    on = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
    # Without --config the schema's defaults stand in, so that --config.KEY=VALUE still parses; the
    # run's config.json gives the values (command_config).
    schema = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "_schema.py")
    config_flags.DEFINE_config_file("config", schema, "Config file, e.g. configs/vit_b.py: the model and data "
                                    "of --init_from's weights. With --workdir the run's own config.json is used "
                                    "(--config.KEY=VALUE changes a key).", lock_config=False,
                                    accept_new_attributes=True, sys_argv=argv, **on)
    flags.DEFINE_string("workdir", None, "A training workdir: its newest intact checkpoint is evaluated.", **on)
    flags.DEFINE_string("init_from", None, "Weights written by `python -m masksub_jax.convert` (needs --config).",
                        **on)
    flags.DEFINE_bool("ema", False, "With --workdir: evaluate the run's moving average of the weights.", **on)
    flags.DEFINE_bool("verbose", False, "On an error, print its traceback too.", **on)


def command_config(config_flag, workdir: str | None, say=print):
    """The config the command evaluates with: with --workdir the run's (run_config) and the
    command's --config.KEY overrides; else the --config file (with them), which is then required."""
    from masksub_jax import config as config_lib
    from masksub_jax import workdir as workdir_lib
    overrides = dict(config_flag.override_values)
    if not workdir:
        if not config_flag.present:
            raise cli.CommandError("--init_from needs --config=FILE: the model and data to evaluate the weights "
                                   "with (e.g. --config=configs/vit_b.py).")
        return config_flag.value
    if not workdir_lib.path(workdir).exists():
        raise FileNotFoundError(f"--workdir={workdir} does not exist; give a training workdir.")
    if not (workdir_lib.path(workdir) / "checkpoints").exists():
        raise FileNotFoundError(f"--workdir={workdir} is not a training workdir (it has no checkpoints/); give the "
                                "--workdir a run trained in, or --init_from converted weights with --config.")
    config = run_config(workdir, overrides)
    if config is None:
        if config_flag.present:  # a run that has not recorded its config (it never took a step)
            return config_flag.value
        raise cli.CommandError(f"{workdir} has no config.json (the run never took its first step, or this is no "
                               "training workdir); pass --config=FILE with its model and data.")
    if config_flag.present:
        given = workdir_lib.as_record(dict(config_lib.flatten(config_flag.value)))
        run = workdir_lib.as_record(dict(config_lib.flatten(config)))
        differ = [k for k in run if k not in overrides and given.get(k) != run[k]]
        if differ:
            say(f"Note: evaluating with the run's config ({workdir_lib.path(workdir) / 'config.json'}), not "
                f"{config_flag.config_filename}'s values of {', '.join(sorted(differ))}; --config.KEY=VALUE "
                "changes a key.")
    return config


def main(argv):
    from absl import flags, logging
    f = flags.FLAGS
    if not f["verbosity"].present:  # the result is printed; library INFO logs only on request
        logging.set_verbosity(logging.WARNING)
    with cli.errors_in_one_line(None, verbose=f.verbose):  # it writes nothing: the traceback goes to $TMPDIR
        if len(argv) > 1:
            raise cli.CommandError(f"Unexpected arguments: {argv[1:]}")
        _evaluate_command(f)


def _say(line: str) -> None:
    print(line, flush=True)


def _evaluate_command(f) -> None:
    from masksub_jax import config as config_lib
    path = f.workdir or f.init_from
    if not path or (f.workdir and f.init_from):
        raise cli.CommandError("give one of --workdir (a training run) and --init_from (converted weights).")
    say = _say
    config = command_config(f["config"], f.workdir, say)
    config_lib.validate(config, num_devices=jax.device_count(), training=False)
    if f.init_from:
        init_from.check(config, f.init_from, flag="init_from")
    say(sharding.describe_devices())
    loaded = convert.read_variables(path, ema=f.ema, say=say)  # checked before the data is read
    data = _source(config, f.workdir)
    variables = fit_variables(config, loaded, data.num_classes, say=say)
    extra_evals = pipeline.make_extra_evals(config, data.class_names, jax.process_index(), jax.process_count(),
                                            jax.device_count(), workdir=f.workdir, resuming=True,
                                            write_lists=False)
    say(f"evaluating {'the moving average of ' if f.ema else ''}{path}...")
    result = evaluate(config, variables, data, extra_evals, say=say)
    say(f"{describe(result)} on {result['eval_examples']} eval examples "
        f"({config.data.source} {config.data.name if config.data.source == 'tfds' else ''}".rstrip() + ")")
    say("\n" + table(result, path + (" (EMA)" if f.ema else ""), eval_set_name(config)))


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
