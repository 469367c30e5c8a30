"""Transfer learning with MaskSub: fine-tune weights you already have (timm / DeiT-III / a run of
ours) on another data set, DeiT's transfer protocol with MaskSub 0.5 on.

  python -m masksub_jax.convert --from=deit3_base_patch16_224.safetensors --to=inits/deit3_b
  python -m masksub_jax.main --config=transfer:dataset=cifar100,init_from=inits/deit3_b --workdir=runs/c100
  python -m masksub_jax.main --config=transfer:dataset=folder,init_from=inits/deit3_b --workdir=runs/mine \
      --config.data.folder=/data/mine               # /data/mine/train/<class>/*.jpg, /data/mine/val/<class>/*
  python -m masksub_jax.main --config=transfer:dataset=digits,init_from=runs/digits --workdir=runs/digits_ft

The argument: `dataset=NAME` and `init_from=PATH` (a directory written by `python -m
masksub_jax.convert`, or a training workdir). The default data set is digits, the embedded one, so
that `--config=transfer` alone runs anywhere (and convert, which names the shipped config that fits
converted weights best, never names this one for ImageNet weights). The model is the one
`init_from` records (its masksub_weights.json, or the workdir's config.json): family, variant and, for
ViT, the pool and LayerScale, so a converted timm model needs no --config.model.* flags (a directory
converted before masksub_weights.json recorded the pool and LayerScale may need them). Without
`init_from` in the argument the model is ViT-B/16 DeiT-III style (mu/2 for digits);
`family=` / `variant=` in the argument or --config.model.* flags choose another. Weights named with
--config.init_from instead are checked against the configured model (an error names the flags).
The classifier is new when the class count differs (it does, from ImageNet); pos_embed is resampled.

Data sets (TFDS name, train / eval split). Prepare a TFDS one once (it downloads; the runs are
offline afterwards): `python -m masksub_jax.data.prepare --name=cifar100 --data_dir=DIR`, then pass
--config.data.data_dir=DIR.
  cifar10, cifar100       train / test, 32 px images upsampled to 224 (see below)
  oxford_flowers102       train+validation (2,040, as DeiT's Table 6) / test
  cars196                 train / test (Stanford Cars)
  oxford_iiit_pet         train / test (not in DeiT's tables: the Flowers / Cars recipe)
  i_naturalist2018        train / validation
  i_naturalist2019        not in TFDS: an image folder (data.folder=ROOT, ROOT/train/<class>/ and
                          ROOT/val/<class>/ made from train2019.json / val2019.json), iNat recipe
  folder                  your own image folder (data/folder_source.py): data.folder=ROOT with
                          ROOT/train and ROOT/val (--config.data.eval_split=NAME for another)
  digits                  scikit-learn's 8x8 digits (embedded): a toy of the mechanics, not a recipe
Each class count is read from the data. Upsampling: train images go through random-resized-crop to
data.image_size (a 32 px crop window is resized up, bicubic, data/crop.py), eval images have their
shorter side resized to image_size / crop_ratio (up, for 32 px) and centre-cropped, as DeiT's
datasets.py does with timm's transforms (CIFAR at input size 224: RandomResizedCrop(224),
Resize(256) + CenterCrop(224)).

The recipe (DeiT's transfer protocol, Touvron et al. 2021, section "Transfer learning", Table 6; the
values as its first author gave them in the repositories' issues, the paper's own text could not be
read here):
- image size 224 (facebookresearch/deit#45: "224 or 384"); eval crop ratio 0.875 (DeiT main.py
  --eval-crop-ratio default, datasets.py build_transform).
- AdamW, weight decay 0.05, global batch 768, warmup 5 epochs from 1e-6, cosine to min lr 1e-5
  (DeiT's default, kept: deit#117), no gradient clipping, no EMA; RandAugment rand-m9-mstd0.5-inc1,
  mixup 0.8 / cutmix 1.0, label smoothing 0.1 (soft-target CE), repeated augmentation x3,
  drop-path 0.1 (deit#117, facebookresearch/dino#81, deit#105).
- CIFAR-100: lr 5e-6, 1000 epochs (dino#144 for ViT-B; deit#117). CIFAR-10: lr 7.5e-6 (dino#81).
  With min lr 1e-5 above it the cosine raises the lr to 1e-5, as DeiT's timm scheduler does.
  Random erasing 0 (deit#45: "We remove random erasing"; dino#81 lists none).
- iNaturalist 2018 / 2019: lr 7.5e-5 (after DeiT's batch scaling: deit#141), 360 epochs, random
  erasing 0.1 (deit#105).
- Flowers, Cars, Pets: the CIFAR-100 values. Not verified: the published Cars / CIFAR-10 runs
  used SGD lr 0.01, wd 1e-4, 1000 epochs, no drop-path (deit#45; this project has no SGD), and the
  author's advice for AdamW is "a smaller lr and the ImageNet weight decay".
Not verified either: whether the lrs above are before DeiT's lr x batch / 512 scaling (deit#141
says iNat's is after; the CIFAR ones are taken as the same); the DeiT-III paper's own transfer
values (its appendix could not be read here; this recipe is DeiT's). MaskSub: masking, ratio 0.5
(the method's every released command), the sub-branch taught by the main branch's softmax.
Expected accuracy: not reproduced here (no data set but digits could be read on this machine);
compare with DeiT's Table 7 (DeiT-B, no MaskSub) and run --config.masksub.mode=none as the baseline.
"""
import math

from masksub_jax import config as config_lib

# The DeiT transfer recipe shared by every data set but digits (sources in the docstring).
DEIT_TRANSFER = {
    "data.image_size": 224, "data.crop_ratio": 0.875, "data.augment": "rand-m9-mstd0.5-inc1",
    "data.repeated_aug": 3, "data.random_erasing": 0.0, "model.drop_path": 0.1,
    "loss": "ce", "label_smoothing": 0.1, "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0,
    "optim.name": "adamw", "optim.lr": 5e-6, "optim.min_lr": 1e-5, "optim.warmup_init_lr": 1e-6,
    "optim.warmup_epochs": 5.0, "optim.weight_decay": 0.05, "optim.grad_clip_norm": 0.0,
    "batch_size": 768, "total_epochs": 1000.0, "masksub.mode": "masking", "masksub.ratio": 0.5,
}
INATURALIST = {"optim.lr": 7.5e-5, "total_epochs": 360.0, "data.random_erasing": 0.1}
# The embedded digits: configs/digits.py's data and regularisation, a fine-tuning lr (not published).
DIGITS = {
    "data.source": "digits", "data.image_size": 8, "data.mean": (0.5,), "data.std": (0.5,),
    "data.repeated_aug": 1, "model.drop_path": 0.1, "loss": "ce", "label_smoothing": 0.1,
    "mixup.mixup_alpha": 0.2, "mixup.cutmix_alpha": 0.0, "optim.name": "adamw", "optim.lr": 1e-3,
    "optim.min_lr": 1e-5, "optim.warmup_epochs": 2.0, "optim.weight_decay": 0.05, "batch_size": 128,
    "eval_batch_size": 128, "total_epochs": 30.0, "log_every_steps": 50, "checkpoint_every_steps": 100,
    "masksub.mode": "masking", "masksub.ratio": 0.5,
}


def _tfds(name: str, train: str, evaluate: str, **recipe) -> dict:
    return {**DEIT_TRANSFER, "data.source": "tfds", "data.name": name, "data.train_split": train,
            "data.eval_split": evaluate, **recipe}


def _folder(**recipe) -> dict:
    return {**DEIT_TRANSFER, "data.source": "folder", "data.train_split": "train", "data.eval_split": "val",
            **recipe}


# dataset= value -> config keys; the training example counts set how often to evaluate (10 times a run).
DATASETS = {
    "cifar10": _tfds("cifar10", "train", "test", **{"optim.lr": 7.5e-6}),
    "cifar100": _tfds("cifar100", "train", "test"),
    "oxford_flowers102": _tfds("oxford_flowers102", "train+validation", "test"),
    "cars196": _tfds("cars196", "train", "test"),
    "oxford_iiit_pet": _tfds("oxford_iiit_pet", "train", "test"),
    "i_naturalist2018": _tfds("i_naturalist2018", "train", "validation", **INATURALIST),
    "i_naturalist2019": _folder(**INATURALIST),
    "folder": _folder(),
    "digits": DIGITS,
}
# (iNat 2019's is approximate: only the evaluation cadence depends on it.)
TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "oxford_flowers102": 2_040, "cars196": 8_144,
                  "oxford_iiit_pet": 3_680, "i_naturalist2018": 437_513, "i_naturalist2019": 265_213,
                  "digits": 1_497}
EVALS_PER_RUN = 10
# What a training workdir's config says of its weights' layout, beyond family and variant.
ARCHITECTURE = ("model.pool", "model.layerscale_init", "model.pre_norm", "model.act", "model.norm_eps")
FOLDER_EVAL_EVERY_STEPS = 1000  # an image folder's size is not known here


def get_config(arg=None):
    args = config_lib.parse_arg(arg, dataset="digits", init_from="", family="", variant="")
    if args["dataset"] not in DATASETS:
        raise ValueError(f"Unknown data set dataset={args['dataset']!r}; use one of {', '.join(DATASETS)} "
                         "(folder: your own image folder, with --config.data.folder=ROOT).")
    c = config_lib.override(config_lib.base(), DATASETS[args["dataset"]])
    c.model.variant = "mu/2" if args["dataset"] == "digits" else "B/16"  # DeiT-III style (base()'s model)
    if args["init_from"]:
        c.init_from = args["init_from"]
        config_lib.override(c, recorded_model(args["init_from"]))
    config_lib.override(c, {f"model.{k}": args[k] for k in ("family", "variant") if args[k]})
    if c.model.pre_norm and args["dataset"] != "digits":  # a CLIP tower sees images normalised as CLIP's
        c.data.mean, c.data.std = config_lib.CLIP_MEAN, config_lib.CLIP_STD
    examples = TRAIN_EXAMPLES.get(args["dataset"])
    c.eval_every_steps = (max(1, math.ceil(c.total_epochs * (examples // c.batch_size) / EVALS_PER_RUN))
                          if examples else FOLDER_EVAL_EVERY_STEPS)
    return c


def recorded_model(path: str) -> dict:
    """The config keys of the model that weights at `path` record, read from their JSON by
    init_from.recorded_model (no array, no JAX): family, variant and the keys the weights imply (a
    converted directory's masksub_weights.json "config": ViT's LayerScale and pool), or a training
    workdir's family, variant and ARCHITECTURE keys. {} where nothing is recorded; a path that is not
    there is left to config.validate (init_from.check), which names the fix."""
    from masksub_jax import init_from
    from masksub_jax import workdir as workdir_lib
    if not workdir_lib.path(path).is_dir():
        return {}
    recorded, _ = init_from.recorded_model(path)
    if recorded is None:
        return {}
    implied = recorded.get("config") or {}
    if (workdir_lib.path(path) / "checkpoints").is_dir():  # a run's config: every model.* key, recipe ones too
        implied = {k: v for k, v in implied.items() if k in ARCHITECTURE}
    return {**{f"model.{k}": recorded[k] for k in ("family", "variant") if recorded.get(k)}, **implied}
