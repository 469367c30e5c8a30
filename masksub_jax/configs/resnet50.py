"""ResNet-50 with MaskSub 0.5 (32 px squares zeroed), ImageNet-1k at 224 px, 300 epochs (RSB A2).

  python -m masksub_jax.main --config=configs/resnet50.py --workdir=gs://BUCKET/resnet50_masksub

Global batch 2048 (625 steps per epoch), BatchNorm statistics over groups of 256 as the official 8-GPU
run, LAMB lr 5e-3, BCE with soft CutMix targets, RandAugment rand-m7-mstd0.5, eval crop 0.95.
Expected ImageNet-1k top-1 (published, Heo et al., CVPR 2025): 80.0; the baseline
(--config.masksub.mode=none) 79.7. Not yet reproduced with this code.
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    return config_lib.resnet_rsb(arg, variant="50")
