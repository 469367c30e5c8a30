"""Where metrics go: TensorBoard events and a plain JSON-lines file in the workdir, and the console."""
import datetime
import json
import time

from clu import metric_writers
from etils import epath

from masksub_jax import tracking
from masksub_jax import workdir as workdir_lib


class JsonlWriter(tracking.PartialWriter):
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

    def flush(self):
        """Atomically: a kill mid-write leaves the previous version, never a cut one."""
        workdir_lib.write_text(self._path, self._text)


def read_history(workdir: str) -> list[dict]:
    """The run's logged metrics, oldest first: {"step", "train/loss_main", ...} and {"step", "eval/top1",
    "eval/top5"} records from WORKDIR/metrics.jsonl ([] if there is none)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [record for record in map(json.loads, lines) if "step" in record]


def make_writer(workdir: str, is_chief: bool, start_step: int = 0, *, wandb=None,
                flat_config: dict | None = None) -> metric_writers.MetricWriter:
    """TensorBoard events under WORKDIR/tb and WORKDIR/metrics.jsonl (kept up to `start_step`), and
    with `wandb` (config.wandb) a W&B run whose config is `flat_config`, on the chief process only."""
    if not is_chief:
        return metric_writers.MultiWriter([])
    writers = [metric_writers.SummaryWriter(str(epath.Path(workdir) / "tb")),
               JsonlWriter(str(epath.Path(workdir) / "metrics.jsonl"), start_step)]
    if wandb is not None and tracking.enabled(wandb):
        writers.append(tracking.WandbWriter(workdir, wandb, flat_config or {}))
    return metric_writers.MultiWriter(writers)


class Progress:
    """Console progress: step, losses of both branches, examples/s, ETA and the share of the time
    spent waiting for input since the last report."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total_steps, self.batch_size = total_steps, batch_size
        self._last_step, self._last_time, self._waited = start_step, time.perf_counter(), 0.0
        self.input_wait = None  # of the last interval `rate` closed

    def restart(self, step: int) -> float:
        """Starts the next interval at `step` (after compiling or evaluating, whose time is not the
        steps'); returns the seconds since the last interval began."""
        now = time.perf_counter()
        elapsed, self._last_step, self._last_time, self._waited = now - self._last_time, step, now, 0.0
        return elapsed

    def waited(self, seconds: float) -> None:
        """The loop waited `seconds` for the next batch (the device had nothing queued to run then)."""
        self._waited += seconds

    def rate(self, step: int) -> float | None:
        """Steps per second since the interval began (None if no step since); sets `input_wait`, the
        interval's share of time the loop waited for batches; starts the next interval."""
        steps, waited = step - self._last_step, self._waited
        elapsed = self.restart(step)
        self.input_wait = min(waited / max(elapsed, 1e-9), 1.0) if steps else None
        return steps / max(elapsed, 1e-9) if steps else None

    def line(self, step: int, scalars: dict, steps_per_s: float | None) -> str:
        if steps_per_s:
            eta = datetime.timedelta(seconds=round((self.total_steps - step) / steps_per_s))
            rate = steps_per_s * self.batch_size
            speed = f"{rate:.{0 if rate >= 10 else 2}f} ex/s | input wait {self.input_wait:.0%} | ETA {eta}"
        else:
            speed = "ex/s and ETA at the next log step"
        return (f"step {step}/{self.total_steps} | loss {scalars['loss']:.4f} "
                f"(main {scalars['loss_main']:.4f}, sub {scalars['loss_sub']:.4f}) | "
                f"acc {scalars['accuracy']:.3f} | lr {scalars['lr']:.2e} | {speed}")
