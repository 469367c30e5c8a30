"""A miniature study of the paper's claim: the baseline and MaskSub (and DropSub / PathSub) over seeds.

  python -m masksub_jax.study --config=configs/digits.py --seeds=5 --modes=none,masking \
      --workdir=runs/study --config.data.train_split='train[:500]' --config.total_epochs=300

trains every (mode, seed) in WORKDIR/MODE-seedS (a run that exists is resumed or, finished, read
back: an interrupted study continues), then writes WORKDIR/study.md (mean +- std over seeds of the
held-out top-1 and of the main branch's training loss at fixed points, and each seed's MaskSub minus
baseline difference, seeds being paired: same initialisation and data order), study.json (every
run's numbers) and study.png (the curves). Needs matplotlib (`pip install -e '.[notebook]'`).

With --robustness (the default) each run's final weights also classify the held-out images under
pixel noise, blur and occlusion at growing strengths (`CORRUPTIONS`, drawn from a fixed seed: every
run sees the same corrupted images): study_robustness.png (top-1 against strength, per corruption,
mean +- std over seeds), a table in study.md, and study_robustness.json. Whether MaskSub's features
degrade more gracefully, not only whether its clean top-1 is higher. In-memory data (digits,
synthetic) only.
"""
import json
import os

import numpy as np

from masksub_jax import config as config_lib
from masksub_jax import train

# Corruption -> strengths, the first the clean images: Gaussian pixel noise (std, a fraction of 255),
# Gaussian blur (sigma in pixels), and occlusion (a square of that fraction of the side, at a random
# place per image, painted the data set's mean).
CORRUPTIONS = {"noise": (0.0, 0.1, 0.2, 0.3, 0.4), "blur": (0.0, 0.5, 1.0, 1.5, 2.0),
               "occlusion": (0.0, 0.25, 0.375, 0.5, 0.625)}

NAMES = {"none": "baseline", "masking": "MaskSub", "dropout": "DropSub", "droppath": "PathSub"}
FRACTIONS = (0.25, 0.5, 1.0)  # where in training the main-branch loss is compared


def run_all(config, workdir: str, seeds: list[int], modes: list[str]) -> dict:
    """Trains (or reads back) every run: {mode: [{"seed", "top1", "top5", "history"}, ...]}."""
    runs = {}
    for mode in modes:
        for seed in seeds:
            c = config_lib.override(config.copy_and_resolve_references(), {"seed": seed, "masksub.mode": mode})
            result = train.run(c, os.path.join(workdir, f"{mode}-seed{seed}"))
            runs.setdefault(mode, []).append({"seed": seed, "top1": result["top1"], "top5": result["top5"],
                                              "history": result["history"]})
    return runs


def corrupt(images: np.ndarray, kind: str, strength: float, *, fill=None, seed: int = 0) -> np.ndarray:
    """uint8 images (N, H, W, C) under corruption `kind` (CORRUPTIONS) of `strength`; 0 = unchanged.
    `fill`: occlusion's colour per channel (default mid grey)."""
    if strength == 0:
        return images
    rng = np.random.default_rng(seed)
    x = images.astype(np.float64)
    if kind == "noise":
        x = x + rng.normal(0.0, strength * 255, x.shape)
    elif kind == "blur":
        from scipy import ndimage
        x = ndimage.gaussian_filter(x, sigma=(0, strength, strength, 0), mode="nearest")
    elif kind == "occlusion":
        n, height, width, _ = x.shape
        side_h, side_w = max(1, round(strength * height)), max(1, round(strength * width))
        tops, lefts = rng.integers(0, height - side_h + 1, n), rng.integers(0, width - side_w + 1, n)
        for image, top, left in zip(x, tops, lefts):
            image[top:top + side_h, left:left + side_w] = 127.5 if fill is None else fill
    else:
        raise ValueError(f"Unknown corruption {kind!r}; use one of {sorted(CORRUPTIONS)}.")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def robustness(config, workdir: str, seeds: list[int], modes: list[str], say=print) -> dict | None:
    """{mode: {corruption: [[top-1 per strength] per seed]}} of every run's final weights on the
    held-out images under CORRUPTIONS; None (said) when the data is not held in memory."""
    import jax

    from masksub_jax import convert
    from masksub_jax import step as step_lib
    from masksub_jax.data import pipeline
    data = pipeline.make(config, batch_multiple=jax.device_count())
    if not hasattr(data, "eval_images"):
        say(f"No robustness figure: data.source={config.data.source!r} is not held in memory (digits, synthetic).")
        return None
    images, labels = data.eval_images, data.eval_labels
    fill = np.asarray(config.data.mean) * 255
    corrupted = {kind: [corrupt(images, kind, s, fill=fill) for s in strengths]
                 for kind, strengths in CORRUPTIONS.items()}
    model = step_lib.make_model(config, data.num_classes)
    normalise = step_lib.normaliser(config)
    predict = jax.jit(lambda v, x: jax.numpy.argmax(model.apply(v, normalise(x), train=False), -1))
    out = {}
    for mode in modes:
        for seed in seeds:
            # The run's own checkpoint, of this very model: read (checksums checked), not adapted.
            variables = convert.read_variables(os.path.join(workdir, f"{mode}-seed{seed}"), say=lambda line: None)
            for kind, sets in corrupted.items():
                top1 = [float(np.mean(np.asarray(predict(variables, x)) == labels)) for x in sets]
                out.setdefault(mode, {}).setdefault(kind, []).append(top1)
    return out


def robustness_table(results: dict) -> str:
    """study.md's robustness table: held-out top-1 (mean +- std over seeds) per corruption strength."""
    lines = []
    for kind, strengths in CORRUPTIONS.items():
        head = ["mode"] + [f"{kind} {s:g}" for s in strengths]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for mode, by_kind in results.items():
            values = np.asarray(by_kind[kind])
            lines.append(f"| {NAMES[mode]} ({mode}) | " + " | ".join(_mean_std(v) for v in values.T) + " |")
    return "\nHeld-out top-1 under corruption (study_robustness.png):\n" + "\n".join(lines) + "\n"


def plot_robustness(results: dict, path: str) -> None:
    """Held-out top-1 against corruption strength, a panel per corruption: mean over seeds, band = +- std."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(4.2 * len(CORRUPTIONS), 3.6))
    for ax, (kind, strengths) in zip(axes, CORRUPTIONS.items()):
        for mode, by_kind in results.items():
            values = np.asarray(by_kind[kind])
            mean, std = values.mean(0), values.std(0)
            ax.plot(strengths, mean, marker="o", label=f"{NAMES[mode]} ({len(values)} seeds)")
            ax.fill_between(strengths, mean - std, mean + std, alpha=0.2)
        ax.set(xlabel=f"{kind} strength", ylabel="held-out top-1", title=kind)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(h["step"], h[key]) for h in history if key in h]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _loss_at(history: list[dict], fraction: float) -> float:
    """The main branch's training loss at the first log step at or after `fraction` of training."""
    steps, losses = _curve(history, "train/loss_main")
    return float(losses[steps >= fraction * steps[-1]][0])


def _mean_std(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.4f} +- {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"


def table(runs: dict) -> str:
    """The markdown table of study.md."""
    head = ["mode", "runs", "held-out top-1"] + [f"train loss (main) at {f:.0%}" for f in FRACTIONS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, results in runs.items():
        rows.append(f"| {NAMES[mode]} ({mode}) | {len(results)} | {_mean_std([r['top1'] for r in results])} | "
                    + " | ".join(_mean_std([_loss_at(r["history"], f) for r in results]) for f in FRACTIONS) + " |")
    lines = rows  # then one line per mode against the baseline
    if "none" in runs:
        baseline = {r["seed"]: r["top1"] for r in runs["none"]}
        for mode, results in runs.items():
            diffs = [r["top1"] - baseline[r["seed"]] for r in results if r["seed"] in baseline]
            if mode != "none" and diffs:
                wins = sum(d > 0 for d in diffs)
                lines.append(f"\n{NAMES[mode]} minus baseline, held-out top-1, paired by seed: {_mean_std(diffs)} "
                             f"({wins} of {len(diffs)} seeds better; per seed {', '.join(f'{d:+.4f}' for d in diffs)})")
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: str) -> None:
    """Main-branch training loss and held-out top-1 against the step: mean over seeds, band = +- std."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("The study's plot needs matplotlib: pip install -e '.[notebook]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, results in runs.items():
        for ax, key in zip(axes, ("train/loss_main", "eval/top1")):
            curves = [_curve(r["history"], key) for r in results]
            steps = curves[0][0]
            values = np.stack([c[1][:len(steps)] for c in curves])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, label=f"{NAMES[mode]} ({len(results)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axes[0].set(xlabel="step", ylabel="training loss, main branch", yscale="log")
    axes[1].set(xlabel="step", ylabel="held-out top-1")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(runs: dict, workdir: str, command: str, robust: dict | None = None) -> str:
    """study.md, study.json and study.png in `workdir` (and with `robust`, robustness's results,
    study_robustness.json and .png); returns the tables."""
    text = table(runs) + (robustness_table(robust) if robust else "")
    if robust:
        with open(os.path.join(workdir, "study_robustness.json"), "w", encoding="utf-8") as f:
            json.dump({"strengths": CORRUPTIONS, "top1": robust}, f)
        plot_robustness(robust, os.path.join(workdir, "study_robustness.png"))
    with open(os.path.join(workdir, "study.md"), "w", encoding="utf-8") as f:
        f.write(f"`{command}`\n\n{text}")
    with open(os.path.join(workdir, "study.json"), "w", encoding="utf-8") as f:
        json.dump(runs, f)
    plot(runs, os.path.join(workdir, "study.png"))
    return text


def main(argv):
    import shlex
    import sys

    from absl import flags, logging
    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:  # progress is printed; library INFO logs only on request
        logging.set_verbosity(logging.WARNING)
    from masksub_jax import cli
    config = f.config
    modes = f.modes.split(",")
    for mode in modes:
        if mode not in NAMES:
            raise SystemExit(f"error: unknown mode {mode!r}; use some of {sorted(NAMES)}.")
    with cli.errors_in_one_line(f.workdir):
        os.makedirs(f.workdir, exist_ok=True)
        runs = run_all(config, f.workdir, list(range(f.seeds)), modes)
        robust = robustness(config, f.workdir, list(range(f.seeds)), modes) if f.robustness else None
        print(write(runs, f.workdir, shlex.join(["python", "-m", "masksub_jax.study", *sys.argv[1:]]), robust))
    print(f"Wrote {f.workdir}/study.md, study.json and study.png"
          + (", study_robustness.json and study_robustness.png." if robust else "."))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py.", lock_config=False,
                                    accept_new_attributes=True)
    flags.DEFINE_string("workdir", None, "Where the runs and the study's table and plot go.", required=True)
    flags.DEFINE_integer("seeds", 5, "Seeds 0 .. N-1 for every mode.")
    flags.DEFINE_string("modes", "none,masking", "Comma-separated masksub.mode values: none, masking, dropout, "
                        "droppath.")
    flags.DEFINE_bool("robustness", True, "Also classify the held-out images under noise, blur and occlusion with "
                      "every run's final weights: study_robustness.png and a table in study.md.")


if __name__ == "__main__":
    from absl import app

    from masksub_jax import cli
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
