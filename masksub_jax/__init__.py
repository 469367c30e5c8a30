"""masksub_jax: MaskSub (masked sub-branch supervision, CVPR 2025) in JAX/Flax."""
