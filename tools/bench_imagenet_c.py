"""What a full ImageNet-C pass (imagenet2012_corrupted: 15 corruptions x 5 severities x 50,000 images)
costs on this machine, from the cost of 1,000 images through the evaluator that `evaluate` runs for
each corruption and severity: array_record reads, JPEG decode and centre crop (tf.data), then the
model's eval step. Not part of the package and not run by CI.

  python tools/bench_imagenet_c.py --config=vit_b [--image_size=224] [--images=64] [--batch=32] [--rounds=2]

The images are tfds.testing.mock_data's imagenet2012_corrupted (random 224 x 224 JPEGs, the real
set's size and encoding); random weights. The host pipeline is also timed alone, so that the share
of decoding is known. Times: the median over --rounds passes, after a first (compiling) pass.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as data_source_base

from masksub_jax import configs, evaluate, sharding
from masksub_jax import step as step_lib
from masksub_jax.data import pipeline

PASS_IMAGES = 15 * 5 * 50_000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit_b")
    parser.add_argument("--image_size", type=int, default=224)  # ImageNet-C's images are 224 px
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    config = configs.get(args.config, **{"eval_batch_size": args.batch, "data.image_size": args.image_size,
                                         "data.extra_evals": ("imagenet2012_corrupted/gaussian_noise/1:validation",)})
    names = tfds.builder("imagenet2012").info.features["label"].names
    # TFDS 4.9.10's mock sets __getitems__ where it is not bound as a method (tests/conftest.py)
    data_source_base.BaseDataSource.__getitems__ = lambda self, keys: [self[k] for k in keys]
    with tfds.testing.mock_data(num_examples=args.images):
        suite = pipeline.make_extra_evals(config, names, batch_multiple=jax.device_count())["imagenet2012_corrupted"]
        part = suite.parts["gaussian_noise", 1]
        model = step_lib.make_model(config, len(names))
        size = config.data.image_size
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
        mesh = sharding.make_mesh(config.mesh.fsdp)
        variables = jax.device_put(variables, sharding.state_sharding(variables, mesh))
        evaluator = evaluate.make_evaluator(config, model, part, mesh, sharding.state_sharding(variables, mesh))
        start = time.perf_counter()
        evaluator(variables)
        first = time.perf_counter() - start
        passes, host = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            result = evaluator(variables)
            passes.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in part.eval_batches():
                pass
            host.append(time.perf_counter() - start)
    n = result["eval_examples"]
    per_1000, host_per_1000 = 1000 * statistics.median(passes) / n, 1000 * statistics.median(host) / n
    print(f"{config.model.family} {config.model.variant} at {size} px, eval batch {args.batch}, {n} images, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}")
    print(f"first pass (compiling): {first:.1f} s; passes: {', '.join(f'{t:.1f}' for t in passes)} s")
    print(f"per 1,000 images: {per_1000:.0f} s (host pipeline alone: {host_per_1000:.1f} s)")
    print(f"a full ImageNet-C pass ({PASS_IMAGES:,} images): {per_1000 * PASS_IMAGES / 1000 / 3600:.0f} h")


if __name__ == "__main__":
    main()
