"""MAE fine-tuning of ViT-L/16 with MaskSub 0.5, ImageNet-1k at 224 px, 50 epochs, from MAE-pretrained weights.

  python -m masksub_jax.convert --from=mae_pretrain_vit_large.pth --to=inits/mae_vit_l
  python -m masksub_jax.main --config=configs/mae_vit_l.py --workdir=gs://BUCKET/mae_vit_l \
      --config.init_from=inits/mae_vit_l

Global batch 1024 (1251 steps per epoch), AdamW lr 1e-3 * 1024 / 256, layer-wise lr decay 0.75,
drop-path 0.2, global average pool + fc_norm. Expected ImageNet-1k top-1 (published, Heo et al.,
CVPR 2025): 86.1; the baseline (--config.masksub.mode=none) 85.9. Not yet reproduced with this code.
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    return config_lib.mae_finetune(arg, variant="L/16", epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2)
