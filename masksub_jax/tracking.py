"""Experiment tracking with Weights & Biases (config.wandb; `pip install 'masksub_jax[wandb]'`): the
scalars and images that TensorBoard gets, and the config as the W&B run's config. The W&B run id is
kept in WORKDIR/wandb_run_id, so that a resumed run continues the same W&B run. Offline runs
(config.wandb.mode="offline", or WANDB_MODE=offline) are written under WORKDIR/wandb (a local
workdir) for `wandb sync`.

W&B keeps one value per step: the steps a resumed run trains again after its checkpoint keep the
values the interrupted session logged (TensorBoard and metrics.jsonl keep the new ones).
"""
import os
import secrets

import numpy as np
from clu import metric_writers

from masksub_jax import workdir as workdir_lib

RUN_ID = "wandb_run_id"
MODES = ("online", "offline", "disabled")


def enabled(settings) -> bool:
    return bool(settings.project)


class PartialWriter(metric_writers.MetricWriter):
    """A clu MetricWriter for what a subclass overrides; the rest (hparams, images, videos, audio,
    text, histograms, summaries) it ignores. metrics.JsonlWriter and WandbWriter are ones."""

    def write_scalars(self, step, scalars):
        pass

    def write_hparams(self, hparams):
        pass

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def flush(self):
        pass

    def close(self):
        self.flush()


class WandbWriter(PartialWriter):
    """Scalars and images to a W&B run; the config is the run's config from the start (no hparams)."""

    def __init__(self, workdir: str, settings, flat_config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError(f"config.wandb.project={settings.project!r} needs wandb: pip install "
                              "'masksub_jax[wandb]' (or leave config.wandb.project unset).") from None
        self._wandb = wandb
        id_file = workdir_lib.path(workdir) / RUN_ID
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        if not id_file.exists():
            workdir_lib.write_text(id_file, run_id + "\n")
        local = "://" not in workdir
        self._run = wandb.init(
            project=settings.project, entity=settings.entity, tags=list(settings.tags), mode=settings.mode,
            name=settings.name or os.path.basename(workdir.rstrip("/")), id=run_id, resume="allow", config=flat_config,
            dir=str(workdir_lib.path(workdir)) if local else None)

    def write_scalars(self, step, scalars):
        self._run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def write_images(self, step, images):
        self._run.log({k: [self._wandb.Image(np.asarray(image)) for image in v] for k, v in images.items()},
                      step=int(step))

    def close(self):
        self._run.finish()
