"""A generated TFDS data set of real JPEGs, for tests and the input benchmark (no download).

  generated_jpegs/tiny            24 train + 10 validation images of 40-71 x 48-63 px, 3 classes
  generated_jpegs/imagenet_like   256 + 64 images of 375-500 x 333-500 px (ImageNet's typical
                                  shapes), 10 classes, ~105 KB per JPEG (ImageNet's train set: ~110 KB)

Images are smooth random colour fields with pixel noise (so JPEGs are as costly to decode as
photos'), written in the array_record format that `tfds_source` reads by index.
"""
import io

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
            shape = (int(rng.integers(*c.heights)), int(rng.integers(*c.widths)))
            field = tf.image.resize(rng.uniform(0, 255, (6, 6, 3)), shape, method="bicubic").numpy()
            image = np.clip(field + rng.normal(0, 28, shape + (3,)), 0, 255).astype(np.uint8)
            yield i, {"image": io.BytesIO(tf.io.encode_jpeg(image, quality=90).numpy()), "label": i % c.num_classes}


def prepare(config_name: str, data_dir: str) -> str:
    """Builds generated_jpegs/`config_name` in `data_dir` (once); returns the TFDS name to use."""
    GeneratedJpegs(config=config_name, data_dir=data_dir, file_format="array_record").download_and_prepare()
    return f"generated_jpegs/{config_name}"
