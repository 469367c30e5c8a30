"""The notebook side: the public API after `import masksub_jax`, the quickstart notebook top to bottom
and the seeds study command (the evaluation command: tests/test_readers.py)."""
import json
import os
import re
import subprocess
import sys

from tests.conftest import REPO

TINY = {"total_steps": 6, "log_every_steps": 2, "eval_every_steps": 3, "checkpoint_every_steps": 6}


def test_the_api_is_reachable_after_import_and_loads_nothing_heavy_before_use():
    code = ("import sys, masksub_jax\n"
            "assert not any(m.split('.')[0] in ('jax', 'tensorflow') for m in sys.modules), 'imported too early'\n"
            "c = masksub_jax.configs.get('digits', total_steps=7, **{'masksub.mode': 'none'})\n"
            "print(c.total_steps, c.masksub.mode, callable(masksub_jax.train.run), masksub_jax.__version__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["7", "none", "True"]


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    notebook = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells)  # stripped in git
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # the kernel prepares digits there
    # After the notebook, a cell of the test's: which curves the loss figure's panels hold.
    notebook.cells.append(nbformat.v4.new_code_cell(
        'import json\n'
        'print("PANELS", json.dumps({"drawn": [[list(map(float, line.get_ydata())) for line in axis.get_lines()] '
        'for axis in (main, sub)], "logged": [[h[k] for h in logged] for k in ("train/loss_main", "train/loss_sub")], '
        '"same_axis": main is sub}))'))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(out.get("text", "") for cell in code_cells for out in cell.outputs)
    final = re.search(r"FINAL top1 ([\d.]+) evaluate ([\d.]+) round_trip ([\d.]+)", text)
    assert final, text[-3000:]
    top1, evaluated, round_trip = map(float, final.groups())
    assert top1 > 0.8 and evaluated == top1 and round_trip == top1
    # The sub-branch's loss (against the main branch's predictions) in a panel of its own.
    panels = json.loads(re.search(r"PANELS (.*)", notebook.cells[-1].outputs[0]["text"]).group(1))
    assert not panels["same_axis"] and panels["drawn"] == [[curve] for curve in panels["logged"]]
    figures = [out for cell in code_cells for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 2  # the curves and the two branches' inputs
    assert (tmp_path / "runs" / "quickstart" / "summary.json").exists()
    # Everything it writes is under runs/ (git-ignored in a checkout); tfds/ is this test's data dir.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "tfds"]


def test_study_trains_every_mode_and_seed_and_writes_the_table_and_the_plot(tmp_path, digits_dir):
    flags = [f"--config.{k}={v}" for k, v in {**TINY, "data.data_dir": digits_dir,
                                              "data.train_split": "train[:256]"}.items()]
    command = [sys.executable, "-m", "masksub_jax.study", "--config=configs/digits.py", f"--workdir={tmp_path}",
               "--seeds=2", "--modes=none,masking", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "masking-seed0", "masking-seed1", "none-seed0", "none-seed1"]
    runs = json.loads((tmp_path / "study.json").read_text())
    assert {mode: [r["seed"] for r in results] for mode, results in runs.items()} == {"none": [0, 1],
                                                                                       "masking": [0, 1]}
    for results in runs.values():
        for r in results:
            assert [h["step"] for h in r["history"] if "train/loss_main" in h] == [2, 4, 6]
            assert 0 <= r["top1"] <= 1
    table = (tmp_path / "study.md").read_text()
    assert "| baseline (none) | 2 |" in table and "| MaskSub (masking) | 2 |" in table
    assert "MaskSub minus baseline, held-out top-1, paired by seed" in table
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)  # read back, not retrained
    assert again.returncode == 0 and again.stdout.count("already finished") == 4
