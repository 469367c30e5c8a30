"""CLIP ViT-B/16 fine-tuned on ImageNet-1k with MaskSub 0.5, FT-CLIP's recipe: 224 px, 50 epochs.

  python -m masksub_jax.convert --from=ViT-B-16.pt.state_dict.safetensors --to=inits/clip_b16
  python -m masksub_jax.main --config=clip_vit_b16_ft --workdir=gs://BUCKET/clip_b16_ft \
      --config.init_from=inits/clip_b16

The weights: OpenAI's CLIP state dict (`clip.load("ViT-B/16")[0].state_dict()`, saved as
.safetensors or .pth), open_clip's (`open_clip.create_model("ViT-B-16", pretrained="openai")`), or
timm's `vit_base_patch16_clip_224.openai`; convert keeps the image tower and says what it leaves out.
Global batch 2048 (625 steps per epoch), AdamW lr 6e-4, warmup 10 epochs, layer decay 0.6, EMA 0.9998
(masksub_jax/config.py clip_finetune). Expected ImageNet-1k top-1 of the EMA weights: 85.2 with
MaskSub, 84.8 without (--config.masksub.mode=none); both from a summary of the MaskSub paper (CVPR
2025), not its tables; the baseline equals the last-epoch EMA accuracy of FT-CLIP's log
logs/CLIP_B16.log (84.76; FT-CLIP's headline 85.7 is its best epoch). Not yet reproduced with this code.
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    return config_lib.clip_finetune(arg, variant="B/16", epochs=50, warmup_epochs=10, lr=6e-4, layer_decay=0.6)
