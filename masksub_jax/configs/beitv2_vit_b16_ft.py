"""BEiT v2 fine-tuning of ViT-B/16 with MaskSub 0.5, ImageNet-1k at 224 px, 100 epochs, from BEiT v2's
1600-epoch ImageNet-1k pretraining (beitv2_base_patch16_224_pt1k.pth, unilm beit2/PRETRAINING.md).

  python -m masksub_jax.convert --from=beitv2_base_patch16_224_pt1k.pth --to=inits/beitv2_b
  python -m masksub_jax.main --config=configs/beitv2_vit_b16_ft.py --workdir=gs://BUCKET/beitv2_b16_ft \
      --config.init_from=inits/beitv2_b

Expected ImageNet-1k top-1: the baseline (--config.masksub.mode=none) 85.5, BEiT v2's published result for
this setting (unilm beit2/get_started_for_image_classification.md, 1600 pretraining epochs, 100
fine-tuning epochs); + MaskSub 85.6 (Heo et al., CVPR 2025, as given by a summary of the paper, not read
from its tables). Not yet reproduced with this code.
How MaskSub was placed in BEiT is not stated; here it drops patch tokens before the blocks, keeps cls,
and gathers each block's relative position bias for the kept tokens (models/beit.py).

Where each value comes from. [cmd]: the fine-tuning command and its notes for 1600-epoch pretrained
base models in unilm beit2/get_started_for_image_classification.md; [def]: a default of unilm
beit2/run_class_finetuning.py that the command does not override; [sched]: BEiT's utils.cosine_scheduler
as run_class_finetuning.py calls it (warmup from 0, not --warmup_lr; per-step cosine to --min_lr);
[data]: BEiT's datasets.py eval transform (crop_pct 224/256 below 384 px). The BEiT v2 paper's appendix
table of fine-tuning hyperparameters (Peng et al. 2022) was not read here; the values are the code's.
  model: beitv2_base_patch16_224 layout, use_abs_pos_emb False, rel_pos_bias True, qkv bias, mean
         pooling + fc_norm [def]; LayerScale init 0.1 [def] (the weights' gammas replace it); head init
         trunc_normal(0.02) * init_scale 0.001 = std 2e-5 [def]; drop-path 0.2, linear over depth [cmd]
  optim: AdamW [def], betas (0.9, 0.999) (torch's, --opt_betas None) and eps 1e-8 [def], lr 5e-4 for
         the global batch 1024 = 8 GPUs x 128 [cmd], no gradient clipping [def], weight decay 0.05
         constant [cmd], none on 1-D parameters and cls_token (the relative position tables are decayed:
         no --disable_weight_decay_on_rel_pos_bias) [def], layer decay 0.6 [cmd] over BEiT's layer ids
         (models/beit.py layer_ids), warmup 20 epochs [cmd] from 0 [sched], cosine to min lr 1e-6 [def]
  schedule: 100 epochs [cmd], 1251 steps per epoch
  loss:  soft-target CE, label smoothing 0.1 [def], Mixup 0.8 / CutMix 1.0 [cmd], switch prob 0.5 [def]
  data:  RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel mode), bicubic [def]; ImageNet
         default mean / std [cmd]; no repeated augmentation (DistributedSampler) [def]; eval resize
         256, centre crop 224 [data]
  ema:   none (the command has no --model_ema) [cmd]
"""
from masksub_jax import config as config_lib


def get_config(arg=None):
    config_lib.parse_arg(arg)
    c = config_lib.base()
    c.model.family, c.model.variant, c.model.pool = "beit", "B/16", "avg"
    c.model.layerscale_init, c.model.head_init_std, c.model.drop_path = 0.1, 2e-5, 0.2
    c.data.image_size, c.data.crop_ratio = 224, 0.875
    c.data.augment, c.data.random_erasing, c.data.repeated_aug = "rand-m9-mstd0.5-inc1", 0.25, 1
    c.loss, c.label_smoothing = "ce", 0.1
    c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.switch_prob = 0.8, 1.0, 0.5
    c.batch_size, c.total_epochs = 1024, 100.0
    c.optim.name, c.optim.lr, c.optim.layer_decay = "adamw", 5e-4, 0.6
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.min_lr, c.optim.warmup_init_lr, c.optim.warmup_epochs = 1e-6, 0.0, 20.0
    c.optim.weight_decay, c.optim.grad_clip_norm = 0.05, 0.0
    c.ema.decay = 0.0
    c.masksub.mode, c.masksub.ratio = "masking", 0.5
    c.eval_every_steps = 6255  # every 5 epochs of 1251 steps
    return c
