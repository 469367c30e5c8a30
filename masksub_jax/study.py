"""A miniature study of the paper's claim: the baseline and MaskSub (and DropSub / PathSub) over seeds.

  python -m masksub_jax.study --config=configs/digits.py --seeds=5 --modes=none,masking \
      --workdir=runs/study --config.data.train_split='train[:500]' --config.total_epochs=300

trains every (mode, seed) in WORKDIR/MODE-seedS (a run that exists is resumed or, finished, read
back: an interrupted study continues), then writes WORKDIR/study.md (mean +- std over seeds of the
held-out top-1 and of the main branch's training loss at fixed points, and each seed's MaskSub minus
baseline difference, seeds being paired: same initialisation and data order), study.json (every
run's numbers) and study.png (the curves). Needs matplotlib (`pip install -e '.[notebook]'`).
"""
import json
import os

import numpy as np

from masksub_jax import config as config_lib
from masksub_jax import train

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


def write(runs: dict, workdir: str, command: str) -> str:
    """study.md, study.json and study.png in `workdir`; returns the table."""
    text = table(runs)
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
        print(write(runs, f.workdir, shlex.join(["python", "-m", "masksub_jax.study", *sys.argv[1:]])))
    print(f"Wrote {f.workdir}/study.md, study.json and study.png.")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py.", lock_config=False,
                                    accept_new_attributes=True)
    flags.DEFINE_string("workdir", None, "Where the runs and the study's table and plot go.", required=True)
    flags.DEFINE_integer("seeds", 5, "Seeds 0 .. N-1 for every mode.")
    flags.DEFINE_string("modes", "none,masking", "Comma-separated masksub.mode values: none, masking, dropout, "
                        "droppath.")


if __name__ == "__main__":
    from absl import app

    from masksub_jax import cli
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
