"""What `config.init_from` may name, checked from the path alone (no array read, no JAX), so that
config.validate refuses a mistake before the data and the devices start; and the record a converted
directory carries beside its weights (METADATA, written by `convert.save_variables`)."""
import json

from masksub_jax import workdir as workdir_lib

METADATA = "masksub_weights.json"  # {"family", "variant", "image_size", "num_classes", "config", "fingerprints"}


def read_metadata(path: str) -> dict | None:
    """A converted directory's METADATA ({"family", "variant", "image_size", "num_classes",
    "fingerprints"}), None where it has none (a directory converted before they were written)."""
    file = workdir_lib.path(path) / METADATA
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); convert the weights again.") from None


WEIGHT_FILES = (".safetensors", ".npz", ".pth", ".pt", ".bin")
TAKES = ("config.init_from takes a training workdir (with checkpoints/) or a directory written by "
         "`python -m masksub_jax.convert --from=WEIGHT_FILE --to=DIRECTORY`")


def check(config, path: str | None = None, *, flag: str = "config.init_from") -> None:
    """config.init_from (or `path`, given as `flag`) names weights that fit the configured model, as
    far as the path says without reading an array (config.validate: before JAX and the data start):
    it exists; a weight file is refused with the command that converts it; a training workdir's
    config.json and a converted directory's METADATA must name the configured family and variant.
    ValueError otherwise."""
    path = path or config.init_from
    where, key = workdir_lib.path(path), f"{flag}={path!r}"
    if not where.exists():
        raise ValueError(f"{key} does not exist. {TAKES}.")
    if not where.is_dir():
        if where.suffix.lower() not in WEIGHT_FILES:
            raise ValueError(f"{key} is a file, not a directory. {TAKES}.")
        name = where.name[:-len(where.suffix)]
        raise ValueError(
            f"{key} is a weight file; convert it first: `python -m masksub_jax.convert "
            f"--family={config.model.family} --variant={config.model.variant} --from={path} --to=inits/{name}`, "
            f"then pass --{flag}=inits/{name}.")
    is_workdir = (where / "checkpoints").is_dir()
    if is_workdir and not any(p.name.isdigit() for p in (where / "checkpoints").iterdir()):
        raise ValueError(f"{key} is a training workdir without a checkpoint; train it first, or name another.")
    recorded, source = recorded_model(path)
    if recorded is not None:
        _check_same_model(config, key, recorded["family"], recorded["variant"], source)
    elif not is_workdir and not (where / "_METADATA").exists():
        raise ValueError(f"{key} is neither a training workdir nor converted weights (it has no checkpoints/, "
                               f"{METADATA} or Orbax _METADATA). {TAKES}.")


# Config keys that converted weights imply (convert's detect) and that change what the model computes.
IMPLIED_KEYS = ("model.pre_norm", "model.act", "model.norm_eps", "model.pool")


def implied_differences(config, path: str) -> list[str]:
    """One line for each key that the converted weights at `path` imply (their METADATA "config":
    e.g. a CLIP tower's QuickGELU) and the config sets otherwise; the config's value is used."""
    if not workdir_lib.path(path).is_dir() or (workdir_lib.path(path) / "checkpoints").is_dir():
        return []  # a weight file (refused elsewhere), or a workdir: its config is the config that trained it
    implied = (read_metadata(path) or {}).get("config") or {}
    return [f"init_from: the weights imply {key}={implied[key]!r}, the config has {_value(config, key)!r}; "
            f"training with the config's (--config.{key}={implied[key]} for the weights')"
            for key in IMPLIED_KEYS if key in implied and _value(config, key) != implied[key]]


def _value(config, key: str):
    section, name = key.split(".")
    return config[section][name]


def recorded_model(path: str) -> tuple[dict, str] | tuple[None, None]:
    """({"family", "variant", "image_size", "config": the model.* keys} as a training workdir's
    config.json or a converted directory's METADATA records them (None, {}: not recorded), that file),
    or (None, None) for neither."""
    where = workdir_lib.path(path)
    if (where / "checkpoints").is_dir():
        record = workdir_lib.started_config(path)
        if record is None:
            return None, None
        return ({"family": record.get("model.family"), "variant": record.get("model.variant"),
                 "image_size": record.get("data.image_size"),
                 "config": {k: v for k, v in record.items() if k.startswith("model.")}}, str(where / "config.json"))
    metadata = read_metadata(path)
    if metadata is None:
        return None, None
    return ({**{k: metadata.get(k) for k in ("family", "variant", "image_size")}, "config": metadata.get("config", {})},
            str(where / METADATA))


def _check_same_model(config, key: str, family: str | None, variant: str | None, source) -> None:
    """The family and variant that `source` records (None: not recorded) are the config's."""
    recorded = {"family": family, "variant": variant}
    differ = {k: v for k, v in recorded.items() if v is not None and v != config.model[k]}
    if differ:
        held = " ".join(v for v in (family, variant) if v)
        ours = ", ".join(f"model.{k}={config.model[k]!r}" for k in differ)
        fix = " ".join(f"--config.model.{k}={v}" for k, v in differ.items())
        raise ValueError(
            f"{key} holds a {held} model ({source}), but the config has "
            f"{ours}. Pass {fix} for that model, or weights of the configured one.")
