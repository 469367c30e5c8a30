"""timm weights in and out: timm state dicts <-> our Flax parameters, for any family with a timm mapping.

  python -m masksub_jax.convert --from=deit3_base.safetensors --to=inits/deit3_b --variant=B/16 --image_size=224
  python -m masksub_jax.convert --family=swin --from=swin_tiny.pth --to=inits/swin_t --variant=T/4 --image_size=224
  python -m masksub_jax.main --config=configs/vit_b.py --workdir=runs/ft --config.init_from=inits/deit3_b

`--from` takes .safetensors, .npz (NumPy arrays only, never pickles) or .pth / .bin (read with
`torch.load(weights_only=True)`, which needs torch installed and refuses pickled code). `--to` gets
an Orbax checkpoint of the parameters that `config.init_from` names. The layouts each family reads
are in its module (`from_timm`): ViT takes DeiT-III, MAE and augreg weights and resamples pos_embed to
another image size; Swin takes timm's and the original (Microsoft / augsub) layout.
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
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
        return load_file(path)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch  # pylint: disable=import-outside-toplevel
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


def save_params(params, directory: str) -> None:
    """Writes a parameter tree as the Orbax checkpoint that `config.init_from` reads."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    from masksub_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    ocp.PyTreeCheckpointer().save(str(workdir_lib.path(directory)), {"params": params})


def read_params(path: str) -> dict:
    """The parameters that `config.init_from` names: a directory written by this module's CLI, or a
    training workdir (its newest checkpoint). NumPy arrays."""
    from masksub_jax import checkpoint, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    if (workdir_lib.path(path) / "checkpoints").exists():
        return checkpoint.load_params(path)
    try:
        return checkpoint.params_from(str(workdir_lib.path(path)))
    except Exception as e:  # pylint: disable=broad-except
        raise FileNotFoundError(
            f"config.init_from={path!r} is neither a training workdir nor weights written by "
            f"`python -m masksub_jax.convert` ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None


def _same_shape(name, loaded, initial, say):  # pylint: disable=unused-argument
    return loaded if loaded.shape == initial.shape else None


def adapt_params(loaded: dict, initial: dict, *, family: str = "vit", say=print) -> dict:
    """`loaded` fitted onto the freshly initialised `initial` (same tree) by the family's `adapt`
    (ViT resamples pos_embed); the head, and what the family marks as its own to start fresh (Swin's
    mask_token), kept from `initial` when `loaded` has none or one of another shape. Any other
    difference is an error naming the parameters."""
    family_module = models.get(family)
    adapt = getattr(family_module, "adapt", _same_shape)
    fresh_ok = ("head/",) + tuple(getattr(family_module, "FRESH_IF_MISSING", ()))
    flat_loaded, flat_initial = flatten(loaded), flatten(initial)
    out, problems = {}, []
    for name, init_value in flat_initial.items():
        value = flat_loaded.get(name)
        if value is not None:
            value = adapt(name, value, init_value, say)
        if value is None and name.startswith(fresh_ok):
            got = flat_loaded[name].shape if name in flat_loaded else None
            say(f"init_from: {name} {got} does not fit {init_value.shape}; it starts freshly initialised.")
            value = init_value
        if value is None:
            got = flat_loaded[name].shape if name in flat_loaded else None
            problems.append(f"{name}: {got} vs the config's {init_value.shape}")
            continue
        out[name] = np.asarray(value, init_value.dtype)
    extra = set(flat_loaded) - set(flat_initial)
    if problems or extra:
        raise ConversionError(f"config.init_from does not fit the configured model: {'; '.join(problems[:6])}"
                              f"{'; unexpected ' + listed(extra, 6) if extra else ''}. Check model.family "
                              "and model.variant.")
    return nest(out)


def main(argv=None) -> None:
    import argparse  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True, help=".safetensors, .npz or .pth file")
    parser.add_argument("--to", required=True, help="new directory for the Orbax checkpoint")
    parser.add_argument("--family", default="vit", help=f"model family: one of {models.FAMILIES}")
    parser.add_argument("--variant", required=True, help="the family's variant, e.g. B/16 (ViT) or T/4 (Swin)")
    parser.add_argument("--image_size", type=int, required=True, help="image size the weights will be used at")
    parser.add_argument("--num_classes", type=int, help="keep the head only if it has this many classes")
    args = parser.parse_args(argv)
    if os.path.exists(args.to):
        sys.exit(f"{args.to} exists; pick a new directory for the converted weights.")
    family = models.get(args.family)
    if not hasattr(family, "from_timm"):
        sys.exit(f"model family {args.family!r} has no timm mapping (from_timm).")
    params = family.from_timm(read_weights(args.source), variant=args.variant, image_size=args.image_size,
                              num_classes=args.num_classes)
    save_params(params, args.to)
    count = sum(v.size for v in flatten(params).values())
    print(f"Wrote {args.family} {args.variant} parameters ({count / 1e6:.2f}M{'' if 'head' in params else ', no head'}) "
          f"to {args.to}; use it with --config.init_from={args.to}")


if __name__ == "__main__":
    main()
