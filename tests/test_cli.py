"""What every command shares (masksub_jax/cli.py): configs by name, one-line errors, a quiet start."""
import subprocess
import sys

from masksub_jax import configs


def _main(*args, cwd):
    return subprocess.run([sys.executable, "-m", "masksub_jax.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def test_a_packaged_config_by_name_from_any_directory(tmp_path):
    """--config=digits and --config=vit_b:epochs=800 are the packaged files, wherever the shell is;
    the config loaded is the named one (its own error proves it: total_steps=0 is checked)."""
    done = _main("--config=vit_b:epochs=800", f"--workdir={tmp_path}/w", "--config.total_steps=0", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("error: Config total_steps=0 is invalid")
    done = _main("--config=digits:oops", f"--workdir={tmp_path}/w", cwd=tmp_path)
    assert done.returncode == 1  # the argument reached digits.py, which takes none
    assert "Unknown config argument 'oops'" in done.stderr.splitlines()[-1]
    done = _main("--config=vit_b:epochs=abc", f"--workdir={tmp_path}/w", cwd=tmp_path)
    assert done.stderr.splitlines()[-1] == (
        "error: Config argument epochs=abc must be of type int, as its default 400 is (in the config's argument "
        "'epochs=abc'). (from the config file)")
    for spelled in ("digits.py:oops", "configs/digits.py:oops"):  # as a checkout's commands spell it
        done = _main(f"--config={spelled}", f"--workdir={tmp_path}/w", cwd=tmp_path)
        assert "Unknown config argument 'oops'" in done.stderr.splitlines()[-1], spelled
    assert not (tmp_path / "w").exists()


def test_a_config_file_that_does_not_exist_lists_the_names(tmp_path):
    done = _main("--config=configs/vit_bb.py", f"--workdir={tmp_path}/w", cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"error: no config file 'configs/vit_bb.py' (from {tmp_path}).")
    assert all(name in line for name in configs.names()) and "--config=digits" in line


def test_the_first_line_is_the_trainers_and_tensorflow_start_up_lines_stay_off_the_console(tmp_path):
    """TensorFlow 2.21 prints four absl C++ lines while it loads (oneDNN, twice), whatever
    TF_CPP_MIN_LOG_LEVEL says; here the run gets as far as the data (TensorFlow loaded) and stops."""
    done = _main("--config=digits", f"--workdir={tmp_path}/w", "--config.data.source=tfds",
                 "--config.data.name=no_such_set", f"--config.data.data_dir={tmp_path}/tfds", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith("JAX ")
    assert done.stderr.splitlines() == [done.stderr.strip()]  # one line: the error
    assert done.stderr.startswith(f"error: data.data_dir='{tmp_path}/tfds' does not exist; give the folder that holds")
