"""Where metrics go: TensorBoard events and a plain JSON-lines file in the workdir, and the console."""
import datetime
import json
import time

from clu import metric_writers
from etils import epath

from masksub_jax import workdir as workdir_lib


class JsonlWriter(metric_writers.MetricWriter):
    """One JSON object per `write_scalars` call, a line each: {"step": ..., name: value, ...}, and
    one {"hparams": ...} line per run. Only scalars and hparams go here; images, audio and the like
    are for TensorBoard.

    A run resumed at `start_step` keeps the lines up to that step and drops the later ones, which
    the restored state never reached (the steps after its checkpoint are trained, and logged, again).
    The lines are kept and the whole file rewritten at each flush (the trainer flushes at every log
    step), because object stores (gs://) cannot append; a run's metrics are a few thousand lines."""

    def __init__(self, path: str, start_step: int = 0):
        self._path = epath.Path(path)
        old = self._path.read_text().splitlines() if self._path.exists() else []
        kept = [line for line in old if start_step and json.loads(line).get("step", 0) <= start_step]
        self._text = "".join(line + "\n" for line in kept)

    def _add(self, obj, **kwargs):
        self._text += json.dumps(obj, **kwargs) + "\n"

    def write_scalars(self, step, scalars):
        self._add({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

    def write_hparams(self, hparams):
        """Once per run: a resumed run keeps the line it started with."""
        if '{"hparams": ' not in self._text:
            self._add({"hparams": hparams}, default=str)

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
        """Atomically: a kill mid-write leaves the previous version, never a cut one."""
        workdir_lib.write_text(self._path, self._text)

    def close(self):
        self.flush()


def make_writer(workdir: str, is_chief: bool, start_step: int = 0) -> metric_writers.MetricWriter:
    """TensorBoard events under WORKDIR/tb and WORKDIR/metrics.jsonl (kept up to `start_step`), on the
    chief process only."""
    if not is_chief:
        return metric_writers.MultiWriter([])
    return metric_writers.MultiWriter([
        metric_writers.SummaryWriter(str(epath.Path(workdir) / "tb")),
        JsonlWriter(str(epath.Path(workdir) / "metrics.jsonl"), start_step),
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
