"""Evaluation and prediction outside the trainer, for notebooks and the command line.

  python -m masksub_jax.evaluate --config=configs/digits.py --workdir=runs/digits
  python -m masksub_jax.evaluate --config=configs/vit_b.py --init_from=inits/deit3_b --config.data.data_dir=...
  python -m masksub_jax.evaluate --config=configs/vit_b.py --workdir=runs/vit_b --ema \
      '--config.data.extra_evals=("imagenet_v2:test", "imagenet2012_real:validation")'

evaluates a training workdir's newest checkpoint (or its moving average of the weights, --ema), or
weights converted with `masksub_jax.convert` (timm, DeiT-III, MAE, ...), on the config's eval split
and extra eval sets, and prints top-1 / top-5 (ReaL: top-1). It writes nothing.
From Python: `load_variables`, `evaluate` and `predict` (logits for any images, optionally as the
sub-branch sees them).
"""
import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax import convert, masksub, models, sharding
from masksub_jax import step as step_lib
from masksub_jax.data import pipeline


def make_evaluator(config, model, data, mesh, variables_sharding):
    """variables -> {"top1", "top5", "eval_examples"} over `data`'s eval split, on `mesh`; every
    example counts once (eval batches are padded, the padding masked out). ReaL sets: no top5, and
    eval_examples counts the images with a non-empty set."""
    batch_sharding = sharding.batch_sharding(mesh)
    eval_step = jax.jit(step_lib.make_eval_step(config, model, data.num_classes),
                        in_shardings=(variables_sharding, batch_sharding), out_shardings=sharding.replicated(mesh))

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
    evaluators = {name: make_evaluator(config, model, data, mesh, variables_sharding)
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


def load_variables(config, path: str, num_classes: int, *, ema: bool = False, say=print) -> dict:
    """The variables (params, and ResNet's batch_stats) for `config`'s model from `path`: a training
    workdir (its newest checkpoint; with `ema`, its moving average) or weights written by
    `python -m masksub_jax.convert`, adapted to the model as `config.init_from` is (a new head or
    image size is said, not silent). NumPy arrays."""
    model = step_lib.make_model(config, num_classes)
    image = jnp.zeros((1, config.data.image_size, config.data.image_size, len(config.data.mean)), jnp.float32)
    initial = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(config.seed), image))
    return convert.adapt_variables(convert.read_variables(path, ema=ema), initial, family=config.model.family,
                                   say=say)


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
    return evaluations(jax.device_put(variables, variables_sharding))


def _source(config, workdir=None):
    """The config's data; a training workdir's file lists and class map for an image-folder run."""
    return pipeline.make(config, jax.process_index(), jax.process_count(), batch_multiple=jax.device_count(),
                         workdir=workdir, resuming=True, write_lists=False)


def predict(config, variables, images, *, sub_branch_rng=None) -> np.ndarray:
    """Eval-mode logits (N, classes) for uint8 images (N, H, W, C) at the config's image size. With
    `sub_branch_rng`, as the masking sub-branch sees them: `int(L * (1 - masksub.ratio))` of the L
    units kept, drawn from that key (`step.make_input_preview` shows which)."""
    num_classes = variables["params"]["head"]["bias"].shape[-1]  # every family's classifier is "head"
    model = step_lib.make_model(config, num_classes)
    corruption = {}
    if sub_branch_rng is not None:
        if config.masksub.mode != "masking":
            raise ValueError(f"masksub.mode={config.masksub.mode!r}: only masking's sub-branch differs from the "
                             "main branch in eval mode.")
        corruption = masksub.corruption("masking", config.masksub.ratio, sub_branch_rng, len(images),
                                        models.of(config).num_units(config))
    normalise = step_lib.normaliser(config)
    apply = jax.jit(lambda v, x, c: model.apply(v, normalise(x), train=False, **c))
    return np.asarray(apply(variables, jnp.asarray(images), corruption))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_b.py.", lock_config=False,
                                    accept_new_attributes=True)
    flags.DEFINE_string("workdir", None, "A training workdir: its newest checkpoint is evaluated.")
    flags.DEFINE_string("init_from", None, "Weights written by `python -m masksub_jax.convert`.")
    flags.DEFINE_bool("ema", False, "With --workdir: evaluate the run's moving average of the weights.")


def main(argv):
    from absl import flags, logging

    from masksub_jax import config as config_lib
    del argv
    if not flags.FLAGS["verbosity"].present:  # the result is printed; library INFO logs only on request
        logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    config_lib.validate(config, num_devices=jax.device_count())
    path = flags.FLAGS.workdir or flags.FLAGS.init_from
    if not path or (flags.FLAGS.workdir and flags.FLAGS.init_from):
        raise SystemExit("error: give one of --workdir (a training run) and --init_from (converted weights).")
    print(sharding.describe_devices(), flush=True)
    data = _source(config, flags.FLAGS.workdir)
    variables = load_variables(config, path, data.num_classes, ema=flags.FLAGS.ema)
    extra_evals = pipeline.make_extra_evals(config, data.class_names, jax.process_index(), jax.process_count(),
                                            jax.device_count(), workdir=flags.FLAGS.workdir, resuming=True,
                                            write_lists=False)
    print(f"evaluating {'the moving average of ' if flags.FLAGS.ema else ''}{path}...", flush=True)
    result = evaluate(config, variables, data, extra_evals, say=lambda line: print(line, flush=True))
    print(f"{describe(result)} on {result['eval_examples']} eval examples "
          f"({config.data.source} {config.data.name if config.data.source == 'tfds' else ''}".rstrip() + ")")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
