"""scikit-learn's 8x8 handwritten digits as a local TFDS data set: the embedded default, no download.

1797 grey images of 10 classes; every sixth image (index % 6 == 0) is the test split (300), the rest
train (1497). Pixel values 0..16 are scaled to 0..255 uint8.
"""
import numpy as np
import tensorflow_datasets as tfds

TEST_EVERY = 6


class Digits(tfds.core.GeneratorBasedBuilder):
    """sklearn.datasets.load_digits as TFDS (train 1497, test 300)."""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships inside scikit-learn
        return {"train": self._generate_examples(test=False), "test": self._generate_examples(test=True)}

    def _generate_examples(self, test: bool):
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        for index, (image, label) in enumerate(zip(images, digits.target)):
            if (index % TEST_EVERY == 0) == test:
                yield index, {"image": image, "label": int(label)}


def builder(data_dir: str | None = None) -> Digits:
    """The digits builder, prepared in `data_dir` (TFDS default if None) on first use."""
    digits = Digits(data_dir=data_dir)
    if not digits.is_prepared():
        digits.download_and_prepare()
    return digits
