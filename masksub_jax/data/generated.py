"""Generated data sets of real JPEGs, for tests and the input benchmark (no download).

  generated_jpegs/tiny            24 train + 10 validation images of 40-71 x 48-63 px, 3 classes
  generated_jpegs/imagenet_like   256 + 64 images of 375-500 x 333-500 px (ImageNet's typical
                                  shapes), 10 classes, ~105 KB per JPEG (ImageNet's train set: ~110 KB)

Images are smooth random colour fields with pixel noise (so JPEGs are as costly to decode as
photos'), written in the array_record format that `tfds_source` reads by index. `image_folder`
writes the same kind of images as an image-folder tree (ROOT/<split>/<class>/*), each class's
images tinted by a colour of its own so that a model can learn them.
"""
import io
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


class GeneratedJpegsConfig(tfds.core.BuilderConfig):
    def __init__(self, *, num_train: int, num_eval: int, heights: tuple[int, int], widths: tuple[int, int],
                 num_classes: int, **kwargs):
        super().__init__(version="1.0.0", **kwargs)
        self.num_train, self.num_eval, self.num_classes = num_train, num_eval, num_classes
        self.heights, self.widths = heights, widths


class GeneratedJpegs(tfds.core.GeneratorBasedBuilder):
    """Seeded random JPEGs; example i has label i % num_classes."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        GeneratedJpegsConfig(name="tiny", num_train=24, num_eval=10, heights=(40, 72), widths=(48, 64), num_classes=3),
        GeneratedJpegsConfig(name="imagenet_like", num_train=256, num_eval=64, heights=(375, 501),
                             widths=(333, 501), num_classes=10),
    ]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_classes)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {"train": self._generate_examples(c.num_train, seed=0),
                "validation": self._generate_examples(c.num_eval, seed=1)}

    def _generate_examples(self, count: int, seed: int):
        c = self.builder_config
        rng = np.random.default_rng(seed)
        for i in range(count):
            image = _colour_field(rng, c.heights, c.widths)
            yield i, {"image": io.BytesIO(tf.io.encode_jpeg(image, quality=90).numpy()), "label": i % c.num_classes}


def _colour_field(rng, heights, widths, tint=None) -> np.ndarray:
    """A smooth random colour field of random size with pixel noise (uint8), mixed with `tint`."""
    shape = (int(rng.integers(*heights)), int(rng.integers(*widths)))
    field = tf.image.resize(rng.uniform(0, 255, (6, 6, 3)), shape, method="bicubic").numpy()
    if tint is not None:
        field = 0.4 * field + 0.6 * tint
    return np.clip(field + rng.normal(0, 28, shape + (3,)), 0, 255).astype(np.uint8)


def image_folder(root: str, *, num_classes: int = 10, per_class: dict | None = None, heights=(40, 72),
                 widths=(48, 64), png_every: int = 5, seed: int = 0) -> str:
    """Writes ROOT/<split>/class_<k>/<split>_<i>.JPEG (every `png_every`-th image a .png) with
    `per_class[split]` images per class (default 20 train, 4 val); returns ROOT."""
    per_class = per_class or {"train": 20, "val": 4}
    rng = np.random.default_rng(seed)
    tints = rng.uniform(0, 255, (num_classes, 3))
    for split, count in per_class.items():
        for k in range(num_classes):
            folder = os.path.join(root, split, f"class_{k:02d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = _colour_field(rng, heights, widths, tints[k])
                png = png_every and i % png_every == png_every - 1
                data = tf.io.encode_png(image) if png else tf.io.encode_jpeg(image, quality=90)
                with open(os.path.join(folder, f"{split}_{i:04d}.{'png' if png else 'JPEG'}"), "wb") as f:
                    f.write(data.numpy())
    return root


def prepare(config_name: str, data_dir: str) -> str:
    """Builds generated_jpegs/`config_name` in `data_dir` (once); returns the TFDS name to use."""
    GeneratedJpegs(config=config_name, data_dir=data_dir, file_format="array_record").download_and_prepare()
    return f"generated_jpegs/{config_name}"
