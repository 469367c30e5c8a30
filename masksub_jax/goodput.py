"""Where a run's wall time goes, across every session that trained it, and the share that trained.

Each session (a start or a resume of the same workdir) keeps one line of WORKDIR/sessions.jsonl up to
date: the devices it ran on and the seconds it spent on each phase below. A session that is killed
keeps the line it last wrote. Steps that a session trained after its last checkpoint are trained again
by the next one: their time is "redone", lost to the interruption. Goodput is the training time that
was not redone over the wall time of all sessions (MLPerf's and Cloud TPU's "goodput").
"""
import contextlib
import json
import time

from masksub_jax import workdir as workdir_lib

SESSIONS = "sessions.jsonl"
# The phases of a session; "train" is the rest of its wall time: steps that were not waiting for input.
PHASES = ("startup", "restore", "compile", "input_wait", "eval", "save", "train")


class Clock:
    """The phases of this session. `start_time`: when the session started (time.time())."""

    def __init__(self, workdir: str, is_chief: bool, start_time: float, topology: dict):
        self.workdir, self.is_chief, self.start_time = workdir, is_chief, start_time
        self.record = {"start_step": 0, "step": 0, **topology, **{f"{phase}_s": 0.0 for phase in PHASES}}
        self.sessions = read(workdir)

    def begin(self, start_step: int, *, fresh: bool) -> None:
        """Training starts at `start_step`; what came before (less the restore) was start-up. A fresh
        run has no earlier sessions (those of a start that saved no checkpoint are not its)."""
        if fresh:
            self.sessions = []
        self.record.update(session=len(self.sessions), start_step=start_step, step=start_step)
        self.add("startup", time.time() - self.start_time - self.record["restore_s"])

    def add(self, phase: str, seconds: float) -> None:
        self.record[f"{phase}_s"] += seconds

    @contextlib.contextmanager
    def timing(self, phase: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - began)

    def previous(self) -> dict | None:
        """The session before this one, if the workdir has one."""
        return self.sessions[-1] if self.sessions else None

    def save(self, step: int) -> None:
        """This session's line, as of `step` (process 0 writes it)."""
        self.record["step"] = step
        self.record["wall_s"] = time.time() - self.start_time
        measured = sum(self.record[f"{phase}_s"] for phase in PHASES if phase != "train")
        self.record["train_s"] = max(0.0, self.record["wall_s"] - measured)
        if self.is_chief:
            lines = [json.dumps(s) for s in [*self.sessions, self.record]]
            workdir_lib.write_text(workdir_lib.path(self.workdir) / SESSIONS, "\n".join(lines) + "\n")

    def summary(self) -> dict:
        return summarize([*self.sessions, self.record])


def read(workdir: str) -> list[dict]:
    file = workdir_lib.path(workdir) / SESSIONS
    return [json.loads(line) for line in file.read_text().splitlines() if line] if file.exists() else []


def summarize(sessions: list[dict]) -> dict:
    """Seconds per phase over all sessions, the redone steps and their seconds, and the goodput."""
    total = {f"{phase}_s": sum(s[f"{phase}_s"] for s in sessions) for phase in PHASES}
    total["wall_s"] = sum(s["wall_s"] for s in sessions)
    redone_steps, redone_s = 0, 0.0
    for before, after in zip(sessions, sessions[1:]):
        lost = max(0, before["step"] - after["start_step"])
        trained = before["step"] - before["start_step"]
        redone_steps += lost
        redone_s += before["train_s"] * lost / trained if trained else 0.0
    total.update(redone_steps=redone_steps, redone_s=redone_s, sessions=len(sessions),
                 goodput=(total["train_s"] - redone_s) / total["wall_s"] if total["wall_s"] else 0.0)
    return total


def describe(total: dict) -> str:
    """One line: the goodput and where the rest went."""
    parts = [f"{name} {total[key]:.0f} s" for name, key in (
        ("compiling", "compile_s"), ("input wait", "input_wait_s"), ("evaluating", "eval_s"),
        ("saving", "save_s"), ("restoring", "restore_s"), ("start-up", "startup_s")) if total[key] >= 0.5]
    if total["redone_steps"]:
        parts.append(f"{total['redone_steps']} steps redone after interruptions {total['redone_s']:.0f} s")
    sessions = f" over {total['sessions']} sessions" if total["sessions"] > 1 else ""
    return (f"goodput {total['goodput']:.2f}{sessions}: training {total['train_s'] - total['redone_s']:.0f} s of "
            f"{total['wall_s']:.0f} s" + (f"; {', '.join(parts)}" if parts else ""))
