"""The embedded default: a tiny ViT with MaskSub on scikit-learn's 8x8 digits. No download, any laptop.

  python -m masksub_jax.main --config=configs/digits.py --workdir=runs/digits

Expected: top-1 >= 0.95 on the 300 held-out digits in about a minute on 2 CPU cores (see README).
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    config_lib.parse_arg(arg)  # takes no argument: anything after "digits.py:" is an error
    c = config_lib.base()
    c.data.source = "digits"
    c.data.image_size = 8
    c.data.mean = (0.5,)
    c.data.std = (0.5,)
    c.model.variant = "mu/2"  # 16 tokens of 2x2 pixels; MaskSub 0.5 keeps 8
    c.model.drop_path = 0.1
    c.loss = "ce"
    c.label_smoothing = 0.1
    c.mixup.mixup_alpha = 0.2
    c.mixup.cutmix_alpha = 0.0
    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = 5
    c.optim.weight_decay = 0.05
    c.batch_size = 128
    c.eval_batch_size = 128
    c.total_epochs = 100
    c.log_every_steps = 100
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    return c
