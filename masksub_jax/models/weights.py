"""What the families' timm mappings share: parameter trees as flat "a/b/c" names and back, and the
error for weights that do not fit."""
import numpy as np


class ConversionError(ValueError):
    """The weights do not fit the model, or are not in a layout we know."""


def nest(flat: dict) -> dict:
    tree = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree, prefix="") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def listed(names, limit: int = 8) -> str:
    names = sorted(names)
    return f"{names[:limit]}{' ...' if len(names) > limit else ''}"


def linear_to_ours(name: str, array: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> Flax Dense (in, out); conv (D, C, p, p) -> (p, p, C, D)."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if name.endswith("kernel") else array


def linear_to_timm(name: str, array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array.T if name.endswith("kernel") else array
