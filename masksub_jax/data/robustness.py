"""The robustness evaluation protocols: which logits ImageNet-A and ImageNet-R are scored on, and
ImageNet-C's corruptions, severities and mean corruption error (mCE).

ImageNet-A / ImageNet-R (`imagenet_a`, `imagenet_r`): 200 ImageNet classes each; the standard
protocol scores the model's logits of those 200 classes only (hendrycks/natural-adv-examples and
hendrycks/imagenet-r eval.py: `output[:, indices_in_1k]`; timm's validate.py --valid-labels). The
class lists ship as imagenet_a_classes.txt / imagenet_r_classes.txt beside this module (ImageNet-1k
index and WordNet id per line) and are checked against the data set's label names when it is read.

ImageNet-C (`imagenet2012_corrupted`, TFDS's re-creation of Hendrycks & Dietterich 2019): one TFDS
config per corruption and severity. The 15 corruptions of the benchmark, 5 severities each; top-1
per corruption (the mean over its severities), their mean, and mCE: each corruption's error summed
over the 5 severities over AlexNet's, averaged over the 15, in percent (AlexNet = 100).
"""
import dataclasses
import importlib.resources

# AlexNet's top-1 error per corruption, the mean over severities 1-5: the normalisers of mCE
# (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
# Perturbations", ICLR 2019, section 3: CE = sum of errors over severities / AlexNet's sum). The values
# as open-mmlab/mmpretrain's CorruptionError metric (`_get_ce_alexnet`) holds them; those of
# facebookresearch/dinov3's ImageNet-C metric, given per severity, have these means.
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
BENCHMARK_CORRUPTIONS = tuple(ALEXNET_ERRORS)  # the 15 of mCE, in the paper's order
# TFDS's four held-out corruptions (the paper's appendix): evaluated when named, never part of mCE.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
CORRUPTED = "imagenet2012_corrupted"
SUBSET_SETS = ("imagenet_a", "imagenet_r")  # scored on their 200 classes' logits


def corruption_config(corruption: str, severity: int) -> str:
    """The TFDS name of one corruption at one severity, e.g. imagenet2012_corrupted/gaussian_noise_3."""
    return f"{CORRUPTED}/{corruption}_{severity}"


def parse_corrupted(kind: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(corruptions, severities) that an extra_evals name of ImageNet-C chooses:
      imagenet2012_corrupted                          the 15 x 5 (mCE)
      imagenet2012_corrupted/gaussian_noise,fog       those corruptions, severities 1-5
      imagenet2012_corrupted/gaussian_noise,fog/3     ... at severity 3 ("1,2": several; "all": the 15)
      imagenet2012_corrupted/gaussian_noise_3         a TFDS config name: one corruption, one severity
    """
    parts = kind.split("/")
    if parts[0] != CORRUPTED or len(parts) > 3 or not all(parts[1:]):
        raise ValueError(_spelling(kind, "give 'imagenet2012_corrupted', '.../CORRUPTION,...' or "
                                   "'.../CORRUPTION,.../SEVERITY,...'"))
    if len(parts) == 2 and parts[1] not in _known() and parts[1].rpartition("_")[0] in _known():
        corruption, _, severity = parts[1].rpartition("_")  # a TFDS config name
        parts = [CORRUPTED, corruption, severity]
    corruptions = BENCHMARK_CORRUPTIONS if len(parts) < 2 or parts[1] == "all" else tuple(parts[1].split(","))
    unknown = [c for c in corruptions if c not in _known()]
    if unknown or len(set(corruptions)) < len(corruptions):
        raise ValueError(_spelling(kind, f"{', '.join(map(repr, unknown or corruptions))} is not a corruption "
                                   f"named once; choose from {', '.join(_known())}"))
    try:
        severities = SEVERITIES if len(parts) < 3 else tuple(int(s) for s in parts[2].split(","))
    except ValueError:
        severities = ()
    if not severities or not set(severities) <= set(SEVERITIES) or len(set(severities)) < len(severities):
        raise ValueError(_spelling(kind, f"severities are {parts[2]!r}; give each of 1-5 once, e.g. '/3' or '/1,5'"))
    return corruptions, severities


def _known() -> tuple[str, ...]:
    return BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS


def _spelling(kind: str, fix: str) -> str:
    return f"data.extra_evals names ImageNet-C as {kind!r}: {fix}."


def class_list(name: str) -> list[tuple[int, str]]:
    """[(ImageNet-1k index, WordNet id)] of the 200 classes of `name` (imagenet_a or imagenet_r),
    from the list shipped with the package."""
    text = importlib.resources.files("masksub_jax.data").joinpath(f"{name}_classes.txt").read_text()
    return [(int(index), wnid) for index, wnid in
            (line.split() for line in text.splitlines() if line and not line.startswith("#"))]


def class_subset(name: str, label_names: list[str]) -> tuple[int, ...]:
    """The 1k indices of `name`'s 200 classes, checked against the data set's `label_names` (its
    ImageNet-1k label space): each shipped WordNet id must be that data set's name of its index."""
    classes = class_list(name)
    for index, wnid in classes:
        theirs = label_names[index] if index < len(label_names) else None
        if theirs != wnid:
            raise ValueError(
                f"{name}'s label names do not match its shipped 200-class list: class {index} is {theirs!r} in the "
                f"data set, {wnid!r} in masksub_jax/data/{name}_classes.txt; the data set must use ImageNet-1k's "
                "sorted WordNet ids as its labels (TFDS's imagenet_a / imagenet_r do).")
    return tuple(index for index, _ in classes)


@dataclasses.dataclass
class ClassSubset:
    """An eval source whose images all belong to `classes` (the model's class indices): a model is
    scored on those classes' logits only. Everything else is the source's."""
    source: object
    classes: tuple[int, ...]

    def __getattr__(self, name):
        if name in ("source", "classes"):  # not set yet (copy / pickle): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


@dataclasses.dataclass
class CorruptionSuite:
    """ImageNet-C as one eval set: {(corruption, severity): eval source}, evaluated part by part and
    summarised by `corruption_summary`."""
    parts: dict

    @property
    def num_classes(self) -> int:
        return next(iter(self.parts.values())).num_classes

    @property
    def num_eval_examples(self) -> int:
        return sum(part.num_eval_examples for part in self.parts.values())

    def summarise(self, results: dict) -> dict:
        return corruption_summary(results)


def corruption_summary(results: dict) -> dict:
    """From {(corruption, severity): {"top1", "eval_examples", ...}}: "CORRUPTION/top1" (its mean over
    the severities given), "top1" (the mean of those over the corruptions), "eval_examples" (all
    images) and, when all 15 benchmark corruptions have all 5 severities, "mce": the mean over them of
    100 * sum(errors) / sum(AlexNet's errors), AlexNet's being the mean over severities x 5."""
    by_corruption = {}
    for (corruption, severity), result in results.items():
        by_corruption.setdefault(corruption, {})[severity] = result["top1"]
    summary = {f"{c}/top1": sum(top1.values()) / len(top1) for c, top1 in by_corruption.items()}
    summary["top1"] = sum(summary.values()) / len(summary)
    if all(set(by_corruption.get(c, ())) == set(SEVERITIES) for c in BENCHMARK_CORRUPTIONS):
        summary["mce"] = 100 * sum(
            sum(1 - top1 for top1 in by_corruption[c].values()) / (len(SEVERITIES) * ALEXNET_ERRORS[c])
            for c in BENCHMARK_CORRUPTIONS) / len(BENCHMARK_CORRUPTIONS)
    summary["eval_examples"] = sum(int(result["eval_examples"]) for result in results.values())
    return summary
