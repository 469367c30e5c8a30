"""Each preprocessing op against an independent expectation: PIL (what timm and DeiT-III run), scipy,
or numpy arithmetic; the random ops against the ranges their recipe defines."""
import math

import jax
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from masksub_jax.augment import erasing, host
from masksub_jax.augment.spec import BLUR_SIGMA_RANGE, FILL, GRAY_WEIGHTS, Spec, parse
from masksub_jax.data import crop

SEEDS = [tf.constant([7, i], tf.int64) for i in range(40)]


def _diff(ours, theirs):
    return np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int))


# ------------------------------------------------------------------------------------------------
# Crops, resizing, flip.

def test_crop_window_keeps_torchvision_area_and_ratio_bounds():
    for seed in SEEDS:
        top, left, h, w = (int(v) for v in crop.crop_window(seed, 300, 400))
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.08 * 0.97 <= h * w / (300 * 400) <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_crop_window_falls_back_to_a_centred_crop_of_clamped_ratio():
    """A 10x400 image fits no draw of ratio <= 4/3 and area >= 8%: centred crop, width 4/3 * 10."""
    top, left, h, w = (int(v) for v in crop.crop_window(SEEDS[0], 10, 400))
    assert (top, h, w) == (0, 10, 13) and left == (400 - 13) // 2


def test_jpeg_crop_decodes_the_same_pixels_as_decode_then_crop(photo):
    """Decoding only the window differs only along its edge (chroma upsampling sees no neighbours)."""
    data = tf.io.encode_jpeg(photo, quality=95)
    for seed in SEEDS[:5]:
        a = crop.random_resized_crop(data, seed, size=32, is_jpeg=True)
        b = crop.random_resized_crop(data, seed, size=32, is_jpeg=False)
        assert a.shape == (32, 32, 3) and a.dtype == tf.uint8
        diff = _diff(a, b)
        assert diff.mean() < 0.5 and diff[3:-3, 3:-3].max() <= 2


@pytest.mark.smoke
def test_bicubic_resize_matches_pil(photo):
    assert _diff(host.to_uint8(host.resize(photo, (30, 40))),
                 Image.fromarray(photo).resize((40, 30), Image.BICUBIC)).max() <= 1


def test_eval_resize_and_centre_crop_is_timms(photo):
    """crop_ratio 0.875 at 32 px: shorter side to floor(32 / 0.875) = 36, centre 32x32."""
    out = crop.resize_and_centre_crop(tf.io.encode_png(photo), size=32, crop_ratio=0.875)
    resized = Image.fromarray(photo).resize((48, 36), Image.BICUBIC)  # 80 * 36 / 60 = 48
    expected = np.asarray(resized)[2:34, 8:40]
    assert out.shape == (32, 32, 3) and _diff(out, expected).max() <= 1


def test_flip_is_identity_or_mirror_and_both_happen(photo):
    outcomes = set()
    for seed in SEEDS[:20]:
        out = crop.flip(photo, seed).numpy()
        outcomes.add("same" if np.array_equal(out, photo) else "mirror" if np.array_equal(out, photo[:, ::-1]) else "?")
    assert outcomes == {"same", "mirror"}


# ------------------------------------------------------------------------------------------------
# 3-Augment.

def test_grayscale_has_three_equal_luma_channels(photo):
    out = host.grayscale(photo).numpy()
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert _diff(out[..., 0], Image.fromarray(photo).convert("L")).max() <= 1


def test_solarize_inverts_from_the_threshold_up():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    np.testing.assert_array_equal(host.solarize(x), np.where(x >= 128, 255 - x, x))


@pytest.mark.smoke
def test_gaussian_blur_matches_scipy_and_pil(photo):
    for sigma in (0.1, 1.3, 2.0):
        expected = scipy.ndimage.gaussian_filter(photo.astype(np.float64), (sigma, sigma, 0), mode="reflect",
                                                 truncate=6 / sigma)
        assert _diff(host.gaussian_blur(photo, sigma), np.round(expected)).max() <= 1
    pil_blur = Image.fromarray(photo).filter(ImageFilter.GaussianBlur(1.3))
    assert _diff(host.gaussian_blur(photo, 1.3), pil_blur).mean() < 0.5


def test_colour_adjustments_match_torchvision_formulas(photo):
    x = photo.astype(np.float64)
    gray = x @ np.array(GRAY_WEIGHTS)
    rounded = lambda v: np.clip(np.round(v), 0, 255)  # noqa: E731
    assert _diff(host.adjust_brightness(photo, 1.3), rounded(1.3 * x)).max() <= 1
    assert _diff(host.adjust_contrast(photo, 0.7), rounded(0.7 * x + 0.3 * gray.mean())).max() <= 1
    assert _diff(host.adjust_saturation(photo, 1.2), rounded(1.2 * x - 0.2 * gray[..., None])).max() <= 1


def test_colour_jitter_is_seeded_and_bounded(photo):
    a, b = host.color_jitter(photo, SEEDS[0], 0.3), host.color_jitter(photo, SEEDS[0], 0.3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, host.color_jitter(photo, SEEDS[1], 0.3))
    # Brightness 0.7-1.3 alone would move the mean by at most 30%; all three keep it within ~(0.7^2, 1.3^2).
    ratios = [host.color_jitter(photo, s, 0.3).numpy().mean() / photo.mean() for s in SEEDS[:10]]
    assert 0.45 < min(ratios) and max(ratios) < 1.75


def test_three_augment_applies_exactly_one_of_its_three_ops(photo):
    kinds = []
    for seed in SEEDS[:24]:
        out = host.three_augment(photo, seed, jitter=0.0).numpy()
        if np.array_equal(out, host.grayscale(photo).numpy()):
            kinds.append("grayscale")
        elif np.array_equal(out, host.solarize(photo).numpy()):
            kinds.append("solarize")
        else:  # a blur: smoother than the input, within the radius range
            blurs = [host.gaussian_blur(photo, s).numpy() for s in BLUR_SIGMA_RANGE]
            def roughness(a):
                return np.abs(np.diff(a.astype(int), axis=1)).mean()
            assert roughness(blurs[1]) - 0.05 <= roughness(out) < roughness(blurs[0]) + 1e-9
            kinds.append("blur")
    assert set(kinds) == {"grayscale", "solarize", "blur"}


# ------------------------------------------------------------------------------------------------
# RandAugment.

def test_randaugment_specs_parse_as_timm_reads_them():
    assert parse("rand-m9-mstd0.5-inc1") == Spec(magnitude=9, magnitude_std=0.5, increasing=True)
    assert parse("rand-m7-mstd0.5") == Spec(magnitude=7, magnitude_std=0.5)
    assert parse("rand-m9-n3-p1.0-mmax12").num_layers == 3
    assert parse("rand-m9-inc1").ops[4] == "PosterizeIncreasing" and parse("rand-m9").ops[4] == "Posterize"
    for bad, message in (("rand-n2", "no magnitude"), ("rand-m9-x3", "unknown option 'x3'"),
                         ("auto-m9", "must look like"),
                         ("rand-m11", "0 <= m <= mmax")):
        with pytest.raises(ValueError, match=message):
            parse(bad)


PIL_OPS = {  # name: (our argument, what PIL does with it), at timm's magnitude-to-argument mapping
    "AutoContrast": (0, ImageOps.autocontrast),
    "Equalize": (0, ImageOps.equalize),
    "Invert": (0, ImageOps.invert),
    "Posterize": (2.0, lambda img: ImageOps.posterize(img, 2)),
    "Solarize": (100.0, lambda img: ImageOps.solarize(img, 100)),
    "SolarizeAdd": (60.0, lambda img: img.point([min(255, i + 60) if i < 128 else i for i in range(256)] * 3)),
    "Color": (1.7, lambda img: ImageEnhance.Color(img).enhance(1.7)),
    "Contrast": (0.4, lambda img: ImageEnhance.Contrast(img).enhance(0.4)),
    "Brightness": (1.5, lambda img: ImageEnhance.Brightness(img).enhance(1.5)),
    "Sharpness": (1.9, lambda img: ImageEnhance.Sharpness(img).enhance(1.9)),
    "TranslateXRel": (0.3, lambda img: img.transform(img.size, Image.AFFINE, (1, 0, 24, 0, 1, 0), fillcolor=FILL)),
    "TranslateYRel": (-0.3, lambda img: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, -18), fillcolor=FILL)),
}


@pytest.mark.parametrize("name", sorted(PIL_OPS))
@pytest.mark.smoke
def test_randaugment_op_matches_pil(name, photo):
    argument, pil_op = PIL_OPS[name]
    op = host.OP_TABLE[name][0]
    assert _diff(op(photo, argument), pil_op(Image.fromarray(photo))).max() <= 1


@pytest.mark.parametrize("name,argument,matrix", [
    ("Rotate", 20.0, None), ("ShearX", 0.2, (1, 0.2, 0, 0, 1, 0)), ("ShearY", -0.2, (1, 0, 0, -0.2, 1, 0))])
def test_randaugment_geometric_op_matches_pil_bilinear(name, argument, matrix, photo):
    assert_matches_pil_bilinear(host.OP_TABLE[name][0](photo, argument), photo, argument, matrix)


def assert_matches_pil_bilinear(ours, photo, argument, matrix):
    """PIL's bilinear rotation by `argument` degrees (matrix None) or affine `matrix`. Interpolation at
    the image border differs (PIL and TF treat the edge pixel apart); inside it agrees."""
    pil = Image.fromarray(photo)
    expected = (pil.rotate(argument, resample=Image.BILINEAR, fillcolor=FILL) if matrix is None else
                pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL))
    diff = _diff(ours, expected)
    assert diff.mean() < 1.0 and (diff <= 1).mean() > 0.95


def test_magnitude_to_argument_maps_are_timms():
    arg = lambda name, m, sign=1.0: float(host.OP_TABLE[name][1](tf.constant(m), tf.constant(sign)))  # noqa: E731
    assert arg("Rotate", 10.0, -1.0) == -30.0 and arg("ShearX", 5.0) == pytest.approx(0.15)
    assert arg("TranslateXRel", 10.0) == pytest.approx(0.45)
    assert arg("Posterize", 9.0) == 3 and arg("PosterizeIncreasing", 9.0) == 1
    assert arg("Solarize", 9.0) == 230 and arg("SolarizeIncreasing", 9.0) == 26 and arg("SolarizeAdd", 9.0) == 99
    assert arg("Color", 9.0) == pytest.approx(1.72) and arg("ColorIncreasing", 9.0, -1.0) == pytest.approx(0.19)


def test_magnitude_noise_has_the_spec_mean_std_and_clip():
    spec = parse("rand-m9-mstd0.5")
    m = np.array([float(host.noisy_magnitude(spec, tf.constant([3, i], tf.int64))) for i in range(400)])
    assert abs(m.mean() - 9) < 0.08 and abs(m.std() - 0.5) < 0.08 and m.max() <= 10.0
    assert float(host.noisy_magnitude(parse("rand-m10-mstd3"), SEEDS[0])) <= 10.0
    assert float(host.noisy_magnitude(parse("rand-m9"), SEEDS[0])) == 9.0


def test_rand_augment_applies_each_chosen_op_with_its_probability(photo):
    """n=1, m=9: the output is the input (skipped, p = 0.5) or one op of the set at magnitude 9."""
    spec = parse("rand-m9-n1-inc1")
    candidates = [np.asarray(host.apply_op(name, photo, 9.0, sign)) for name in spec.ops for sign in (1.0, -1.0)]
    skipped = 0
    for seed in SEEDS:
        out = np.asarray(host.rand_augment(photo, seed, spec))
        if np.array_equal(out, photo):
            skipped += 1
        else:
            assert any(np.array_equal(out, c) for c in candidates)
    assert 10 <= skipped <= 30  # Binomial(40, 0.5), and a few ops can leave the image as it was


# ------------------------------------------------------------------------------------------------
# Random erasing (on the device).

def test_random_erasing_fills_one_box_of_timms_size_with_noise():
    images = jax.numpy.full((64, 32, 32, 3), 5.0)
    out = np.asarray(erasing.random_erasing(jax.random.PRNGKey(0), images, prob=1.0))
    erased = (out != 5.0).any(-1)
    fractions = erased.mean((1, 2))
    assert (fractions > 0).all()
    assert fractions.min() >= 0.015 and fractions.max() <= 1 / 3 + 0.03
    for mask in erased[:8]:  # one axis-aligned box
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask.sum() == len(rows) * len(cols) and np.ptp(rows) + 1 == len(rows)
    noise = out[(out != 5.0)]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_random_erasing_probability():
    images = jax.numpy.zeros((400, 16, 16, 1)) + 5.0
    out = np.asarray(erasing.random_erasing(jax.random.PRNGKey(1), images, prob=0.25))
    assert abs((out != 5.0).any((1, 2, 3)).mean() - 0.25) < 0.07
    assert erasing.random_erasing(jax.random.PRNGKey(1), images, prob=0.0) is images


def test_erase_box_area_and_aspect_ranges():
    boxes = jax.vmap(lambda r: erasing.erase_box(r, 224, 224))(jax.random.split(jax.random.PRNGKey(2), 500))
    found, _, _, h, w = (np.asarray(b) for b in boxes)
    area = (h * w / 224**2)[found]
    assert found.mean() > 0.99 and area.min() >= 0.018 and area.max() <= 1 / 3 + 0.01
    aspect = (h / w)[found]
    assert aspect.min() >= 0.3 * 0.9 and aspect.max() <= 1 / 0.3 * 1.1
    assert math.isclose(np.median(np.log(aspect)), 0, abs_tol=0.15)
