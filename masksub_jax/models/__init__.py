"""Model families, chosen by `config.model.family`: "vit", "swin", "resnet", or the import path of your own
module (e.g. "my_project.my_family"). A family module says

  describe(config) -> str                   how the trainer names the model, e.g. "ViT-S/16"
  check(config)                             ValueError naming the key, for what only the family knows
                                            (its variants, which image sizes fit)
  build(config, num_classes) -> nn.Module   the network; its __call__(images, *, train, keep_idx,
                                            dropout_rate, drop_path_rate, first_example) returns
                                            float32 logits. The keywords are MaskSub's corruption
                                            (masksub.corruption): `keep_idx` (batch, kept) indexes the
                                            family's masking units, the two rates replace the model's.
  num_units(config) -> int                  how many masking units an image has (ViT: patch tokens)

and may say (absent: the default after the colon)

  NO_DECAY                                  parameter names without weight decay besides every 1-D
                                            parameter: none
  forward_flops(config, num_classes, kept_units) -> float
                                            matmul FLOPs of one image, for MFU: bench uses XLA's count
  from_timm(state_dict, *, variant, image_size, num_classes) -> params, to_timm(params) -> state dict
                                            `python -m masksub_jax.convert`: "no timm mapping"
  fit(loaded, initial, say) -> loaded       config.init_from: the loaded parameters (flat "a/b" names)
                                            fitted to the freshly initialised ones: only a head of
                                            another size is re-initialised
  layer_ids(params) -> tree of int          for optim.layer_decay: each parameter's depth, the head's
                                            the largest: the layer decay is refused
  STATE_COLLECTIONS                         names of the collections besides params that the model keeps
                                            (ResNet: ("batch_stats",)); its from_timm then returns and
                                            its to_timm takes {"params": ..., name: ...}: none

A model with such collections updates them in training mode (`apply(..., mutable=[...])`); the
trainer finds them in `model.init`'s result, keeps them in the train state beside the parameters,
checkpoints them and evaluates with them.
"""
import importlib

FAMILIES = ("vit", "swin", "resnet")


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
