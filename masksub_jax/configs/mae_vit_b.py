"""MAE fine-tuning of ViT-B/16 with MaskSub 0.5, ImageNet-1k at 224 px, 100 epochs, from MAE-pretrained weights.

  python -m masksub_jax.convert --from=mae_pretrain_vit_base.pth --to=inits/mae_vit_b
  python -m masksub_jax.main --config=configs/mae_vit_b.py --workdir=gs://BUCKET/mae_vit_b \
      --config.init_from=inits/mae_vit_b

Global batch 1024 (1251 steps per epoch), AdamW lr 5e-4 * 1024 / 256, layer-wise lr decay 0.65,
drop-path 0.1, global average pool + fc_norm. Expected ImageNet-1k top-1 (published, Heo et al.,
CVPR 2025): 83.9; the baseline (--config.masksub.mode=none) 83.6. Not yet reproduced with this code.
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    return config_lib.mae_finetune(arg, variant="B/16", epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1)
