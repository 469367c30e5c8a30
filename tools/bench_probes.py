"""The cost of the feature probes (masksub_jax/probes.py), for BENCHMARKS.md: the host solve of the
few-shot, linear and kNN probes at a data set's shapes, and the feature extraction rate of a model.

  python tools/bench_probes.py solve --train=50000 --test=10000 --classes=100 --dim=384
  python tools/bench_probes.py features --config=vit_s --batch=32

Solve: features drawn at random around class centres (the cost does not depend on their values),
config.probes' defaults (1 / 5 / 10 / 25 shots x 3 draws, 13 ridge terms; kNN k 20). Features: the
jitted extractor on random 224 px images, best of 3 batches after compiling.
"""
import argparse
import time

import numpy as np


def solve(args) -> None:
    from masksub_jax import config as config_lib
    from masksub_jax import probes
    p = config_lib.base().probes
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
    train_y, test_y = rng.integers(0, args.classes, args.train), rng.integers(0, args.classes, args.test)
    train_x = centres[train_y] + 3 * rng.normal(size=(args.train, args.dim)).astype(np.float32)
    test_x = centres[test_y] + 3 * rng.normal(size=(args.test, args.dim)).astype(np.float32)
    data = (train_x, train_y, test_x, test_y, args.classes)
    times = {}
    for name, run in (("fewshot", lambda: probes.fewshot(*data, shots=p.shots, seeds=p.seeds, l2_grid=p.l2_grid,
                                                          heldout_per_class=p.heldout_per_class)),
                      ("linear", lambda: probes.linear_probe(*data, l2_grid=p.l2_grid,
                                                             heldout_per_class=p.heldout_per_class)),
                      ("knn", lambda: probes.knn(*data, k=p.knn_k, temperature=p.knn_temperature))):
        start = time.perf_counter()
        run()
        times[name] = time.perf_counter() - start
    print(f"train {args.train}, test {args.test}, {args.classes} classes, dim {args.dim}: "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items()))


def features(args) -> None:
    import jax

    from masksub_jax import configs, probes, sharding
    from masksub_jax import step as step_lib
    config = configs.get(args.config)
    size = config.data.image_size
    model = step_lib.make_model(config, 1000)
    mesh = sharding.make_mesh(1)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32))
    variables_sharding = sharding.state_sharding(variables, mesh)
    variables = jax.device_put(variables, variables_sharding)
    extract = probes.make_feature_extractor(config, model, mesh, variables_sharding)
    batch = {"image": np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8),
             "label": np.zeros(args.batch, np.int32), "mask": np.ones(args.batch, np.float32)}
    dim = jax.block_until_ready(extract(variables, batch))[0].shape[1]
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(extract(variables, batch))
        seconds.append(time.perf_counter() - start)
    print(f"{args.config} at {size} px, batch {args.batch}, {jax.devices()[0].platform}: "
          f"{args.batch / min(seconds):.1f} images/s, features of {dim}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("solve")
    for name, default in (("train", 50000), ("test", 10000), ("classes", 100), ("dim", 384)):
        s.add_argument(f"--{name}", type=int, default=default)
    f = sub.add_parser("features")
    f.add_argument("--config", default="vit_s")
    f.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    solve(args) if args.what == "solve" else features(args)


if __name__ == "__main__":
    main()
