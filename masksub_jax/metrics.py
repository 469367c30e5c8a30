"""Where metrics go: TensorBoard events and a plain JSON-lines file in the workdir, and the console."""
import datetime
import json
import os
import time

from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call to a file: {"step": ..., name: value, ...}.
    Only scalars and hparams go here; images, audio and the like are for TensorBoard."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

    def write_scalars(self, step, scalars):
        self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def write_hparams(self, hparams):
        self._file.write(json.dumps({"hparams": hparams}, default=str) + "\n")

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
        self._file.flush()

    def close(self):
        self._file.close()


def make_writer(workdir: str, is_chief: bool) -> metric_writers.MetricWriter:
    """TensorBoard events under WORKDIR/tb and WORKDIR/metrics.jsonl, on the chief process only."""
    if not is_chief:
        return metric_writers.MultiWriter([])
    return metric_writers.MultiWriter([
        metric_writers.SummaryWriter(os.path.join(workdir, "tb")),
        JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
    ])


class Progress:
    """Console progress: step, losses of both branches, examples/s and ETA since the last report."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total_steps, self.batch_size = total_steps, batch_size
        self._last_step, self._last_time = start_step, time.perf_counter()

    def rate(self, step: int) -> float:
        """Steps per second since the last call; resets the interval."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return rate

    def line(self, step: int, scalars: dict, steps_per_s: float) -> str:
        eta = datetime.timedelta(seconds=round((self.total_steps - step) / max(steps_per_s, 1e-9)))
        return (f"step {step}/{self.total_steps} | loss {scalars['loss']:.4f} "
                f"(main {scalars['loss_main']:.4f}, sub {scalars['loss_sub']:.4f}) | "
                f"acc {scalars['accuracy']:.3f} | lr {scalars['lr']:.2e} | "
                f"{steps_per_s * self.batch_size:.0f} ex/s | ETA {eta}")
