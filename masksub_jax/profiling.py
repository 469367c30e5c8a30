"""config.profile: a jax.profiler trace of chosen steps, and the train step's optimised HLO, under
WORKDIR/profile. Open the trace with TensorBoard (`tensorboard --logdir WORKDIR/profile`, the profile
plugin: `pip install tensorboard-plugin-profile`), XProf, or Perfetto (ui.perfetto.dev, the
*.trace.json.gz file)."""
import jax

from masksub_jax import workdir as workdir_lib


class Profiler:
    """Traces the steps in [first, last) of config.profile.steps, on process 0 or on every process."""

    def __init__(self, workdir: str, profile, is_chief: bool):
        self.directory = workdir_lib.path(workdir) / "profile"
        self.steps = tuple(profile.steps)
        self.active = bool(self.steps) and (is_chief or profile.all_processes)
        self.dump = profile.dump_hlo and is_chief
        self.tracing = False

    def before(self, step: int) -> None:
        """Before the step that `step` counts from 0."""
        if self.active and not self.tracing and self.steps[0] <= step < self.steps[1]:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, steps_done: int, outputs) -> None:
        """After a step, `steps_done` steps done: the trace ends once the last step has finished."""
        if self.tracing and steps_done >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        """Ends a trace the loop left open (the run ended or stopped before its last step)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False

    def dump_hlo(self, jitted, *args) -> None:
        """The optimised HLO of `jitted` on arguments like `args` (shapes and shardings), as text.
        Compiling it again costs little: it comes from the compilation cache when that is on."""
        if self.dump:
            self.directory.mkdir(parents=True, exist_ok=True)
            text = jitted.lower(*args).compile().as_text()
            workdir_lib.write_text(self.directory / "train_step.hlo.txt", text)
