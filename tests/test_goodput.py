"""Where a run's time goes (goodput.py) and the persistent compilation cache (xla_cache.py); a run's
profile, HLO dump and goodput line: tests/test_train.py."""
import os

import pytest

from masksub_jax import goodput, xla_cache


def _session(start_step, step, train_s, **phases):
    record = {f"{phase}_s": 0.0 for phase in goodput.PHASES} | {f"{k}_s": v for k, v in phases.items()}
    wall = train_s + sum(phases.values())
    return record | {"start_step": start_step, "step": step, "train_s": train_s, "wall_s": wall}


def test_goodput_counts_the_steps_a_resume_trains_again_as_lost():
    """Session 1 trains steps 0-30 in 60 s but its last checkpoint was at 20: session 2 trains 20-50
    again, so 10 steps (20 s of session 1's training) were redone."""
    sessions = [_session(0, 30, 60.0, compile=10.0, startup=5.0), _session(20, 50, 50.0, compile=2.0, restore=3.0)]
    total = goodput.summarize(sessions)
    assert total["wall_s"] == 130.0 and total["train_s"] == 110.0 and total["compile_s"] == 12.0
    assert total["redone_steps"] == 10 and total["redone_s"] == pytest.approx(20.0)
    assert total["goodput"] == pytest.approx(90.0 / 130.0)
    line = goodput.describe(total)
    assert line.startswith("goodput 0.69 over 2 sessions: training 90 s of 130 s; compiling 12 s")
    assert "10 steps redone after interruptions 20 s" in line


def test_compilation_cache_directory_by_setting(monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/env/cache")
    assert xla_cache.directory(None, "/runs/a") == "/env/cache"
    assert xla_cache.directory("workdir", "gs://bucket/runs/a/") == "gs://bucket/runs/a/xla_cache"
    assert xla_cache.directory("/shared/xla", "/runs/a") == "/shared/xla"
    assert xla_cache.directory("", "/runs/a") is None
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert xla_cache.directory(None, "/runs/a") == os.path.expanduser("~/.cache/masksub_jax/xla")


def test_the_cache_setting_takes_effect_in_a_process_that_has_compiled_already(tmp_path):
    import jax
    import jax.numpy as jnp
    jax.jit(lambda x: x + 1)(jnp.ones(3))  # the tests' shared cache is open
    try:
        assert xla_cache.use("workdir", str(tmp_path)) == str(tmp_path) + "/xla_cache"
        jax.jit(lambda x: x * 3 - 1)(jnp.ones(5))
        assert any(name.startswith("jit__lambda") for name in os.listdir(tmp_path / "xla_cache"))
    finally:
        xla_cache.use(None, str(tmp_path))  # back to the tests' shared cache


def test_profile_steps_past_the_end_of_the_run_are_refused():
    from masksub_jax import config as config_lib
    config = config_lib.base()
    config.total_steps, config.profile.steps = 100, (90, 120)
    with pytest.raises(ValueError, match=r"profile.steps=\(90, 120\) is invalid: ends after the run's total_steps=100"):
        config_lib.validate(config, num_devices=None)
