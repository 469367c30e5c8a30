"""Model families, chosen by `config.model.family`: "vit", "swin", "resnet", "beit", or the import path of your own
module (e.g. "my_project.my_family"). A family module says

  describe(config) -> str                   how the trainer names the model, e.g. "ViT-S/16"
  check(config)                             ValueError naming the key, for what only the family knows
                                            (its variants, which image sizes fit)
  build(config, num_classes) -> nn.Module   the network; its __call__(images, *, train, keep_idx,
                                            dropout_rate, drop_path_rate, first_example) returns
                                            float32 logits. The keywords are MaskSub's corruption
                                            (masksub.corruption): `keep_idx` (batch, kept) indexes the
                                            family's masking units, the two rates replace the model's.
                                            `first_example` is the index of images[0] in the step's
                                            batch: draw example i's dropout and drop-path masks from
                                            fold_in(rng, first_example + i), so that a batch split into
                                            micro-batches (accum_steps) or over devices is corrupted
                                            exactly as the whole batch would be.
  num_units(config) -> int                  how many masking units an image has (ViT: patch tokens)

and may say (absent: the default after the colon)

  NO_DECAY                                  parameter names without weight decay besides every 1-D
                                            parameter: none
  CLASSIFIER                                the name of the classifier (the Dense that gives the
                                            logits) among the parameters: its kernel's last dimension
                                            is the class count (evaluate.predict), and init_from
                                            starts it fresh when that differs: "head"
  forward_flops(config, num_classes, kept_units) -> float
                                            matmul FLOPs of one image, for MFU: bench uses XLA's count
  from_timm(state_dict, *, variant, image_size, num_classes) -> params, to_timm(params) -> state dict
                                            `python -m masksub_jax.convert`: "no timm mapping"
  detect(state_dict) -> dict | None         None unless the key names are the family's; else {"variant",
                                            "image_size" (None: any), "num_classes", "config": further
                                            config keys the weights imply, and optionally "notes": lines
                                            convert prints, e.g. what it leaves out}: convert needs --family
  timm_model(state_dict, variant, image_size, config) -> (name, kwargs) | None
                                            the timm.create_model call that loads to_timm's state dict,
                                            which convert --to_timm prints (config: the model.* keys
                                            the run or the converted weights record): none
  fit(loaded, initial, say) -> loaded       config.init_from: the loaded parameters (flat "a/b" names)
                                            fitted to the freshly initialised ones: only a head of
                                            another size is re-initialised
  layer_ids(params) -> tree of int          for optim.layer_decay: each parameter's depth, the head's
                                            the largest: the layer decay is refused
  STATE_COLLECTIONS                         names of the collections besides params that the model keeps
                                            (ResNet: ("batch_stats",)); its from_timm then returns and
                                            its to_timm takes {"params": ..., name: ...}: none
  SUB_BRANCHES                              the masksub.mode values whose corruption the model applies
                                            (masking uses keep_idx, dropout and droppath the rates); any
                                            other mode is refused by config.validate: ("masking",)
  draw_kept(config, images, keep_idx, fill) -> images
                                            the input preview (TensorBoard's sub_branch_inputs): the
                                            images with the units that keep_idx drops painted `fill`:
                                            square units in a row-major grid, where num_units is a
                                            square whose side divides the image; no picture otherwise

A model with such collections updates them in training mode (`apply(..., mutable=[...])`); the
trainer finds them in `model.init`'s result, keeps them in the train state beside the parameters,
checkpoints them and evaluates with them.
"""
import functools
import importlib
import math

FAMILIES = ("vit", "swin", "resnet", "beit")


def get(family: str):
    """The family module that `config.model.family` names."""
    name = f"masksub_jax.models.{family}" if family in FAMILIES else family
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name):
            raise  # the family exists, but something it imports does not
        raise ValueError(f"Unknown model.family {family!r}: use one of {FAMILIES} or the import path of a "
                         "module that defines a family (see masksub_jax/models/__init__.py).") from None
    missing = [f for f in ("describe", "check", "build", "num_units") if not hasattr(module, f)]
    if missing:
        raise ValueError(f"model.family={family!r} ({module.__name__}) lacks {missing}; a family module "
                         "defines describe, check, build and num_units (masksub_jax/models/__init__.py).")
    return module


def of(config):
    return get(config.model.family)


def classifier(family) -> str:
    """The name of `family`'s classifier among its parameters (CLASSIFIER)."""
    return getattr(family, "CLASSIFIER", "head")


def num_classes(family, params: dict) -> int:
    """The class count of a model's parameters: its classifier's kernel's last dimension."""
    name = classifier(family)
    if name not in params or "kernel" not in params[name]:
        raise ValueError(f"The parameters have no classifier {name!r} with a kernel (they have {sorted(params)}); a "
                         "family whose classifier is named otherwise says so with CLASSIFIER = NAME "
                         "(masksub_jax/models/__init__.py).")
    return int(params[name]["kernel"].shape[-1])


def sub_branches(family) -> tuple[str, ...]:
    """The masksub.mode values besides "none" that `family` implements (SUB_BRANCHES)."""
    return tuple(getattr(family, "SUB_BRANCHES", ("masking",)))


def preview_drawer(family, config):
    """(images, keep_idx, fill) -> images with the dropped units painted, or None where the family
    draws none and its units are not squares in a grid (see draw_kept)."""
    if hasattr(family, "draw_kept"):
        return functools.partial(family.draw_kept, config)
    units, size = family.num_units(config), config.data.image_size
    side = math.isqrt(units)
    if side * side != units or size % side:
        return None
    from masksub_jax.models import layers
    return lambda images, keep_idx, fill: layers.keep_blocks(images, keep_idx, size // side, fill=fill)
