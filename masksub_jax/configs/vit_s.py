"""DeiT-III ViT-S/16 with MaskSub 0.5, pretrained on ImageNet-1k at 224 px, 400 or 800 epochs.

  python -m masksub_jax.main --config=configs/vit_s.py --workdir=gs://BUCKET/vit_s_masksub
  python -m masksub_jax.main --config=configs/vit_s.py:epochs=800 --workdir=gs://BUCKET/vit_s_800

Global batch 2048 (625 steps per epoch), LAMB lr 4e-3, BCE with binarised mixup targets.
Expected ImageNet-1k top-1 (published, Heo et al., CVPR 2025): 81.1 at 400 epochs, 81.7 at 800;
the baseline (--config.masksub.mode=none) 80.4 / 81.4. Not yet reproduced with this code.
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    # epochs -> (weight decay, drop-path), from the method reference, section 3.
    return config_lib.deit3_pretraining(arg, variant="S/16", image_size=224, lr=4e-3,
                                        schedules={400: (0.03, 0.0), 800: (0.05, 0.05)})
