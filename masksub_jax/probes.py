"""Linear probes and kNN on a model's frozen pre-logits features: how good the representation is,
beside how well the head it was trained with classifies (config.probes; off by default).

Features: the input of the family's classifier (models.classifier: the Dense named CLASSIFIER,
"head"), caught with flax.linen.intercept_methods, so every family works unchanged: ViT's final-LN
cls token (or pooled tokens), Swin's and ResNet's pooled maps. They are computed jitted on the
mesh, each set once per evaluation, from its images resized and centre-cropped as the eval split's
(data.image_size, data.crop_ratio); the probes are solved on the host in NumPy (float64).

Few-shot (probes.fewshot): big_vision's protocol (google-research/big_vision
big_vision/evaluators/fewshot_lsr.py, configs/common_fewshot.py): `probes.seeds` draws of
1 / 5 / 10 / 25 training examples per class (seed s: a np.random.default_rng(s) permutation of
each class's examples, in class order, the shots its first ones), closed-form least squares on
targets +-1 one-hot, the features whitened with the shots' mean and std (+1e-5) and a constant
feature of 100 appended for the bias (so nearly unregularised), solved through the eigendecomposition
of X^T X (or X X^T when there are fewer shots than dimensions), and top-1 on the test split. Reported
per set and shot count: eval/NAME_Kshot/top1 (mean over the draws) and top1_std.
One change: big_vision fixes the ridge term (2^10); here it is chosen per draw from probes.l2_grid
by top-1 on held-out training examples (ties: by squared error), the last probes.heldout_per_class
of each class's permutation (never among the shots; a class with too few examples gives the shots
it has, and the trainer says so). A grid of one value is big_vision's protocol exactly.

Linear probe on the full training split (probes.linear): the same closed-form ridge on all training
features (l2 chosen on a held-out tenth of each class, at least probes.heldout_per_class, with the
ridge fitted on the rest; then refit on all): eval/NAME_linear/top1. It is a least-squares
classifier, not the softmax classifier trained by SGD or L-BFGS that MAE's linear probing or CLIP's
logistic regression report; it ranks representations and costs two eigendecompositions of a D x D
matrix, but its numbers are not theirs.

kNN (probes.knn): DINO's weighted kNN (facebookresearch/dino eval_knn.py, knn_classifier): features
L2-normalised, the k = probes.knn_k most cosine-similar training examples vote for their class with
weight exp(similarity / probes.knn_temperature) (DINO: 20, 0.07): eval/NAME_knn/top1.

Sets (each of the three lists): "TFDS_NAME" (splits train and test), "TFDS_NAME:TRAIN:TEST"
(slices allowed: "imagenet2012:train[:65000]:validation"; a version too: "cars196:2.1.0:train:test"),
"folder:PATH" (PATH/train and PATH/test, each a folder of class folders, data/folder_source.py) or
"folder:PATH:TRAIN:TEST", or "digits" (the embedded digits, 8x8 grey). TFDS sets are read from
data.data_dir, in array_record (`python -m masksub_jax.data.prepare --name=NAME`). Draws are
those of one process: with several, examples are gathered in another order, so the shots differ.
"""
import dataclasses
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from masksub_jax import models, sharding
from masksub_jax import step as step_lib

BIAS_CONSTANT = 100.0  # big_vision fewshot_lsr.py: the bias feature, large so its weight is barely regularised
BIG_VISION_L2 = 2.0**10  # big_vision configs/common_fewshot.py's fixed ridge term
GRAM_CHUNK = 65536  # rows of features per float64 chunk of X^T X


# --------------------------------------------------------------------------------------------------
# Which sets.

@dataclasses.dataclass(frozen=True)
class SetSpec:
    name: str  # in the metric names: eval/NAME_10shot/top1
    kind: str  # "tfds" | "folder" | "digits"
    where: str  # TFDS name (with any version) or folder path
    train_split: str
    test_split: str


def _tokens(spec: str) -> list[str]:
    """`spec` split at the colons outside brackets (TFDS slices: "train[:100]")."""
    tokens, depth, current = [], 0, ""
    for char in spec:
        depth += (char == "[") - (char == "]")
        if char == ":" and depth == 0:
            tokens.append(current)
            current = ""
        else:
            current += char
    return [*tokens, current]


def parse_set(spec: str) -> SetSpec:
    """A probe set as config.probes names it (module docstring); ValueError naming the forms."""
    forms = ("give 'TFDS_NAME', 'TFDS_NAME:TRAIN_SPLIT:TEST_SPLIT', 'folder:PATH', 'folder:PATH:TRAIN:TEST' "
             "or 'digits'")
    if not isinstance(spec, str) or not spec.strip(":"):
        raise ValueError(f"Probe set {spec!r} is not a set: {forms}.")
    if spec == "digits":
        return SetSpec("digits", "digits", "digits", "train", "test")
    tokens = _tokens(spec)
    if tokens[0] == "folder":
        rest = tokens[1:]
        if len(rest) >= 3 and not any("/" in t for t in rest[-2:]):
            path, train, test = ":".join(rest[:-2]), rest[-2], rest[-1]
        else:
            path, train, test = ":".join(rest), "train", "test"
        path = path.rstrip("/")
        if not path:
            raise ValueError(f"Probe set {spec!r} names no folder: {forms}.")
        return SetSpec(path.rpartition("/")[2], "folder", path, train, test)
    version = len(tokens) in (2, 4) and re.fullmatch(r"\d+\.\d+\.\d+", tokens[1])
    name_parts = 2 if version else 1
    if len(tokens) == name_parts:
        train, test = "train", "test"
    elif len(tokens) == name_parts + 2 and all(tokens[-2:]):
        train, test = tokens[-2:]
    else:
        raise ValueError(f"Probe set {spec!r}: {forms} (both splits or neither).")
    where = ":".join(tokens[:name_parts])
    return SetSpec(where.partition(":")[0].partition("/")[0], "tfds", where, train, test)


def specs(config) -> dict[str, SetSpec]:
    """{spec: SetSpec} of every set any probe names, in order (a set named twice is read once)."""
    p = config.probes
    return {s: parse_set(s) for s in (*p.fewshot, *p.linear, *p.knn)}


# --------------------------------------------------------------------------------------------------
# Reading a set: its train and test splits as eval-only sources (data/pipeline.py's kinds).

def _sources(config, spec: SetSpec, processes: dict):
    """(train source, test source, class count), each source's eval_batches() the whole split."""
    d = config.data
    channels = len(d.mean)
    if spec.kind == "digits":
        if d.image_size != 8 or channels != 1:
            raise ValueError(f"Probe set 'digits' has 8x8 grey images; the model takes {d.image_size}x{d.image_size} "
                             f"with {channels} channel(s). Probe a model of data.image_size=8 with one channel.")
        import tensorflow_datasets as tfds

        from masksub_jax.data import digits, pipeline
        builder = digits.builder(d.data_dir)

        def source(split):
            data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            arrays = (data["image"], data["label"].astype(np.int32))
            return pipeline.ArraySource(arrays, arrays, num_classes=10, seed=0, batch_size=1,
                                        eval_batch_size=config.eval_batch_size, **processes)
        return source(spec.train_split), source(spec.test_split), 10
    if channels != 3:
        raise ValueError(f"Probe set {spec.where!r} has colour images; the model takes {channels} channel(s) "
                         "(len(data.mean)). Probe it with a 3-channel model, or use the 'digits' set.")
    from masksub_jax.data import folder_source, indexed
    if spec.kind == "folder":
        train = folder_source.list_split(f"{spec.where}/{spec.train_split}", on_corrupt_image=d.on_corrupt_image)
        test = folder_source.list_split(f"{spec.where}/{spec.test_split}", train["classes"],
                                        on_corrupt_image=d.on_corrupt_image)
        class_names, splits = train["classes"], [folder_source.split_of(train), folder_source.split_of(test)]
    else:
        import tensorflow_datasets as tfds

        from masksub_jax.data import tfds_source
        try:
            label = tfds.builder(spec.where, data_dir=d.data_dir).info.features["label"]
            class_names = list(label.names)
        except tfds.core.registered.DatasetNotFoundError:
            class_names = []  # tfds_source names the problem below
        except KeyError:
            raise ValueError(f"Probe set {spec.where!r} has no 'label' feature; a probe set needs one class label "
                             "per image.") from None
        splits = [tfds_source.eval_split(spec.where, split, d.data_dir, len(class_names))
                  for split in (spec.train_split, spec.test_split)]
    train_source, test_source = (indexed.IndexedSource(config, None, split, class_names=class_names, **processes)
                                 for split in splits)
    return train_source, test_source, len(class_names)


# --------------------------------------------------------------------------------------------------
# Features.

def make_feature_extractor(config, model, mesh, variables_sharding):
    """(variables, batch) -> (features, label, mask) of a global batch, replicated on every device:
    the input of the family's classifier in eval mode, float32."""
    head = models.classifier(models.of(config))
    normalise = step_lib.normaliser(config)

    def features(variables, batch):
        caught = []

        def catch(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.path == (head,):
                caught.append(args[0])
            return next_fun(*args, **kwargs)
        with nn.intercept_methods(catch):
            model.apply(variables, normalise(batch["image"]), train=False)
        if len(caught) != 1:
            raise ValueError(f"The model called its classifier {head!r} {len(caught)} times, not once; a family whose "
                             "classifier is named otherwise says so with CLASSIFIER = NAME (models/__init__.py).")
        return caught[0].reshape(caught[0].shape[0], -1).astype(jnp.float32), batch["label"], batch["mask"]
    return jax.jit(features, in_shardings=(variables_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def extract(extractor, variables, source, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, labels [N]) of every example of `source`'s eval split."""
    batch_sharding = sharding.batch_sharding(mesh)
    parts = [jax.device_get(extractor(variables, sharding.to_global(batch, batch_sharding)))
             for batch in source.eval_batches()]
    features, labels, mask = (np.concatenate(x) for x in zip(*parts))
    keep = mask > 0
    return features[keep], labels[keep].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Closed-form ridge regression (big_vision fewshot_lsr.py's _precompute_cache / _eig_fewshot_acc_fn).

def ridge_cache(x: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """What every ridge term's solution shares: the whitening, and X^T X = Q diag(eigs) Q^T (or X X^T
    with fewer examples than dimensions) so that W(l2) = lhs diag(1 / (eigs + l2)) rhs. In float64,
    a chunk of rows at a time (the features stay as given: ImageNet's fit in float32)."""
    mean = sum(np.sum(x[i:i + GRAM_CHUNK], 0, dtype=np.float64) for i in range(0, len(x), GRAM_CHUNK)) / len(x)
    variance = sum(np.sum((x[i:i + GRAM_CHUNK] - mean) ** 2, 0) for i in range(0, len(x), GRAM_CHUNK)) / len(x)
    targets = 2.0 * np.eye(num_classes)[labels] - 1.0
    cache = {"mean": mean[None], "std": np.sqrt(variance)[None] + 1e-5}
    if len(x) >= x.shape[1] + 1:
        gram, xty = 0.0, 0.0
        for i in range(0, len(x), GRAM_CHUNK):
            chunk = _design(cache, x[i:i + GRAM_CHUNK])
            gram, xty = gram + chunk.T @ chunk, xty + chunk.T @ targets[i:i + GRAM_CHUNK]
        eigs, q = np.linalg.eigh(gram)
        return cache | {"eigs": eigs, "lhs": q, "rhs": q.T @ xty}
    design = _design(cache, x)
    eigs, q = np.linalg.eigh(design @ design.T)
    return cache | {"eigs": eigs, "lhs": design.T @ q, "rhs": q.T @ targets}


def _design(cache: dict, x: np.ndarray) -> np.ndarray:
    """Whitened features with the constant bias feature appended."""
    x = (np.asarray(x, np.float64) - cache["mean"]) / cache["std"]
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def ridge_weights(cache: dict, l2: float) -> np.ndarray:
    """argmin_W |X W - Y|^2 + l2 |W|^2 on the whitened, bias-augmented features: [D + 1, C]."""
    return (cache["lhs"] / (cache["eigs"] + l2)) @ cache["rhs"]


def ridge_accuracies(cache: dict, x: np.ndarray, labels: np.ndarray, l2s) -> np.ndarray:
    """Top-1 on (x, labels) of the solution for each ridge term in `l2s`."""
    return _held_out_scores(cache, x, labels, l2s)[0]


def _held_out_scores(cache: dict, x: np.ndarray, labels: np.ndarray, l2s) -> tuple[np.ndarray, np.ndarray]:
    """(top-1, mean squared error against the +-1 targets) on (x, labels) for each ridge term."""
    design = _design(cache, x)
    targets = 2.0 * np.eye(cache["rhs"].shape[1])[labels] - 1.0
    scores = [design @ ridge_weights(cache, l2) for l2 in l2s]
    return (np.array([np.mean(np.argmax(s, 1) == labels) for s in scores]),
            np.array([np.mean((s - targets) ** 2) for s in scores]))


def choose_l2(cache: dict, x: np.ndarray, labels: np.ndarray, l2_grid) -> float:
    """The ridge term of `l2_grid` with the best top-1 on the held-out (x, labels); of equals (a few
    held-out examples often tie), the one with the least squared error against their +-1 targets. A
    grid of one value is that value; no held-out examples, big_vision's 2^10."""
    if len(l2_grid) == 1:
        return float(l2_grid[0])
    if not len(labels):  # no class had an example to hold out
        return BIG_VISION_L2
    accuracies, errors = _held_out_scores(cache, x, labels, l2_grid)
    return float(l2_grid[min(range(len(l2_grid)), key=lambda i: (-accuracies[i], errors[i]))])


def _draw(labels: np.ndarray, num_classes: int, seed: int, heldout_per_class: int, heldout_fraction: float = 0.0):
    """Per class, big_vision's seeded permutation of its examples, split into (those shots are
    drawn from, the held-out last max(`heldout_per_class`, `heldout_fraction` of them)); a class
    keeps at least one for shots."""
    rng = np.random.default_rng(seed)
    pools, held = [], []
    for c in range(num_classes):
        order = rng.permutation(np.flatnonzero(labels == c))
        wanted = max(heldout_per_class, int(heldout_fraction * len(order)))
        cut = len(order) - min(wanted, max(len(order) - 1, 0))
        pools.append(order[:cut])
        held.append(order[cut:])
    return pools, np.concatenate(held).astype(np.int64)


def fewshot(train_x, train_y, test_x, test_y, num_classes: int, *, shots, seeds: int, l2_grid,
            heldout_per_class: int) -> dict:
    """{K: {"top1": mean over draws, "top1_std": their std, "shots": the fewest a class had}}."""
    heldout = heldout_per_class if len(l2_grid) > 1 else 0
    out = {k: [] for k in shots}
    fewest = {}
    for seed in range(seeds):
        pools, held = _draw(train_y, num_classes, seed, heldout)
        for k in shots:
            idx = np.concatenate([pool[:k] for pool in pools]).astype(np.int64)
            fewest[k] = min(min(len(pool[:k]) for pool in pools), fewest.get(k, k))
            cache = ridge_cache(train_x[idx], train_y[idx], num_classes)
            l2 = choose_l2(cache, train_x[held], train_y[held], l2_grid)
            out[k].append(ridge_accuracies(cache, test_x, test_y, [l2])[0])
    return {k: {"top1": float(np.mean(v)), "top1_std": float(np.std(v)), "shots": fewest[k]} for k, v in out.items()}


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, l2_grid, heldout_per_class: int) -> float:
    """Top-1 on the test split of ridge on all training features, l2 chosen first on held-out ones
    (a tenth of each class, at least `heldout_per_class`) with the ridge fitted on the rest."""
    l2 = float(l2_grid[0])
    if len(l2_grid) > 1:
        pools, held = _draw(train_y, num_classes, 0, heldout_per_class, heldout_fraction=0.1)
        fit = np.concatenate(pools).astype(np.int64)
        l2 = choose_l2(ridge_cache(train_x[fit], train_y[fit], num_classes), train_x[held], train_y[held], l2_grid)
    return float(ridge_accuracies(ridge_cache(train_x, train_y, num_classes), test_x, test_y, [l2])[0])


def knn(train_x, train_y, test_x, test_y, num_classes: int, *, k: int = 20, temperature: float = 0.07,
        chunk: int = 1024) -> float:
    """DINO's weighted kNN top-1 (cosine similarity on L2-normalised features, votes exp(sim / T))."""
    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    train, test = unit(train_x), unit(test_x)
    k = min(k, len(train))
    right = 0
    for i in range(0, len(test), chunk):
        similarity = test[i:i + chunk] @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, nearest, 1) / temperature)
        votes = np.zeros((len(nearest), num_classes))
        np.add.at(votes, (np.arange(len(nearest))[:, None], train_y[nearest]), weights)
        right += int(np.sum(np.argmax(votes, 1) == test_y[i:i + chunk]))
    return right / max(len(test), 1)


# --------------------------------------------------------------------------------------------------
# At every evaluation.

def make_probes(config, model, mesh, variables_sharding, *, say=print, process_index: int | None = None,
                process_count: int | None = None):
    """variables -> {"NAME_Kshot/top1", "NAME_Kshot/top1_std", "NAME_linear/top1", "NAME_knn/top1", ...}
    for config.probes, or None when it names no set. Every set's sources are opened now (a missing
    one is an error before training)."""
    named = specs(config)
    if not named:
        return None
    by_name = {}
    for spec in named.values():
        if by_name.setdefault(spec.name, spec) != spec:
            raise ValueError(f"config.probes names two sets {spec.name!r} ({by_name[spec.name].where} and "
                             f"{spec.where}); each needs a name of its own (its TFDS or folder name).")
    processes = dict(process_index=jax.process_index() if process_index is None else process_index,
                     process_count=jax.process_count() if process_count is None else process_count,
                     batch_multiple=jax.device_count())
    sets = {text: (spec, *_sources(config, spec, processes)) for text, spec in named.items()}
    extractor = make_feature_extractor(config, model, mesh, variables_sharding)
    p = config.probes

    def probe(variables) -> dict:
        results = {}
        for text, (spec, train, test, num_classes) in sets.items():
            start = time.perf_counter()
            train_x, train_y = extract(extractor, variables, train, mesh)
            test_x, test_y = extract(extractor, variables, test, mesh)
            extracted = time.perf_counter()
            if text in p.fewshot:
                for k, r in fewshot(train_x, train_y, test_x, test_y, num_classes, shots=p.shots, seeds=p.seeds,
                                    l2_grid=p.l2_grid, heldout_per_class=p.heldout_per_class).items():
                    results |= {f"{spec.name}_{k}shot/top1": r["top1"], f"{spec.name}_{k}shot/top1_std": r["top1_std"]}
                    if r["shots"] < k:
                        say(f"note: a class of {spec.name} has only {r['shots']} training example(s) besides the "
                            f"held-out ones for {k} shots; {spec.name}_{k}shot used what there is.")
            if text in p.linear:
                results[f"{spec.name}_linear/top1"] = linear_probe(
                    train_x, train_y, test_x, test_y, num_classes, l2_grid=p.l2_grid,
                    heldout_per_class=p.heldout_per_class)
            if text in p.knn:
                results[f"{spec.name}_knn/top1"] = knn(train_x, train_y, test_x, test_y, num_classes, k=p.knn_k,
                                                       temperature=p.knn_temperature)
            say(f"probed {spec.name} ({len(train_y)} + {len(test_y)} examples, features {train_x.shape[1]}): "
                f"features {extracted - start:.1f} s, solve {time.perf_counter() - extracted:.1f} s")
        return results
    return probe


def extend(evaluate, config, model, mesh, variables_sharding, *, ema: bool, say=print):
    """`evaluate` (evaluate.make_evaluations' state -> results) with the probes' results added, for
    the live weights and, with `ema`, their average ("ema/NAME_10shot/top1"); `evaluate` itself
    when config.probes names no set."""
    probe = make_probes(config, model, mesh, variables_sharding, say=say)
    if probe is None:
        return evaluate

    def evaluate_and_probe(state) -> dict:
        results = evaluate(state)
        weights = {"": step_lib.variables(state)} | ({"ema/": state["ema"]} if ema else {})
        for which, variables in weights.items():
            results |= {which + key: value for key, value in probe(variables).items()}
        return results
    return evaluate_and_probe
