"""timm weights in and out: timm state dicts <-> our Flax parameters, for any family with a timm mapping.

  python -m masksub_jax.convert --from=deit3_base.safetensors --to=inits/deit3_b --variant=B/16 --image_size=224
  python -m masksub_jax.convert --family=swin --from=swin_tiny.pth --to=inits/swin_t --variant=T/4 --image_size=224
  python -m masksub_jax.convert --from=mae_pretrain_vit_base.pth --to=inits/mae_b     # variant read from the weights
  python -m masksub_jax.convert --to_timm --from=runs/vit_b --to=vit_b.safetensors     # ours -> timm
  python -m masksub_jax.convert --to_timm --ema --from=runs/vit_b --to=vit_b_ema.safetensors  # the EMA weights
  python -m masksub_jax.main --config=configs/vit_b.py --workdir=runs/ft --config.init_from=inits/deit3_b

  python -m masksub_jax.convert --family=resnet --from=resnet50_a2.safetensors --to=inits/r50 --variant=50

`--from` takes .safetensors, .npz (NumPy arrays only, never pickles) or .pth / .bin (read with
`torch.load(weights_only=True)`, which needs torch installed and refuses pickled code). `--to` gets
an Orbax checkpoint of the variables that `config.init_from` names (the parameters, and ResNet's
BatchNorm statistics). The layouts each family reads are in its module (`from_timm`): ViT takes
DeiT-III, MAE and augreg weights and resamples pos_embed to another image size; Swin takes timm's and
the original (Microsoft / augsub) layout; ResNet timm's (the RSB weights and the official augsub ones).
A head whose class count differs, or a model without head, keeps the config's freshly initialised head.
"""
import os
import sys

import numpy as np

from masksub_jax import models
from masksub_jax.models.weights import ConversionError, flatten, listed, nest


def read_weights(path: str) -> dict[str, np.ndarray]:
    """name -> array from .safetensors, .npz or .pth/.bin/.pt. Nothing is unpickled."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weight file at {path}.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(path)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{path} is a PyTorch file and torch is not installed; install torch, or "
                                  "convert the file to .safetensors where torch is.") from None
        data = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict", "model_ema"):  # training checkpoints wrap the weights
            if isinstance(data, dict) and isinstance(data.get(key), dict):
                data = data[key]
                break
        return {k: v.float().numpy() for k, v in data.items() if hasattr(v, "numpy")}
    raise ConversionError(f"Unknown weight format {suffix!r} of {path}; use .safetensors, .npz or .pth.")


def save_variables(variables: dict, directory: str) -> None:
    """Writes a model's variables ({"params": ..., and e.g. "batch_stats": ...}) as the Orbax
    checkpoint that `config.init_from` reads."""
    import orbax.checkpoint as ocp

    from masksub_jax import workdir as workdir_lib
    ocp.PyTreeCheckpointer().save(str(workdir_lib.path(directory)), variables)


def save_params(params, directory: str) -> None:
    save_variables({"params": params}, directory)


def _as_variables(family, converted) -> dict:
    """A family's from_timm result as variables: its own dict of collections if the family keeps
    state besides the parameters (STATE_COLLECTIONS), else the parameters alone."""
    return converted if getattr(family, "STATE_COLLECTIONS", ()) else {"params": converted}


def _timm_input(family, variables: dict):
    """What the family's to_timm takes: the variables, or the parameters alone."""
    return variables if getattr(family, "STATE_COLLECTIONS", ()) else variables["params"]


def read_params(path: str) -> dict:
    """The parameters that `config.init_from` names (see read_variables). NumPy arrays."""
    return read_variables(path)["params"]


def read_variables(path: str, *, ema: bool = False) -> dict:
    """The variables that `config.init_from` names: a directory written by this module's CLI, or a
    training workdir (its newest checkpoint; with `ema`, its moving average of the weights).
    {"params": ..., and e.g. "batch_stats": ...}, NumPy arrays."""
    from masksub_jax import checkpoint
    from masksub_jax import workdir as workdir_lib
    if (workdir_lib.path(path) / "checkpoints").exists():
        return checkpoint.load_variables(path, ema=ema)
    if ema:
        raise FileNotFoundError(f"--ema reads a training workdir's moving average; {path!r} is not a workdir.")
    try:
        return checkpoint.variables_from(str(workdir_lib.path(path)))
    except Exception as e:
        raise FileNotFoundError(
            f"config.init_from={path!r} is neither a training workdir nor weights written by "
            f"`python -m masksub_jax.convert` ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None


def adapt_params(loaded: dict, initial: dict, *, family: str = "vit", say=print) -> dict:
    """`loaded` fitted onto the freshly initialised `initial` (same tree): first by the family's `fit`
    (ViT resamples pos_embed; Swin keeps a fresh mask_token), then the head is kept from `initial`
    when `loaded` has none or one of another shape. Any other difference is an error naming the
    parameters."""
    flat_loaded, flat_initial = flatten(loaded), flatten(initial)
    fit = getattr(models.get(family), "fit", None)
    if fit is not None:
        flat_loaded = fit(flat_loaded, flat_initial, say)
    out, problems = {}, []
    for name, init_value in flat_initial.items():
        value = flat_loaded.get(name)
        if name.startswith("head/") and (value is None or value.shape != init_value.shape):
            say(f"init_from: {name} {None if value is None else value.shape} does not fit "
                f"{init_value.shape}; it starts freshly initialised.")
            value = init_value
        if value is None or value.shape != init_value.shape:
            problems.append(f"{name}: {None if value is None else value.shape} vs the config's {init_value.shape}")
            continue
        out[name] = np.asarray(value, init_value.dtype)
    extra = set(flat_loaded) - set(flat_initial)
    if problems or extra:
        raise ConversionError(f"config.init_from does not fit the configured model: {'; '.join(problems[:6])}"
                              f"{'; unexpected ' + listed(extra, 6) if extra else ''}. Check model.family, "
                              "model.variant and model.pool.")
    return nest(out)


def adapt_variables(loaded: dict, initial: dict, *, family: str = "vit", say=print) -> dict:
    """`adapt_params` for each collection of `initial` (params, and e.g. batch_stats), which `loaded`
    must have."""
    missing = sorted(set(initial) - set(loaded))
    if missing:
        raise ConversionError(f"config.init_from holds no {missing} (it has {sorted(loaded)}); convert the "
                              f"weights with this version of `python -m masksub_jax.convert --family={family}`.")
    return {name: adapt_params(loaded[name], value, family=family, say=say) for name, value in initial.items()}


def export_timm(source: str, target: str, family: str, *, ema: bool = False) -> int:
    """Our parameters (a training workdir, with `ema` its moving average, or a converted directory)
    as a timm state dict file (.safetensors or .npz). Returns the number of tensors written."""
    family_module = models.get(family)
    if not hasattr(family_module, "to_timm"):
        raise ConversionError(f"model family {family!r} has no timm mapping (to_timm).")
    state_dict = family_module.to_timm(_timm_input(family_module, read_variables(source, ema=ema)))
    if target.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}, target)
    elif target.endswith(".npz"):
        np.savez(target, **state_dict)
    else:
        raise ConversionError(f"Write the timm weights as .safetensors or .npz, not {target!r}.")
    return len(state_dict)


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True,
                        help="a .safetensors, .npz or .pth file; with --to_timm, a workdir or converted directory")
    parser.add_argument("--to", required=True, help="new directory for the Orbax checkpoint (with --to_timm: a "
                                                    ".safetensors or .npz file)")
    parser.add_argument("--to_timm", action="store_true", help="export our parameters as a timm state dict")
    parser.add_argument("--ema", action="store_true", help="with --to_timm from a workdir: export the moving "
                                                           "average of the weights (config.ema.decay > 0)")
    parser.add_argument("--family", default="vit", help=f"model family: one of {models.FAMILIES}")
    parser.add_argument("--variant", help="the family's variant, e.g. B/16 (ViT) or T/4 (Swin), or a timm model "
                                          "name (deit3_base_patch16_224); ViT reads it from the weights if left out")
    parser.add_argument("--image_size", type=int, help="image size the weights will be used at (ViT: default the "
                                                       "size they were made for)")
    parser.add_argument("--num_classes", type=int, help="keep the head only if it has this many classes")
    args = parser.parse_args(argv)
    if os.path.exists(args.to):
        sys.exit(f"{args.to} exists; pick a new {'file' if args.to_timm else 'directory'} for the converted weights.")
    if args.to_timm:
        count = export_timm(args.source, args.to, args.family, ema=args.ema)
        print(f"Wrote {count} tensors in timm's names to {args.to}.")
        return
    family = models.get(args.family)
    if not hasattr(family, "from_timm"):
        sys.exit(f"model family {args.family!r} has no timm mapping (from_timm).")
    variables = _as_variables(family, family.from_timm(read_weights(args.source), variant=args.variant,
                                                       image_size=args.image_size, num_classes=args.num_classes))
    save_variables(variables, args.to)
    params = variables["params"]
    count = sum(v.size for v in flatten(params).values())
    print(f"Wrote {args.family} parameters ({count / 1e6:.2f}M{'' if 'head' in params else ', no head'}) "
          f"to {args.to}; use it with --config.init_from={args.to}")


if __name__ == "__main__":
    main()
