"""DeiT-III ViT-L/16 with MaskSub 0.5, pretrained on ImageNet-1k at 192 px, 400 or 800 epochs.

  python -m masksub_jax.main --config=configs/vit_l.py --workdir=gs://BUCKET/vit_l_masksub
  python -m masksub_jax.main --config=configs/vit_l.py:epochs=800 --workdir=gs://BUCKET/vit_l_800

Global batch 2048 (625 steps per epoch), LAMB lr 3e-3, BCE with binarised mixup targets.
Expected ImageNet-1k top-1 (published, Heo et al., CVPR 2025): 85.2 at 400 epochs, 85.3 at 800;
the baseline (--config.masksub.mode=none) 84.5 / 84.9. Not yet reproduced with this code.
The published numbers are after a further 20-epoch fine-tune at 224 px (not in this config).
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    # epochs -> (weight decay, drop-path), from the method reference, section 3.
    return config_lib.deit3_pretraining(arg, variant="L/16", image_size=192, lr=3e-3,
                                        schedules={400: (0.03, 0.4), 800: (0.05, 0.45)})
