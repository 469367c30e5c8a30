"""Input data: the sources (TFDS, image folders, digits, synthetic), crops, the pipeline (pipeline.py),
preparation (prepare.py) and the robustness sets' protocols (robustness.py)."""
