"""The 224 px fine-tune of a DeiT-III ViT-L/16 MaskSub pretraining run (configs/vit_l.py), 20 epochs.

  python -m masksub_jax.main --config=configs/vit_l.py --workdir=gs://BUCKET/vit_l_masksub
  python -m masksub_jax.main --config=configs/vit_l_ft224.py --workdir=gs://BUCKET/vit_l_ft224 \
      --config.init_from=gs://BUCKET/vit_l_masksub

Global batch 512 (2502 steps per epoch), AdamW lr 1e-5, drop-path 0.45, MaskSub on; pos_embed resampled
from the pretraining grid. Expected ImageNet-1k top-1 (published, Heo et al., CVPR 2025, after
400 pretraining epochs): 85.2; the baseline (both stages with --config.masksub.mode=none) 84.5.
Not yet reproduced with this code.
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    return config_lib.deit3_finetune_224(arg, variant="L/16", drop_path=0.45)
