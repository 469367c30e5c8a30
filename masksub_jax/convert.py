"""timm weights in and out: timm state dicts <-> our Flax parameters, for any family with a timm mapping.

  python -m masksub_jax.convert --from=deit3_base_patch16_224.safetensors --to=inits/deit3_b
  python -m masksub_jax.convert --from=swin_tiny_patch4_window7_224.pth --to=inits/swin_t
  python -m masksub_jax.convert --from=resnet50_a2.safetensors --to=inits/r50
  python -m masksub_jax.convert --from=mae_pretrain_vit_base.pth --to=inits/mae_b
  python -m masksub_jax.convert --to_timm --from=runs/vit_b --to=vit_b.safetensors     # ours -> timm
  python -m masksub_jax.convert --to_timm --ema --from=runs/vit_b --to=vit_b_ema.safetensors  # the EMA weights

The family (ViT, Swin, ResNet), its variant and the image size the weights were made for are read
from the weights' key names and shapes; `--family`, `--variant` and `--image_size` may name them
(one that disagrees with the weights is an error), and `--image_size` resamples ViT's pos_embed. The
command then prints what it found and the `python -m masksub_jax.main` command that trains from the
result (the shipped config that fits, and the overrides it needs). `--to_timm` reads the family and
variant from the workdir's config.json (or the converted directory's masksub_weights.json) and
prints the `timm.create_model(...)` call that loads the file it wrote.

`--from` takes .safetensors, .npz (NumPy arrays only, never pickles) or .pth / .bin (read with
`torch.load(weights_only=True)`, which needs torch installed and refuses pickled code). `--to` gets
an Orbax checkpoint of the variables that `config.init_from` names (the parameters, and ResNet's
BatchNorm statistics). The layouts each family reads are in its module (`from_timm`): ViT takes
DeiT-III, MAE and augreg weights and resamples pos_embed to another image size; Swin takes timm's and
the original (Microsoft / augsub) layout; ResNet timm's (the RSB weights and the official augsub ones).
A head whose class count differs, or a model without head, keeps the config's freshly initialised head.
"""
import os

import numpy as np

from masksub_jax import cli, init_from, models  # cli before anything loads TensorFlow (numpy and jax do not)
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


def save_variables(variables: dict, directory: str, *, family: str | None = None, variant: str | None = None,
                   image_size: int | None = None, config: dict | None = None) -> dict:
    """Writes a model's variables ({"params": ..., and e.g. "batch_stats": ...}) as the Orbax
    checkpoint that `config.init_from` reads, and beside it masksub_weights.json (init_from.METADATA):
    what model they are (for init_from's check and --to_timm; `config`: the config keys the weights
    imply) and each array's fingerprint (checked when they are read). Returns that record."""
    import json

    import orbax.checkpoint as ocp

    from masksub_jax import checkpoint
    from masksub_jax import workdir as workdir_lib
    ocp.PyTreeCheckpointer().save(str(workdir_lib.path(directory)), variables)
    head = variables["params"].get(_classifier(family), {}).get("kernel")
    record = {"family": family, "variant": variant, "image_size": image_size,
              "num_classes": 0 if head is None else int(np.shape(head)[-1]), "config": config or {},
              "fingerprints": checkpoint.fingerprint_record(variables)}
    workdir_lib.write_text(workdir_lib.path(directory) / init_from.METADATA, json.dumps(record, indent=1))
    return record


def save_params(params, directory: str, **model) -> None:
    """`save_variables` of parameters alone; `model`: its family, variant and image_size."""
    save_variables({"params": params}, directory, **model)


def _classifier(family: str | None) -> str:
    """The name of the family's classifier in its parameters (its CLASSIFIER)."""
    return models.classifier(models.get(family)) if family else "head"


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


def read_variables(path: str, *, ema: bool = False, fall_back: bool = True, say=None) -> dict:
    """The variables that `config.init_from` names: a directory written by this module's CLI, or a
    training workdir (its newest intact checkpoint, `say`ing which damaged ones it skipped; with
    `fall_back` False its newest, or an error; with `ema`, its moving average of the weights).
    {"params": ..., and e.g. "batch_stats": ...}, NumPy arrays, checked for NaN / Inf and against the
    checksums written with them (a converted directory's in its init_from.METADATA, where it has one)."""
    from masksub_jax import checkpoint
    from masksub_jax import workdir as workdir_lib
    if (workdir_lib.path(path) / "checkpoints").exists():
        return checkpoint.load_variables(path, ema=ema, fall_back=fall_back, say=say)
    if ema:
        raise FileNotFoundError(f"--ema reads a training workdir's moving average; {path!r} is not a workdir.")
    metadata = init_from.read_metadata(path)
    try:
        variables = checkpoint.variables_from(str(workdir_lib.path(path)))
    except Exception as e:
        if metadata is None:
            raise FileNotFoundError(
                f"config.init_from={path!r} is neither a training workdir nor weights written by "
                f"`python -m masksub_jax.convert` ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
        problem = f"they cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    else:
        problem = checkpoint.damage(variables, (metadata or {}).get("fingerprints"))
    if problem is not None:
        raise checkpoint.DamagedCheckpointError(
            f"The converted weights in {path} are damaged: {problem}. Convert them again: "
            f"`python -m masksub_jax.convert --from=THE_WEIGHT_FILE --to=A_NEW_DIRECTORY`.")
    return variables


def adapt_params(loaded: dict, initial: dict, *, family: str = "vit", say=print) -> dict:
    """`loaded` fitted onto the freshly initialised `initial` (same tree): first by the family's `fit`
    (ViT resamples pos_embed; Swin keeps a fresh mask_token), then the classifier (the family's
    CLASSIFIER, "head") is kept from `initial` when `loaded` has none or one of another shape. Any
    other difference is an error naming the parameters."""
    flat_loaded, flat_initial = flatten(loaded), flatten(initial)
    family_module = models.get(family)
    fit = getattr(family_module, "fit", None)
    if fit is not None:
        flat_loaded = fit(flat_loaded, flat_initial, say)
    head = models.classifier(family_module) + "/"
    out, problems = {}, []
    for name, init_value in flat_initial.items():
        value = flat_loaded.get(name)
        if name.startswith(head) and (value is None or value.shape != init_value.shape):
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
        raise ConversionError(
            f"config.init_from holds no {missing} (it has {sorted(loaded)}): the weights of a model without them, "
            f"not of a {family} model (or {family} weights converted by a version that left them out). Set "
            f"model.family to the weights' family, or convert {family} weights: `python -m masksub_jax.convert "
            f"--family={family} --from=WEIGHT_FILE --to=NEW_DIRECTORY`.")
    return {name: adapt_params(loaded[name], value, family=family, say=say) for name, value in initial.items()}


def detect_family(state_dict: dict, family: str | None = None) -> tuple[str, dict | None]:
    """The family whose key names the weights have, and what they say of themselves (the family's
    `detect`: variant, image size, classes, config keys); `family` (--family) is checked against
    them. Weights of no family we know need their own family named (a module with from_timm)."""
    if family is not None and family not in models.FAMILIES:
        return family, None  # a family of your own: its from_timm checks the weights
    found, unknown_size = {}, {}
    for name in models.FAMILIES:
        detect = getattr(models.get(name), "detect", None)
        try:
            said = detect(state_dict) if detect is not None else None
        except ConversionError as e:  # the family's key names, but none of its variants' shapes
            said, unknown_size[name] = {}, e
        if said is not None:
            found[name] = said
    if family is None:
        if not found:
            raise cli.CommandError(f"The weights are of none of the families {models.FAMILIES}: their keys are "
                                   f"{listed(state_dict, 6)}. For a family of your own, pass --family=MODULE.")
        if len(found) > 1:
            raise cli.CommandError(f"The weights have key names of several families ({sorted(found)}); pass --family.")
        family = next(iter(found))
    elif found and family not in found:
        raise cli.CommandError(f"--family={family}, but these are {sorted(found)[0]} weights (their keys are "
                               f"{listed(state_dict, 4)}); leave out --family to read it from the weights.")
    if family in unknown_size:
        raise unknown_size[family]
    return family, found.get(family)


def matching_config(family: str, wanted: dict) -> tuple[str | None, dict]:
    """The shipped config (configs/NAME.py) that fits the weights best: the family's, with their
    variant, then with most of the other config keys they imply (`wanted`: flat key -> value);
    and the overrides it then needs. (None, wanted) if no config has the family."""
    from masksub_jax import config as config_lib
    from masksub_jax import configs
    best = None
    for name in configs.names():
        flat = dict(config_lib.flatten(configs.get(name)))
        if flat["model.family"] != family:
            continue
        differ = {k: v for k, v in wanted.items() if flat.get(k) != v}
        rank = ("model.variant" not in differ, -len(differ))
        if best is None or rank > best[0]:
            best = (rank, name, differ)
    return (best[1], best[2]) if best else (None, {"model.family": family, **wanted})


def train_command(family: str, model: dict, directory: str) -> str:
    """The `python -m masksub_jax.main` command that starts from the converted `directory`."""
    import shlex
    wanted = {"model.variant": model["variant"], **model.get("config", {})}
    if model.get("image_size"):
        wanted["data.image_size"] = model["image_size"]
    name, overrides = matching_config(family, wanted)
    args = [f"--config={name or 'CONFIG'}", "--workdir=WORKDIR",
            f"--config.init_from={directory}"]
    args += [f"--config.{key}={value}" for key, value in overrides.items()]
    return "python -m masksub_jax.main " + " ".join(shlex.quote(a) for a in args)


def import_timm(source: str, target: str, *, family: str | None = None, variant: str | None = None,
                image_size: int | None = None, num_classes: int | None = None, say=print) -> dict:
    """timm weights (a file) -> an Orbax checkpoint that `config.init_from` reads, with init_from.METADATA.
    The family, variant and image size are the weights' unless given (and checked against them).
    Returns what was written: {"family", "variant", "image_size", "num_classes", "config", "parameters"}."""
    if family is not None:
        _timm_mapping(family, "from_timm")  # before reading the weights
    state_dict = read_weights(source)
    family, found = detect_family(state_dict, family)
    family_module = _timm_mapping(family, "from_timm")
    if found is not None:
        say(f"The weights are {family} {found['variant']}" + (f" at {found['image_size']} px" if found["image_size"]
                                                             else "") + f", {_classes(found['num_classes'])}.")
        for note in found.get("notes", ()):
            say(note)
    variables = _as_variables(family_module, family_module.from_timm(
        state_dict, variant=variant, image_size=image_size, num_classes=num_classes))
    model = {"family": family, "variant": (found or {}).get("variant", variant),
             "image_size": image_size or (found or {}).get("image_size"), "config": (found or {}).get("config", {})}
    written = save_variables(variables, target, family=family, variant=model["variant"],
                             image_size=model["image_size"], config=model["config"])
    return {**model, "num_classes": written["num_classes"],
            "parameters": sum(v.size for v in flatten(variables["params"]).values())}


def _timm_mapping(family: str, function: str):
    """The family's module, which must have `function` (from_timm or to_timm)."""
    family_module = models.get(family)
    if not hasattr(family_module, function):
        raise cli.CommandError(f"Model family {family!r} has no timm mapping ({function}); write one "
                               "(masksub_jax/models/__init__.py) or convert the weights yourself.")
    return family_module


def _classes(num_classes: int) -> str:
    return f"a head of {num_classes} classes" if num_classes else "no head"


def export_timm(source: str, target: str, family: str | None = None, *, ema: bool = False) -> dict:
    """Our weights (a training workdir, with `ema` its moving average, or a converted directory) as a
    timm state dict file (.safetensors or .npz). The family, variant and image size are the ones
    the workdir's config.json or the directory's init_from.METADATA records (`family`, --family, must agree).
    Returns {"family", "variant", "image_size", "num_classes", "tensors", "recorded_in", "timm_model"}
    with timm_model (name, keyword arguments) the `timm.create_model` call that loads the file."""
    if not target.endswith((".safetensors", ".npz")):
        raise cli.CommandError(f"Write the timm weights as .safetensors or .npz, not {target!r}.")
    recorded, recorded_in = init_from.recorded_model(source)
    if recorded is not None and recorded["family"] is None:  # weights saved without their model
        recorded, recorded_in = None, None
    if family and recorded and recorded["family"] != family:
        raise cli.CommandError(f"--family={family}, but {recorded_in} says model.family={recorded['family']!r}; "
                               "leave out --family to use the recorded one.")
    family = family or (recorded or {}).get("family") or "vit"  # older converted directories record nothing
    family_module = _timm_mapping(family, "to_timm")
    try:
        state_dict = family_module.to_timm(_timm_input(family_module, read_variables(source, ema=ema)))
    except ConversionError as e:
        if recorded is not None:
            raise
        raise cli.CommandError(f"{source} records no model family (no config.json or {init_from.METADATA}) and is "
                               f"not a {family} model ({e}); pass --family, one of {models.FAMILIES}.") from None
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)  # as --to=inits/NAME makes inits/
    if target.endswith(".safetensors"):
        from safetensors.numpy import save_file
        # float32 as timm's weights are; ResNet's num_batches_tracked stays a 0-d integer, as timm's
        # buffer is (np.ascontiguousarray would make it 1-d)
        save_file({k: np.array(v, np.float32 if np.issubdtype(np.asarray(v).dtype, np.floating) else None,
                               order="C") for k, v in state_dict.items()}, target)
        _readable_by_all(target)
    else:
        np.savez(target, **state_dict)
    found = family_module.detect(state_dict) if hasattr(family_module, "detect") else None
    model = {"variant": (recorded or {}).get("variant") or (found or {}).get("variant"),
             "image_size": (recorded or {}).get("image_size") or (found or {}).get("image_size"),
             "num_classes": (found or {}).get("num_classes")}
    timm_model = None
    if hasattr(family_module, "timm_model") and model["variant"]:
        timm_model = family_module.timm_model(state_dict, model["variant"], model["image_size"],
                                              (recorded or {}).get("config") or (found or {}).get("config", {}))
    return {"family": family, **model, "tensors": len(state_dict), "recorded_in": recorded_in,
            "timm_model": timm_model}


def _readable_by_all(path: str) -> None:
    """The mode any new file gets (0666 less the umask): safetensors writes through a private (0600)
    temporary file, which others on a shared cluster could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def timm_loading_code(timm_model: tuple[str, dict], num_classes: int, path: str) -> str:
    """Python that builds the timm model and loads the exported file into it (strictly: every key
    and shape must match). timm's checkpoint_path reads .safetensors; an .npz it would take for a
    big_vision JAX file, so that one goes through load_state_dict."""
    import json

    def literal(value):  # Python source, strings in double quotes
        return json.dumps(value) if isinstance(value, str) else repr(value)
    name, kwargs = timm_model
    arguments = [literal(name), "pretrained=False", f"num_classes={num_classes}"]
    arguments += [f"{key}={literal(value)}" for key, value in kwargs.items()]
    file = literal(os.path.abspath(path))
    if path.endswith(".safetensors"):
        return f"import timm\nmodel = timm.create_model({', '.join([*arguments, f'checkpoint_path={file}'])})"
    return (f"import numpy, timm, torch\nmodel = timm.create_model({', '.join(arguments)})\n"
            f"model.load_state_dict({{k: torch.from_numpy(v) for k, v in numpy.load({file}).items()}})")


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
    parser.add_argument("--family", help=f"model family: one of {models.FAMILIES} or your module; read from the "
                                         "weights (with --to_timm: from the workdir's config.json) if left out")
    parser.add_argument("--variant", help="the family's variant, e.g. B/16 (ViT), T/4 (Swin) or 50 (ResNet), or a "
                                          "timm model name (deit3_base_patch16_224); read from the weights if left out")
    parser.add_argument("--image_size", type=int, help="image size the weights will be used at (default: the "
                                                       "size they were made for)")
    parser.add_argument("--num_classes", type=int, help="keep the head only if it has this many classes")
    parser.add_argument("--verbose", action="store_true", help="print an error's traceback too")
    args = parser.parse_args(argv)
    with cli.errors_in_one_line(None, verbose=args.verbose):
        if os.path.exists(args.to):
            raise cli.CommandError(f"--to={args.to} exists; pick a new {'file' if args.to_timm else 'directory'} "
                                   "for the converted weights.")
        if args.to_timm:
            unused = [f"--{k}" for k in ("variant", "image_size", "num_classes") if getattr(args, k) is not None]
            if unused:
                raise cli.CommandError(f"{', '.join(unused)} do not go with --to_timm: the exported model is the one "
                                       "the workdir trained (its config.json).")
            _print_export(export_timm(args.source, args.to, args.family, ema=args.ema), args.to)
        else:
            _print_import(import_timm(args.source, args.to, family=args.family, variant=args.variant,
                                      image_size=args.image_size, num_classes=args.num_classes), args.to)


def _print_import(model: dict, directory: str) -> None:
    size = f" at {model['image_size']} px" if model["image_size"] else ""
    print(f"Wrote {model['family']} {model['variant']}{size} ({model['parameters'] / 1e6:.2f}M parameters, "
          f"{_classes(model['num_classes'])}) to {directory}. Train from it with:\n"
          f"  {train_command(model['family'], model, directory)}")


def _print_export(exported: dict, target: str) -> None:
    size = f" at {exported['image_size']} px" if exported["image_size"] else ""
    where = f", as {exported['recorded_in']} records" if exported["recorded_in"] else ""
    print(f"Wrote {exported['tensors']} tensors in timm's names to {target}: {exported['family']} "
          f"{exported['variant']}{size}, {_classes(exported['num_classes'] or 0)}{where}.")
    if exported["timm_model"] is not None:
        code = timm_loading_code(exported["timm_model"], exported["num_classes"] or 0, target)
        print("Load it in PyTorch with timm:\n  " + code.replace("\n", "\n  "))
    else:
        print(f"timm has no model of {exported['family']} {exported['variant']}'s shape; the file holds its "
              "weights in timm's names.")


if __name__ == "__main__":
    main()
