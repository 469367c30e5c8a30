"""Fake `gcloud`, `sbatch`, `srun`, `scontrol`, `uv` and an old `python3` for the launch-script tests."""
