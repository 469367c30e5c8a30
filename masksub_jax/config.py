"""The config schema: every key with its default, the DeiT-III recipe, and validation.

Configs under `configs/` start from `base()` (or `deit3_pretraining()`) and change what they need.
`validate` checks every key's type and range and names the key in its error, before anything is
compiled; keys that `base()` does not have are rejected.
"""
import difflib
import math

import ml_collections
from ml_collections import config_dict

from masksub_jax import losses, masksub, models

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("digits", "synthetic", "tfds", "folder")
AUGMENT_RECIPES = ("3augment", "crop_flip")
DTYPES = ("float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")
# Keys whose default is None.
OPTIONAL = {"data.data_dir": str, "data.folder": str, "total_steps": int, "init_from": str,
            "compilation_cache_dir": str, "wandb.project": str, "wandb.entity": str, "wandb.name": str}


def base() -> ml_collections.ConfigDict:
    """All keys with their defaults (the DeiT-III ViT-S/16 MaskSub recipe on ImageNet-1k)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # digits | synthetic | tfds | folder
    c.data.name = "imagenet2012"  # TFDS name (source=tfds)
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data dir; None = TFDS default
    # source=folder: the folder holding a sub-folder per split, each a sub-folder of images per class
    # (data/folder_source.py); the splits are data.train_split and data.eval_split (ImageNet's: "val").
    c.data.folder = config_dict.placeholder(str)
    c.data.train_split = "train"  # TFDS split, slices allowed: "train[:500]" (digits too; it evaluates on "test")
    c.data.eval_split = "validation"
    # More evaluation sets, evaluated with the eval split at every evaluation: "TFDS_NAME:SPLIT" (e.g.
    # "imagenet_v2:test", "imagenet2012_real:validation": ReaL accuracy) or "folder:PATH" (a split
    # folder of class folders named as the training classes). Reported as eval/<name>/top1 (<name>:
    # the TFDS name with its config, e.g. imagenet_v2/threshold-0.7, or the folder's name).
    # Robustness sets (data/robustness.py): "imagenet_a:test", "imagenet_r:test" (scored on their 200
    # classes' logits), "imagenet_sketch:test", "imagenet_v2/{matched-frequency,threshold-0.7,
    # topimages}:test", "imagenet2012_corrupted:validation" (ImageNet-C: 15 corruptions x 5
    # severities; eval/imagenet2012_corrupted/<corruption>/top1, .../top1 (their mean) and .../mce),
    # or a part of it: "imagenet2012_corrupted/gaussian_noise,fog:validation" (severities 1-5),
    # ".../gaussian_noise,fog/3:validation", ".../all/1,5:validation" (mCE only with all 15 x 5).
    c.data.extra_evals = ()
    c.data.image_size = 224
    c.data.crop_ratio = 1.0  # eval: resize shorter side to image_size / crop_ratio, centre crop
    # source=tfds only. Train augmentation after random-resized-crop + flip: "3augment" (DeiT-III:
    # one of grayscale / solarize / blur, then colour jitter), a timm RandAugment spec such as
    # "rand-m9-mstd0.5-inc1", or "crop_flip" (colour jitter only). See masksub_jax/augment/.
    c.data.augment = "3augment"
    c.data.color_jitter = 0.3  # brightness, contrast and saturation strength; 0 = none; unused with RandAugment
    # Where 3-Augment's and colour jitter's per-pixel ops run: "host" (tf.data, with the crop) or
    # "device" (batched in the train step; the host only decodes, crops, resizes and flips). Either
    # draws from the seed and the step alone. augment/device.py.
    c.data.augment_on = "host"
    c.data.random_erasing = 0.0  # probability per image (timm, pixel mode), applied on the device
    c.data.repeated_aug = 3  # source=tfds: copies of each image per epoch (DeiT's RASampler); 1 = off
    c.data.on_corrupt_image = "fail"  # an image that does not decode: "fail" naming it, or "skip" it with a warning
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    c.data.num_classes = 10  # source=synthetic only; other sources read it from the data set
    c.data.num_train_examples = 1024  # source=synthetic only
    c.data.num_eval_examples = 256  # source=synthetic only

    # Start from these weights instead of a random init (fresh runs only; a resumed run uses its own
    # checkpoint): a training workdir, or timm / DeiT-III / MAE weights written by
    # `python -m masksub_jax.convert`. pos_embed is resampled, a head of another size re-initialised.
    c.init_from = config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict()
    # vit | beit | swin | resnet | the import path of your own family (masksub_jax/models/__init__.py)
    c.model.family = "vit"
    # The family's: ViT and BEiT NAME/PATCH, NAME in mu, Ti, S, B, L, H; Swin T/4, S/4, B/4; ResNet 18, 34,
    # 50, 101, 152.
    c.model.variant = "S/16"
    c.model.drop_path = 0.0  # ViT: every block's; Swin, ResNet, BEiT: the last block's, rising linearly from 0
    c.model.dropout = 0.0
    c.model.layerscale_init = 1e-4  # ViT and BEiT (0.1); 0 = no LayerScale (MAE, CLIP)
    # ViT: "token" (DeiT-III: the final-LN cls token) | "avg" (MAE, and BEiT's only: patch mean, then fc_norm) |
    # "normed_avg" (FT-CLIP: the final LN on each patch token, then their mean)
    c.model.pool = "token"
    c.model.pre_norm = False  # ViT only: CLIP's tower (a LayerNorm before the blocks, no patch-embedding bias)
    c.model.act = "gelu"  # ViT only: the MLP's activation, "gelu" | "quick_gelu" (OpenAI CLIP)
    c.model.norm_eps = 1e-6  # ViT only: every LayerNorm's epsilon (CLIP: 1e-5)
    c.model.head_init_std = 0.02  # ViT and BEiT; MAE, BEiT and FT-CLIP fine-tuning: 2e-5
    # ResNet only: BatchNorm statistics over groups of this many examples (the official RSB runs: 256,
    # one GPU's batch, no SyncBN), the same on any number of devices; 0 = over the whole batch.
    c.model.bn_group_size = 0
    c.model.remat = False  # recompute each block's activations in the backward pass
    # ViT: the blocks as one layer scanned over depth (big_vision's scan): XLA compiles one block, so a
    # pod's compile and `plan` are several times faster; with remat it also needs less memory than the
    # unrolled blocks with remat, without remat more on TPU (BENCHMARKS.md). Block i's weights are at index i.
    c.model.scan = False
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)

    c.masksub = ml_collections.ConfigDict()
    c.masksub.mode = "masking"  # none | masking | dropout | droppath
    c.masksub.ratio = 0.5
    c.masksub.memory_lean = False  # main backward before sub forward: baseline-like peak memory
    c.masksub.block_size = 32  # pixels: the squares that masking keeps or masks (Swin, ResNet); ViT masks its patches

    c.loss = "bce"  # bce (binarised main targets, DeiT-III) | bce_soft (soft targets, RSB) | ce
    c.label_smoothing = 0.0
    c.mixup = ml_collections.ConfigDict()
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.mixup.switch_prob = 0.5

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "lamb"  # lamb | adamw
    c.optim.lr = 4e-3  # absolute, for the global batch below (no implicit scaling)
    c.optim.min_lr = 1e-5
    c.optim.warmup_init_lr = 1e-6
    c.optim.warmup_epochs = 5.0
    c.optim.weight_decay = 0.03
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 1.0  # global norm; 0 = off. LAMB's official clip is 1.0.
    c.optim.layer_decay = 1.0  # layer-wise lr decay (MAE): lr * decay^(layers - layer); 1 = off
    # Parameters that do not train (no update, no optimizer state): glob patterns over their "a/b/c"
    # names, a pattern naming a module freezing all of it: ("patch_embed",) (FT-CLIP), ("blocks_[0-5]",)
    c.optim.frozen = ()

    # Exponential moving average of the weights (timm's ModelEma; DeiT-III: 0.99996), evaluated beside
    # them (eval/ema/...) and exportable (convert --to_timm --ema); 0 = none.
    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.0

    # Probes of the frozen pre-logits features (the classifier's input) at every evaluation, beside
    # the top-1 (probes.py): eval/NAME_Kshot/top1, eval/NAME_linear/top1, eval/NAME_knn/top1. A set:
    # "TFDS_NAME" (splits train, test), "TFDS_NAME:TRAIN:TEST", "folder:PATH" (PATH/train, PATH/test)
    # or "folder:PATH:TRAIN:TEST", or "digits". None by default.
    c.probes = ml_collections.ConfigDict()
    # Few-shot ridge regression (big_vision evaluators/fewshot_lsr.py; its configs/common_fewshot.py
    # probes cifar100, oxford_iiit_pet, dtd, caltech101, cars196, uc_merced).
    c.probes.fewshot = ()
    c.probes.linear = ()  # the same ridge on the whole training split
    c.probes.knn = ()  # DINO's weighted kNN (facebookresearch/dino eval_knn.py)
    c.probes.shots = (1, 5, 10, 25)  # examples per class (big_vision common_fewshot.py)
    c.probes.seeds = 3  # draws of the shots per evaluation (big_vision: num_seeds 3)
    # Ridge terms tried on the held-out examples (big_vision fixes 2^10, inside this range; one value =
    # big_vision's protocol, nothing held out).
    c.probes.l2_grid = tuple(2.0**k for k in range(-4, 21, 2))
    c.probes.heldout_per_class = 5  # training examples per class that choose the ridge term, never shots
    c.probes.knn_k = 20  # DINO: 20
    c.probes.knn_temperature = 0.07  # DINO: 0.07

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1  # devices that share (shard) the parameters and optimizer state; the rest is data parallel

    c.batch_size = 2048  # global, over all devices and processes
    c.accum_steps = 1  # micro-batches per step: the same update with a 1/accum_steps of the activation memory
    c.eval_batch_size = 1024
    c.total_epochs = 400.0
    c.total_steps = config_dict.placeholder(int)  # overrides total_epochs when set

    # A NaN or Inf loss or gradient: "stop" the run naming the step, or "skip" that step's update.
    # Either way the update is not applied and no checkpoint with NaNs is written.
    c.on_nonfinite = "stop"

    # Compiled steps kept for the next start (xla_cache.py): None = $JAX_COMPILATION_CACHE_DIR or
    # ~/.cache/masksub_jax/xla; "workdir" = WORKDIR/xla_cache (shared by a pod's hosts); a path; "" = off.
    c.compilation_cache_dir = config_dict.placeholder(str)
    # A jax.profiler trace of the steps in [first, last) under WORKDIR/profile (TensorBoard's profile
    # plugin, Perfetto, XProf), e.g. (10, 15); () = none. Process 0's, or every process's.
    c.profile = ml_collections.ConfigDict()
    c.profile.steps = ()
    c.profile.all_processes = False
    c.profile.dump_hlo = False  # the train step's optimised HLO as WORKDIR/profile/train_step.hlo.txt
    # Weights & Biases (tracking.py; pip install 'masksub_jax[wandb]'): on when project is set. The same
    # scalars and images as TensorBoard; a resumed run continues its W&B run (WORKDIR/wandb_run_id).
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = config_dict.placeholder(str)
    c.wandb.entity = config_dict.placeholder(str)  # None: your default entity
    c.wandb.name = config_dict.placeholder(str)  # None: the workdir's name
    c.wandb.tags = ()
    c.wandb.mode = "online"  # online | offline (WORKDIR/wandb, for `wandb sync`) | disabled; WANDB_MODE overrides

    c.log_every_steps = 100
    c.eval_every_steps = 6250  # 0 = only at the end
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    return c


def deit3_pretraining(arg: str | None, *, variant: str, image_size: int, lr: float,
                      schedules: dict[int, tuple[float, float]]) -> ml_collections.ConfigDict:
    """The DeiT-III ImageNet-1k recipe with MaskSub 0.5 (method reference, section 3).

    `arg` is the config file's argument ('epochs=800'); `schedules` maps the published epoch counts
    to their (weight decay, drop-path).
    """
    epochs = parse_arg(arg, epochs=400)["epochs"]
    if epochs not in schedules:
        raise ValueError(f"epochs={epochs} has no published recipe; use one of {sorted(schedules)}.")
    c = base()
    c.model.variant = variant
    c.data.image_size = image_size
    c.optim.lr = lr
    c.optim.weight_decay, c.model.drop_path = schedules[epochs]
    c.total_epochs = float(epochs)
    return c


def deit3_finetune_224(arg: str | None, *, variant: str, drop_path: float) -> ml_collections.ConfigDict:
    """The 20-epoch 224 px fine-tune of a DeiT-III MaskSub pretraining run, MaskSub kept on (method
    reference, section 3): AdamW lr 1e-5 (warmup 5 epochs from 1e-6 and DeiT's min lr 1e-5, so flat
    after the warmup), wd 0.1, batch 512, soft-target CE with smoothing 0.1, mixup 0.8 / cutmix 1.0,
    RandAugment rand-m9-mstd0.5-inc1, no repeated augmentation, no random erasing, eval crop 1.0.
    `init_from` names the pretraining workdir; pos_embed is resampled to the 224 grid."""
    parse_arg(arg)
    c = base()
    c.model.variant, c.model.drop_path = variant, drop_path
    c.data.image_size, c.data.augment, c.data.repeated_aug = 224, "rand-m9-mstd0.5-inc1", 1
    c.loss, c.label_smoothing = "ce", 0.1
    c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.grad_clip_norm = "adamw", 1e-5, 0.1, 0.0
    c.batch_size, c.total_epochs = 512, 20.0
    c.eval_every_steps = 5004  # every 2 epochs of 2502 steps
    return c


def mae_finetune(arg: str | None, *, variant: str, epochs: int, blr: float, layer_decay: float,
                 drop_path: float) -> ml_collections.ConfigDict:
    """MAE fine-tuning with MaskSub 0.5 (method reference, section 3): AdamW with lr = blr * 1024 / 256,
    layer-wise lr decay, warmup 5 epochs from 0, cosine to 1e-6, wd 0.05, soft-target CE with
    smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
    global average pool + fc_norm, no LayerScale, head init std 2e-5, eval resize 256 + crop 224.
    `init_from` names MAE-pretrained weights written by `python -m masksub_jax.convert`."""
    parse_arg(arg)
    c = base()
    c.model.variant, c.model.drop_path = variant, drop_path
    c.model.layerscale_init, c.model.pool, c.model.head_init_std = 0.0, "avg", 2e-5
    c.data.image_size, c.data.crop_ratio = 224, 0.875
    c.data.augment, c.data.random_erasing, c.data.repeated_aug = "rand-m9-mstd0.5-inc1", 0.25, 1
    c.loss, c.label_smoothing = "ce", 0.1
    c.batch_size, c.total_epochs = 1024, float(epochs)
    c.optim.name, c.optim.lr, c.optim.layer_decay = "adamw", blr * c.batch_size / 256, layer_decay
    c.optim.min_lr, c.optim.warmup_init_lr, c.optim.warmup_epochs = 1e-6, 0.0, 5.0
    c.optim.weight_decay, c.optim.grad_clip_norm = 0.05, 0.0
    c.eval_every_steps = 6255  # every 5 epochs of 1251 steps
    return c


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_finetune(arg: str | None, *, variant: str, epochs: int, warmup_epochs: int, lr: float,
                  layer_decay: float) -> ml_collections.ConfigDict:
    """FT-CLIP (Dong et al. 2022, "CLIP Itself is a Strong Fine-tuner"; github.com/LightDXY/FT-CLIP
    scripts/bash_fine_Openai_CLIP_*.sh, run_class_finetuning.py's defaults, models/finetune_clip.py)
    with MaskSub 0.5: OpenAI's CLIP image tower (norm_pre, QuickGELU, LayerNorm eps 1e-5, no patch
    bias, the patch convolution frozen), the final LN on each patch token then their mean (pool
    "normed_avg"), a new head init trunc-normal 0.02 x 0.001; 224 px, global batch 2048, AdamW
    (0.9, 0.999, eps 1e-8) at `lr` not scaled by batch, warmup from 0, cosine to 1e-6, weight decay
    0.05 (none on 1-D parameters, cls and position embeddings), layer decay, no gradient clipping,
    drop-path 0, EMA 0.9998 (evaluated: eval/ema/top1), CE with label smoothing 0.1, no mixup or
    cutmix, rand-m9-mstd0.5-inc1, random erasing 0.25, bicubic random-resized crop 0.08-1, CLIP's mean
    and std, eval resize 256 + centre crop 224. MaskSub drops half the patch tokens after the position
    embedding, cls kept (method reference, section 6: how the paper placed it is not stated)."""
    parse_arg(arg)
    c = base()
    c.model.variant, c.model.drop_path, c.model.layerscale_init = variant, 0.0, 0.0
    c.model.pre_norm, c.model.act, c.model.norm_eps, c.model.pool = True, "quick_gelu", 1e-5, "normed_avg"
    c.model.head_init_std = 0.02 * 0.001
    c.data.image_size, c.data.crop_ratio, c.data.mean, c.data.std = 224, 0.875, CLIP_MEAN, CLIP_STD
    c.data.augment, c.data.random_erasing, c.data.repeated_aug = "rand-m9-mstd0.5-inc1", 0.25, 1
    c.loss, c.label_smoothing = "ce", 0.1
    c.mixup.mixup_alpha, c.mixup.cutmix_alpha = 0.0, 0.0
    c.batch_size, c.total_epochs = 2048, float(epochs)
    c.optim.name, c.optim.lr, c.optim.layer_decay, c.optim.frozen = "adamw", lr, layer_decay, ("patch_embed",)
    c.optim.min_lr, c.optim.warmup_init_lr, c.optim.warmup_epochs = 1e-6, 0.0, float(warmup_epochs)
    c.optim.weight_decay, c.optim.grad_clip_norm = 0.05, 0.0
    c.ema.decay = 0.9998
    c.eval_every_steps = 3125  # every 5 epochs of 625 steps
    return c


def swin_recipe(arg: str | None, *, variant: str, drop_path: float) -> ml_collections.ConfigDict:
    """The Swin ImageNet-1k recipe with MaskSub 0.5 on 32 px blocks (method reference, section 3):
    300 epochs, batch 1024, AdamW lr 1e-3 (Swin's 5e-4 per 512), warmup 20 epochs from 1e-6, cosine
    to 1e-5, wd 0.05, clip 5, soft-target CE with smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment
    rand-m9-mstd0.5-inc1, random erasing 0.25, no repeated augmentation, eval crop 224 of 256."""
    parse_arg(arg)
    c = base()
    c.model.family, c.model.variant, c.model.drop_path = "swin", variant, drop_path
    c.data.image_size, c.data.crop_ratio = 224, 0.875
    c.data.augment, c.data.random_erasing, c.data.repeated_aug = "rand-m9-mstd0.5-inc1", 0.25, 1
    c.loss, c.label_smoothing = "ce", 0.1
    c.optim.name, c.optim.lr, c.optim.min_lr, c.optim.warmup_init_lr = "adamw", 1e-3, 1e-5, 1e-6
    c.optim.warmup_epochs, c.optim.weight_decay, c.optim.grad_clip_norm = 20.0, 0.05, 5.0
    c.batch_size, c.total_epochs = 1024, 300.0
    c.eval_every_steps = 12510  # every 10 epochs of 1251 steps
    return c


def resnet_rsb(arg: str | None, *, variant: str) -> ml_collections.ConfigDict:
    """ResNet with MaskSub 0.5 on 32 px squares, as the official command trained it (naver-ai/augsub
    resnet_rsb/README.md, timm's RSB A2 recipe): 300 epochs, batch 2048 (8 GPUs x 256, BatchNorm
    statistics per GPU: bn_group_size 256), LAMB lr 5e-3 (timm's Lamb clips the gradient norm to 1),
    wd 0.02, warmup 5 epochs from 1e-4, cosine to 1e-6, BCE with soft (not binarised) mixed targets,
    no label smoothing, CutMix 1.0 and no Mixup, RandAugment rand-m7-mstd0.5, repeated augmentation
    x3, no drop-path, no random erasing, train and eval at 224, eval crop 0.95.

    The RSB paper's A2 has Mixup 0.1 and drop-path 0.05; the official MaskSub command (which made
    the published numbers) sets both to 0, and so does this recipe."""
    parse_arg(arg)
    c = base()
    c.model.family, c.model.variant, c.model.drop_path, c.model.bn_group_size = "resnet", variant, 0.0, 256
    c.data.image_size, c.data.crop_ratio = 224, 0.95
    c.data.augment, c.data.random_erasing, c.data.repeated_aug = "rand-m7-mstd0.5", 0.0, 3
    c.loss, c.label_smoothing = "bce_soft", 0.0
    c.mixup.mixup_alpha, c.mixup.cutmix_alpha = 0.0, 1.0
    c.optim.name, c.optim.lr, c.optim.min_lr, c.optim.warmup_init_lr = "lamb", 5e-3, 1e-6, 1e-4
    c.optim.warmup_epochs, c.optim.weight_decay, c.optim.grad_clip_norm = 5.0, 0.02, 1.0
    c.batch_size, c.total_epochs = 2048, 300.0
    c.eval_every_steps = 6250  # every 10 epochs of 625 steps
    return c


def parse_arg(arg: str | None, **defaults) -> dict:
    """'epochs=800,foo=bar' -> dict over `defaults`, each value cast to its default's type."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r} (in the config's argument {arg!r}); "
                             + (f"this config takes {sorted(defaults)}." if defaults else "this config takes none."))
        kind = type(defaults[key])
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"Config argument {key}={value} must be of type {kind.__name__}, as its default "
                             f"{defaults[key]!r} is (in the config's argument {arg!r}).") from None
    return out


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys ("masksub.mode") in place, as `--config.KEY=VALUE` does; returns `config`.
    A key the config does not have is an error naming the closest known one."""
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        try:
            parent = config[section] if section else config
            known = name in parent
        except KeyError:
            known = False
        if not known:
            raise ValueError(unknown_key_message(key))
        parent[name] = value
    return config


def flatten(c, prefix=""):
    for key, value in c.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def unknown_key_message(key: str) -> str:
    """What to say of a key that `base()` does not have: the closest known key, and its siblings."""
    schema = dict(flatten(base()))
    close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
    siblings = sorted(k for k in schema if k.rpartition(".")[0] == key.rpartition(".")[0])
    return (f"Unknown config key {key!r}." + (f" Did you mean {close[0]!r}?" if close else "")
            + (f" Known keys here: {siblings}." if siblings else
               " All keys and their defaults: masksub_jax/config.py."))


def _check_types(config):
    schema = dict(flatten(base()))
    for key, value in flatten(config):
        if key not in schema:
            raise ValueError(unknown_key_message(key))
        expected = OPTIONAL.get(key, type(schema[key]))
        if value is None and key in OPTIONAL:
            continue
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if expected is tuple and isinstance(value, list):
            ok = True
        if not ok:
            raise ValueError(f"Config key {key!r} must be {expected.__name__}, got {value!r}.")
    missing = sorted(set(schema) - {k for k, _ in flatten(config)})
    if missing:
        raise ValueError(f"Config is missing keys {missing}; start configs from masksub_jax.config.base().")


def _require(ok: bool, key: str, value, fix: str):
    if not ok:
        raise ValueError(f"Config {key}={value!r} is invalid: {fix}.")


def _check_device_counts(c, num_devices: int, training: bool) -> None:
    _require(c.mesh.fsdp >= 1 and num_devices % c.mesh.fsdp == 0, "mesh.fsdp", c.mesh.fsdp,
             f"must divide the device count {num_devices}")
    for key in ("batch_size", "eval_batch_size") if training else ("eval_batch_size",):
        _require(c[key] >= 1 and c[key] % num_devices == 0, key, c[key],
                 f"must be a positive multiple of the device count {num_devices}")
    if training:
        _require(c.accum_steps >= 1 and c.batch_size % (c.accum_steps * num_devices) == 0, "accum_steps",
                 c.accum_steps, f"must divide batch_size={c.batch_size} into micro-batches that are a multiple of "
                 f"the device count {num_devices}")


def _check_probes(c) -> None:
    p = c.probes
    from masksub_jax import probes
    for key in ("fewshot", "linear", "knn"):
        for spec in p[key]:
            try:
                probes.parse_set(spec)
            except ValueError as e:
                raise ValueError(f"Config probes.{key} is invalid: {e}") from None
    _require(len(p.shots) >= 1 and all(isinstance(k, int) and k >= 1 for k in p.shots), "probes.shots", p.shots,
             "give positive examples-per-class counts, e.g. (1, 5, 10, 25)")
    _require(p.seeds >= 1, "probes.seeds", p.seeds, "must be >= 1")
    _require(len(p.l2_grid) >= 1 and all(isinstance(v, (int, float)) and v > 0 for v in p.l2_grid), "probes.l2_grid",
             p.l2_grid, "give one or more positive ridge terms, e.g. (1024.0,) (big_vision's)")
    _require(p.heldout_per_class >= (1 if len(p.l2_grid) > 1 else 0), "probes.heldout_per_class",
             p.heldout_per_class, "must be >= 1 to choose among several probes.l2_grid values (one value: >= 0)")
    _require(p.knn_k >= 1, "probes.knn_k", p.knn_k, "must be >= 1 (DINO: 20)")
    _require(p.knn_temperature > 0, "probes.knn_temperature", p.knn_temperature, "must be > 0 (DINO: 0.07)")


def validate(config, num_devices: int | None = 1, *, training: bool = True) -> None:
    """Checks every key's type and range; raises ValueError naming the key and the fix. With
    `num_devices` None the checks against the device count are left out (main.py validates before
    JAX starts, and train.run again with the count). `training` False (evaluation): the keys only
    training uses (init_from, batch_size, accum_steps) are not checked."""
    _check_types(config)
    c = config
    family = models.of(c)
    family.check(c)  # the variant, and the image sizes that fit it
    _require(not c.model.scan or c.model.family == "vit", "model.scan", c.model.scan,
             f"only the ViT family scans its blocks (model.family={c.model.family!r}); use False")
    _require(c.data.source in SOURCES, "data.source", c.data.source, f"use one of {SOURCES}")
    _require(c.data.source != "folder" or bool(c.data.folder), "data.folder", c.data.folder,
             "data.source='folder' reads the image-folder tree at data.folder=ROOT (ROOT/<split>/<class>/*.JPEG)")
    for spec in c.data.extra_evals:
        _require(isinstance(spec, str) and ":" in spec and all(spec.split(":", 1)), "data.extra_evals", spec,
                 "give each as 'TFDS_NAME:SPLIT' (e.g. 'imagenet_v2:test') or 'folder:PATH'")
    _check_probes(c)
    _require(0 <= c.ema.decay < 1, "ema.decay", c.ema.decay, "must be in [0, 1) (0 = no EMA; DeiT-III: 0.99996)")
    _require(0 < c.data.crop_ratio <= 1, "data.crop_ratio", c.data.crop_ratio, "must be in (0, 1]")
    _require(c.data.on_corrupt_image in ("fail", "skip"), "data.on_corrupt_image", c.data.on_corrupt_image,
             "use 'fail' or 'skip'")
    if c.data.augment not in AUGMENT_RECIPES:
        from masksub_jax.augment import spec
        try:
            spec.parse(c.data.augment)
        except ValueError as e:
            raise ValueError(f"Config data.augment={c.data.augment!r} is invalid: use one of {AUGMENT_RECIPES} "
                             f"or a RandAugment spec. {e}") from None
    _require(c.data.augment_on in ("host", "device"), "data.augment_on", c.data.augment_on, "use 'host' or 'device'")
    _require(0 <= c.data.color_jitter < 1, "data.color_jitter", c.data.color_jitter, "must be in [0, 1)")
    _require(0 <= c.data.random_erasing <= 1, "data.random_erasing", c.data.random_erasing, "must be in [0, 1]")
    _require(1 <= c.data.repeated_aug <= c.batch_size, "data.repeated_aug", c.data.repeated_aug,
             "must be >= 1 (1 = off) and at most batch_size")
    _require(len(c.data.mean) == len(c.data.std) and all(s > 0 for s in c.data.std), "data.std",
             c.data.std, "give one positive std per channel, as many as data.mean")
    for key in ("num_classes", "num_train_examples", "num_eval_examples"):
        _require(c.data[key] >= 1, f"data.{key}", c.data[key], "must be >= 1")
    _require(c.masksub.mode in masksub.MODES, "masksub.mode", c.masksub.mode, f"use one of {masksub.MODES}")
    _require(0 <= c.masksub.ratio < 1, "masksub.ratio", c.masksub.ratio, "must be in [0, 1)")
    _require(c.masksub.mode == "none" or c.masksub.mode in models.sub_branches(family), "masksub.mode",
             c.masksub.mode, f"{family.describe(c)} implements the sub-branches {models.sub_branches(family)} "
             "(its SUB_BRANCHES); use one of them or 'none'")
    if c.masksub.mode == "masking" and c.masksub.ratio > 0:
        units = family.num_units(c)
        _require(masksub.num_kept(units, c.masksub.ratio) >= 1, "masksub.ratio", c.masksub.ratio,
                 f"keeps none of the {units} masking units of {family.describe(c)}; lower the ratio")
    _require(c.model.dtype in DTYPES, "model.dtype", c.model.dtype, f"use one of {DTYPES}")
    for key in ("drop_path", "dropout"):
        _require(0 <= c.model[key] < 1, f"model.{key}", c.model[key], "must be in [0, 1)")
    _require(c.model.layerscale_init >= 0, "model.layerscale_init", c.model.layerscale_init, "must be >= 0 (0 = none)")
    _require(c.loss in losses.LOSSES, "loss", c.loss, f"use one of {sorted(losses.LOSSES)}")
    _require(0 <= c.label_smoothing < 1, "label_smoothing", c.label_smoothing, "must be in [0, 1)")
    _require(not (c.loss == "bce" and c.label_smoothing > 0), "label_smoothing", c.label_smoothing,
             "BCE binarises its targets, which turns every smoothed class into 1; use 0 with loss='bce'")
    for key in ("mixup_alpha", "cutmix_alpha"):
        _require(c.mixup[key] >= 0, f"mixup.{key}", c.mixup[key], "must be >= 0 (0 = off)")
    _require(0 <= c.mixup.switch_prob <= 1, "mixup.switch_prob", c.mixup.switch_prob, "must be in [0, 1]")
    _require(c.optim.name in ("lamb", "adamw"), "optim.name", c.optim.name, "use 'lamb' or 'adamw'")
    for key in ("lr", "eps"):
        _require(c.optim[key] > 0, f"optim.{key}", c.optim[key], "must be > 0")
    for key in ("min_lr", "warmup_init_lr", "warmup_epochs", "weight_decay", "grad_clip_norm"):
        _require(c.optim[key] >= 0, f"optim.{key}", c.optim[key], "must be >= 0")
    for key in ("b1", "b2"):
        _require(0 <= c.optim[key] < 1, f"optim.{key}", c.optim[key], "must be in [0, 1)")
    _require(0 < c.optim.layer_decay <= 1, "optim.layer_decay", c.optim.layer_decay, "must be in (0, 1]; 1 = off")
    _require(c.optim.layer_decay == 1 or hasattr(family, "layer_ids"), "optim.layer_decay", c.optim.layer_decay,
             f"model.family={c.model.family!r} has no layers to decay over (layer_ids); use 1")
    _require(c.model.head_init_std > 0, "model.head_init_std", c.model.head_init_std, "must be > 0")
    _require(all(isinstance(p, str) and p for p in c.optim.frozen), "optim.frozen", c.optim.frozen,
             "give glob patterns over parameter names, e.g. ('patch_embed',) or ('blocks_[0-5]',)")
    if num_devices is not None:
        _check_device_counts(c, num_devices, training)
    _require(c.on_nonfinite in NONFINITE_POLICIES, "on_nonfinite", c.on_nonfinite, f"use one of {NONFINITE_POLICIES}")
    _require(c.total_epochs > 0 and math.isfinite(c.total_epochs), "total_epochs", c.total_epochs, "must be > 0")
    _require(c.total_steps is None or c.total_steps >= 1, "total_steps", c.total_steps, "must be >= 1 or None")
    _require(c.wandb.mode in ("online", "offline", "disabled"), "wandb.mode", c.wandb.mode,
             "use 'online', 'offline' or 'disabled'")
    steps = tuple(c.profile.steps)
    _require(steps == () or (len(steps) == 2 and all(isinstance(s, int) for s in steps) and 0 <= steps[0] < steps[1]),
             "profile.steps", c.profile.steps, "give (first, last) with 0 <= first < last, e.g. (10, 15); () = none")
    _require(not steps or c.total_steps is None or steps[1] <= c.total_steps, "profile.steps", c.profile.steps,
             f"ends after the run's total_steps={c.total_steps}")
    if training and c.wandb.project and c.wandb.mode != "disabled":
        import importlib.util
        _require(importlib.util.find_spec("wandb") is not None, "wandb.project", c.wandb.project,
                 "needs wandb: pip install 'masksub_jax[wandb]' (or leave wandb.project unset)")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _require(c[key] >= 1, key, c[key], "must be >= 1")
    _require(c.eval_every_steps >= 0, "eval_every_steps", c.eval_every_steps, "must be >= 0 (0 = at the end)")
    if training and c.init_from:
        from masksub_jax import init_from
        init_from.check(c)  # what the path holds, read without JAX: before the data and compiling
