"""CLIP ViT-L/14 fine-tuned on ImageNet-1k with MaskSub 0.5, FT-CLIP's recipe: 224 px, 30 epochs.

  python -m masksub_jax.convert --from=ViT-L-14.pt.state_dict.safetensors --to=inits/clip_l14
  python -m masksub_jax.main --config=clip_vit_l14_ft --workdir=gs://BUCKET/clip_l14_ft \
      --config.init_from=inits/clip_l14

The weights: OpenAI's CLIP ViT-L/14, open_clip's ("ViT-L-14", pretrained="openai") or timm's
`vit_large_patch14_clip_224.openai` (see configs/clip_vit_b16_ft.py). Global batch 2048, AdamW lr 4e-4,
warmup 5 epochs, layer decay 0.65, EMA 0.9998 (FT-CLIP scripts/bash_fine_Openai_CLIP_Large_P14.sh;
masksub_jax/config.py clip_finetune). Expected ImageNet-1k top-1 of the EMA weights: 87.8 with MaskSub,
87.5 without (--config.masksub.mode=none); both from a summary of the MaskSub paper (CVPR 2025), not its
tables; the baseline equals the last-epoch EMA accuracy of FT-CLIP's logs/CLIP_L14.log (87.49; its
headline 88.0 is the best epoch). Not yet reproduced with this code.
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    return config_lib.clip_finetune(arg, variant="L/14", epochs=30, warmup_epochs=5, lr=4e-4, layer_decay=0.65)
