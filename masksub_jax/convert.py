"""ViT weights in and out: timm / DeiT-III / MAE / augreg state dicts <-> our Flax parameters.

  python -m masksub_jax.convert --from=deit3_base.safetensors --to=inits/deit3_b --variant=B/16 --image_size=224
  python -m masksub_jax.main --config=configs/vit_b.py --workdir=runs/ft --config.init_from=inits/deit3_b

`--from` takes .safetensors, .npz (NumPy arrays only, never pickles) or .pth / .bin (read with
`torch.load(weights_only=True)`, which needs torch installed and refuses pickled code). `--to` gets
an Orbax checkpoint of the parameters that `config.init_from` names. Layouts handled:
  - DeiT-III (timm deit3_*): pos_embed without a cls slot, LayerScale `ls1.gamma` / `ls2.gamma`.
  - MAE and augreg ViTs: pos_embed with a cls slot (folded into our cls token, which is exact since the
    slot is only ever added to it) and no LayerScale (our gammas are set to 1).
A different image size resamples pos_embed as timm does (bicubic, antialiased, PyTorch's kernel).
A head whose class count differs, or a model without head, keeps the config's freshly initialised head.
"""
import os
import re
import sys

import numpy as np

from masksub_jax.models import vit

# Our name -> (timm name, conversion to ours). Linear weights are (out, in) in torch, (in, out) here.
_BLOCK = {
    "norm1/scale": "norm1.weight", "norm1/bias": "norm1.bias",
    "norm2/scale": "norm2.weight", "norm2/bias": "norm2.bias",
    "attn/qkv/kernel": "attn.qkv.weight", "attn/qkv/bias": "attn.qkv.bias",
    "attn/proj/kernel": "attn.proj.weight", "attn/proj/bias": "attn.proj.bias",
    "mlp/fc1/kernel": "mlp.fc1.weight", "mlp/fc1/bias": "mlp.fc1.bias",
    "mlp/fc2/kernel": "mlp.fc2.weight", "mlp/fc2/bias": "mlp.fc2.bias",
    "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma",
}
_TOP = {"norm/scale": "norm.weight", "norm/bias": "norm.bias", "head/kernel": "head.weight",
        "head/bias": "head.bias", "patch_embed/kernel": "patch_embed.proj.weight",
        "patch_embed/bias": "patch_embed.proj.bias", "cls_token": "cls_token", "pos_embed": "pos_embed"}
# Keys of timm checkpoints that carry no parameters of this architecture and are dropped silently.
_IGNORED = re.compile(r"^(pos_drop|patch_drop|norm_pre|fc_norm)\.|\.num_batches_tracked$")


class ConversionError(ValueError):
    """The weights do not fit the variant, or are not in a layout we know."""


def _to_ours(ours_name: str, array: np.ndarray) -> np.ndarray:
    if ours_name == "patch_embed/kernel":
        return array.transpose(2, 3, 1, 0)  # (D, C, p, p) -> (p, p, C, D)
    if ours_name.endswith("kernel"):
        return array.T
    return array


def _to_timm(ours_name: str, array: np.ndarray) -> np.ndarray:
    if ours_name == "patch_embed/kernel":
        return array.transpose(3, 2, 0, 1)
    if ours_name.endswith("kernel"):
        return array.T
    return array


def _names(depth: int) -> dict[str, str]:
    names = dict(_TOP)
    for i in range(depth):
        names.update({f"blocks_{i}/{ours}": f"blocks.{i}.{theirs}" for ours, theirs in _BLOCK.items()})
    return names


def _antialiased_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of PyTorch's `interpolate(mode='bicubic', antialias=True)` along one
    axis (PIL's filter, a = -0.5, window truncated at the borders and renormalised)."""
    def cubic(x, a=-0.5):
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0
    scale = size_in / size_out
    support = 2.0 * max(scale, 1.0)
    inv_scale = 1.0 / scale if scale > 1.0 else 1.0
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size_in)
        weights = np.array([cubic((j - centre + 0.5) * inv_scale) for j in range(lo, hi)])
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix


def resize_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
    """(1, g*g, D) patch position embeddings resampled to (1, grid*grid, D), as timm does."""
    old = int(round(np.sqrt(pos_embed.shape[1])))
    if old * old != pos_embed.shape[1]:
        raise ConversionError(f"pos_embed has {pos_embed.shape[1]} patch positions, not a square grid.")
    if old == grid:
        return pos_embed
    m = _antialiased_bicubic_matrix(old, grid)
    table = pos_embed.reshape(old, old, -1).astype(np.float64)
    resized = np.einsum("ia,jb,abd->ijd", m, m, table)
    return resized.reshape(1, grid * grid, -1).astype(pos_embed.dtype)


def load_timm_vit(state_dict, *, variant: str, img_size: int, num_classes: int | None = None) -> dict:
    """A timm ViT / DeiT-III / MAE / augreg state dict (name -> array) as our parameter tree.

    The head is left out when the checkpoint has none or `num_classes` differs from it; the trainer
    then keeps its freshly initialised head. Raises ConversionError naming missing, unexpected and
    misshapen keys.
    """
    width, depth, _, patch = vit.parse_variant(variant)
    sd = {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not _IGNORED.search(k)}
    if "fc_norm.weight" in state_dict or "fc_norm.bias" in state_dict:
        raise ConversionError("This checkpoint pools tokens with fc_norm (global pooling); our ViT reads the "
                              "cls token. Use a cls-token checkpoint (DeiT-III, MAE pretraining, augreg).")
    names = _names(depth)
    has_layerscale = "blocks.0.ls1.gamma" in sd
    has_head = "head.weight" in sd and (num_classes is None or sd["head.weight"].shape[0] == num_classes)
    expected = {theirs for ours, theirs in names.items()
                if (has_layerscale or not ours.startswith("blocks_") or "gamma" not in ours)
                and (has_head or not ours.startswith("head/"))}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected - ({"head.weight", "head.bias"} if not has_head else set()))
    if missing or unexpected:
        raise ConversionError(f"The checkpoint does not fit ViT-{variant}: missing keys {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}. Check --variant (width {width}, "
                              f"depth {depth}, patch {patch}).")
    params = {}
    for ours, theirs in names.items():
        if ours.startswith("head/") and not has_head:
            continue
        if theirs not in sd:
            if "gamma" in ours:  # no LayerScale: a gamma of 1 is the identity
                params[ours] = np.ones(width, np.float32)
            continue
        params[ours] = _to_ours(ours, sd[theirs]).astype(np.float32)

    pos, cls = params["pos_embed"], params["cls_token"]
    grid = img_size // patch
    if pos.shape[1] == int(round(np.sqrt(pos.shape[1] - 1))) ** 2 + 1:  # a cls slot (MAE, augreg)
        params["cls_token"] = cls + pos[:, :1]
        pos = pos[:, 1:]
    params["pos_embed"] = resize_pos_embed(pos, grid)
    wanted = _expected_shapes(width, depth, patch, params.get("patch_embed/kernel", np.zeros((1, 1, 3))).shape[2],
                              params.get("head/kernel", np.zeros((1, 0))).shape[1], grid)
    wrong = [f"{k}: {params[k].shape} (ViT-{variant} wants {s})" for k, s in wanted.items()
             if k in params and params[k].shape != s]
    if wrong:
        raise ConversionError(f"Shapes do not fit ViT-{variant}: {'; '.join(wrong[:6])}.")
    return _nest(params)


def _expected_shapes(width, depth, patch, channels, num_classes, grid) -> dict[str, tuple]:
    shapes = {"patch_embed/kernel": (patch, patch, channels, width), "patch_embed/bias": (width,),
              "cls_token": (1, 1, width), "pos_embed": (1, grid * grid, width), "norm/scale": (width,),
              "norm/bias": (width,), "head/kernel": (width, num_classes), "head/bias": (num_classes,)}
    block = {"norm1/scale": (width,), "norm1/bias": (width,), "norm2/scale": (width,), "norm2/bias": (width,),
             "attn/qkv/kernel": (width, 3 * width), "attn/qkv/bias": (3 * width,),
             "attn/proj/kernel": (width, width), "attn/proj/bias": (width,),
             "mlp/fc1/kernel": (width, 4 * width), "mlp/fc1/bias": (4 * width,),
             "mlp/fc2/kernel": (4 * width, width), "mlp/fc2/bias": (width,), "gamma_1": (width,), "gamma_2": (width,)}
    for i in range(depth):
        shapes.update({f"blocks_{i}/{k}": v for k, v in block.items()})
    return shapes


def _nest(flat: dict) -> dict:
    tree = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree, prefix="") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def export_timm_vit(params) -> dict[str, np.ndarray]:
    """Our parameters as a timm DeiT-III state dict (`timm.create_model('deit3_...')` loads it with
    `load_state_dict`; pos_embed without a cls slot)."""
    flat = _flatten(params)
    depth = len({k.split("/")[0] for k in flat if k.startswith("blocks_")})
    names = _names(depth)
    unknown = sorted(set(flat) - set(names))
    if unknown:
        raise ConversionError(f"Not parameters of our ViT: {unknown[:8]}.")
    return {names[k]: np.ascontiguousarray(_to_timm(k, v)) for k, v in flat.items()}


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


def adapt_params(loaded: dict, initial: dict, *, say=print) -> dict:
    """`loaded` fitted onto the freshly initialised `initial` (same tree): pos_embed resampled to the
    new grid, the head kept from `initial` when `loaded` has none or one of another shape. Any other
    difference is an error naming the parameters."""
    flat_loaded, flat_initial = _flatten(loaded), _flatten(initial)
    out, problems = {}, []
    for name, init_value in flat_initial.items():
        value = flat_loaded.get(name)
        if name == "pos_embed" and value is not None and value.shape != init_value.shape:
            value = resize_pos_embed(value, int(round(np.sqrt(init_value.shape[1]))))
            say(f"init_from: resampled pos_embed from {flat_loaded[name].shape} to {value.shape}.")
        if name.startswith("head/") and (value is None or value.shape != init_value.shape):
            say(f"init_from: {name} {None if value is None else value.shape} does not fit "
                f"{init_value.shape}; it starts freshly initialised.")
            value = init_value
        if value is None or value.shape != init_value.shape:
            problems.append(f"{name}: {None if value is None else value.shape} vs the config's {init_value.shape}")
            continue
        out[name] = np.asarray(value, init_value.dtype)
    extra = sorted(set(flat_loaded) - set(flat_initial))
    if problems or extra:
        raise ConversionError(f"config.init_from does not fit the configured model: {'; '.join(problems[:6])}"
                              f"{'; unexpected ' + str(extra[:6]) if extra else ''}. Check model.variant.")
    return _nest(out)


def main(argv=None) -> None:
    import argparse  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True, help=".safetensors, .npz or .pth file")
    parser.add_argument("--to", required=True, help="new directory for the Orbax checkpoint")
    parser.add_argument("--variant", required=True, help="our ViT variant, e.g. B/16")
    parser.add_argument("--image_size", type=int, required=True, help="image size the weights will be used at")
    parser.add_argument("--num_classes", type=int, help="keep the head only if it has this many classes")
    args = parser.parse_args(argv)
    if os.path.exists(args.to):
        sys.exit(f"{args.to} exists; pick a new directory for the converted weights.")
    params = load_timm_vit(read_weights(args.source), variant=args.variant, img_size=args.image_size,
                           num_classes=args.num_classes)
    save_params(params, args.to)
    count = sum(v.size for v in _flatten(params).values())
    print(f"Wrote ViT-{args.variant} parameters ({count / 1e6:.2f}M{'' if 'head' in params else ', no head'}) "
          f"to {args.to}; use it with --config.init_from={args.to}")


if __name__ == "__main__":
    main()
