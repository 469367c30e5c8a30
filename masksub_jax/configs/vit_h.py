"""DeiT-III ViT-H/14 with MaskSub 0.5, pretrained on ImageNet-1k at 154 px, 400 or 800 epochs.

  python -m masksub_jax.main --config=configs/vit_h.py --workdir=gs://BUCKET/vit_h_masksub
  python -m masksub_jax.main --config=configs/vit_h.py:epochs=800 --workdir=gs://BUCKET/vit_h_800

Global batch 2048 (625 steps per epoch), LAMB lr 3e-3, BCE with binarised mixup targets.
Expected ImageNet-1k top-1 (published, Heo et al., CVPR 2025): 85.7 at 400 epochs, 85.7 at 800;
the baseline (--config.masksub.mode=none) 85.1 / 85.2. Not yet reproduced with this code.
The official code feeds 160 px images, and its stride-14 patch embedding ignores the last 6 rows
and columns; we resize to 154 px instead, the same 11x11 = 121-token grid without the ignored border.
The published numbers are after a further 20-epoch fine-tune at 224 px (not in this config).
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    # epochs -> (weight decay, drop-path), from the method reference, section 3.
    return config_lib.deit3_pretraining(arg, variant="H/14", image_size=154, lr=3e-3,
                                        schedules={400: (0.03, 0.5), 800: (0.05, 0.6)})
