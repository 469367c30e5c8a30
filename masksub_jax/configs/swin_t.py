"""Swin-T with MaskSub 0.5 (32 px blocks of mask tokens), ImageNet-1k at 224 px, 300 epochs.

  python -m masksub_jax.main --config=configs/swin_t.py --workdir=gs://BUCKET/swin_t_masksub

Global batch 1024 (1251 steps per epoch), AdamW lr 1e-3, drop-path 0.2 (linear over depth).
Expected ImageNet-1k top-1 (published, Heo et al., CVPR 2025): 81.4; the baseline
(--config.masksub.mode=none) 81.3. Not yet reproduced with this code.
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    return config_lib.swin_recipe(arg, variant="T/4", drop_path=0.2)
