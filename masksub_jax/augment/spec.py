"""What a train recipe is, read by both of its implementations (`host.py` in tf.data, `device.py` in
the train step) so that they cannot drift apart: the 3-Augment constants, timm's RandAugment spec
grammar, its op sets and each op's magnitude map, and which part of the per-pixel work runs where.

A RandAugment spec is `rand` then dash-separated options: `m` magnitude (0-10), `n` ops per image
(default 2), `mstd` std of the Gaussian noise added to the magnitude at every application (`inf`:
uniform in [0, m]), `mmax` upper clip of the noisy magnitude (default 10), `p` probability that a
chosen op is applied (default 0.5), `inc1` the "increasing" op set (stronger with magnitude). Each
image draws n ops uniformly with replacement. Geometric ops fill with the ImageNet mean colour
(timm's img_mean). `rand-m9-mstd0.5-inc1` is DeiT-III fine-tuning's, MAE's and Swin's,
`rand-m7-mstd0.5` ResNet RSB's.
"""
import dataclasses
import math
import re

# 3-Augment (DeiT-III): grayscale, solarize or Gaussian blur, then colour jitter.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
BLUR_SIGMA_RANGE = (0.1, 2.0)  # DeiT-III GaussianBlur radius
BLUR_HALF_WIDTH = math.ceil(3 * BLUR_SIGMA_RANGE[1])

# RandAugment (timm).
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM
FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's img_mean

SOURCES = ("tfds", "folder")  # the sources that augment (digits and synthetic are used as they are)


def canvas_size(data_config) -> int:
    """The side of the square the host puts each crop on with the per-pixel ops on the device: crops
    up to it are resized there."""
    return 2 * data_config.image_size


def on_device(data_config) -> bool:
    """Whether the config's per-pixel ops run in the train step rather than on the host."""
    d = data_config
    return d.augment_on == "device" and d.source in SOURCES


@dataclasses.dataclass(frozen=True)
class Spec:
    magnitude: float
    num_layers: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = MAX_LEVEL
    prob: float = 0.5
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS


def parse(spec: str) -> Spec:
    """'rand-m9-mstd0.5-inc1' -> Spec; a ValueError names what is wrong and the grammar."""
    grammar = "'rand-m<magnitude>[-n<ops>][-mstd<std>][-mmax<max>][-p<prob>][-inc<0|1>]', e.g. 'rand-m9-mstd0.5-inc1'"
    parts = spec.split("-")
    if parts[0] != "rand" or len(parts) < 2:
        raise ValueError(f"RandAugment spec {spec!r} must look like {grammar}.")
    values = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(inf|\d+(?:\.\d*)?)", part)
        if not match:
            raise ValueError(f"RandAugment spec {spec!r}: unknown option {part!r}; the grammar is {grammar}.")
        values[match.group(1)] = float(match.group(2))
    if "m" not in values:
        raise ValueError(f"RandAugment spec {spec!r} has no magnitude (m); the grammar is {grammar}.")
    out = Spec(magnitude=values["m"], num_layers=int(values.get("n", 2)), magnitude_std=values.get("mstd", 0.0),
               magnitude_max=values.get("mmax", MAX_LEVEL), prob=values.get("p", 0.5),
               increasing=bool(values.get("inc", 0)))
    if not (0 <= out.magnitude <= out.magnitude_max and out.num_layers >= 1 and 0 < out.prob <= 1):
        raise ValueError(f"RandAugment spec {spec!r}: need 0 <= m <= mmax, n >= 1 and 0 < p <= 1.")
    return out


# ------------------------------------------------------------------------------------------------
# timm's op sets and magnitude -> argument maps (`m` in [0, 10], `sign` = +-1 drawn per application),
# written for a TensorFlow and a JAX float alike.

def _floor(x):
    return x // 1  # floor division: tf.math.floordiv and jnp.floor_divide, exact for x >= 0


def _enhance(m, _):
    return m / MAX_LEVEL * 1.8 + 0.1


def _enhance_increasing(m, sign):
    return 1.0 + sign * m / MAX_LEVEL * 0.9


RANDAUGMENT_OPS = {  # timm's name: (the op's name in host.py and device.py, magnitude, sign -> its argument)
    "AutoContrast": ("auto_contrast", lambda m, s: 0.0 * m),
    "Equalize": ("equalize", lambda m, s: 0.0 * m),
    "Invert": ("invert", lambda m, s: 0.0 * m),
    "Rotate": ("rotate", lambda m, s: s * m / MAX_LEVEL * 30.0),
    "Posterize": ("posterize", lambda m, s: _floor(m / MAX_LEVEL * 4)),
    "PosterizeIncreasing": ("posterize", lambda m, s: 4 - _floor(m / MAX_LEVEL * 4)),
    "Solarize": ("solarize", lambda m, s: _floor(m / MAX_LEVEL * 256)),
    "SolarizeIncreasing": ("solarize", lambda m, s: 256 - _floor(m / MAX_LEVEL * 256)),
    "SolarizeAdd": ("solarize_add", lambda m, s: _floor(m / MAX_LEVEL * 110)),
    "Color": ("color", _enhance),
    "ColorIncreasing": ("color", _enhance_increasing),
    "Contrast": ("contrast", _enhance),
    "ContrastIncreasing": ("contrast", _enhance_increasing),
    "Brightness": ("brightness", _enhance),
    "BrightnessIncreasing": ("brightness", _enhance_increasing),
    "Sharpness": ("sharpness", _enhance),
    "SharpnessIncreasing": ("sharpness", _enhance_increasing),
    "ShearX": ("shear_x", lambda m, s: s * m / MAX_LEVEL * 0.3),
    "ShearY": ("shear_y", lambda m, s: s * m / MAX_LEVEL * 0.3),
    "TranslateXRel": ("translate_x_rel", lambda m, s: s * m / MAX_LEVEL * 0.45),
    "TranslateYRel": ("translate_y_rel", lambda m, s: s * m / MAX_LEVEL * 0.45),
}
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def op_table(ops_by_name: dict) -> dict:
    """{timm's name: (op, magnitude -> argument)} of one implementation, its ops looked up by name
    in `ops_by_name` (the module's globals())."""
    return {name: (ops_by_name[op], to_argument) for name, (op, to_argument) in RANDAUGMENT_OPS.items()}
