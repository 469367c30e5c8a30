"""A TFDS data set of real JPEGs with one truncated image: reported by its index, or skipped."""
import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from masksub_jax import train
from masksub_jax.data import types
from tests.conftest import tiny_digits_config

NUM_EXAMPLES, CORRUPT_INDEX = 12, 5


class CorruptJpegs(tfds.core.GeneratorBasedBuilder):
    """12 random JPEGs of varying size, 3 classes; example 5 of each split is cut to a third."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(), "validation": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(NUM_EXAMPLES):
            data = tf.io.encode_jpeg(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).numpy()
            if i == CORRUPT_INDEX:
                data = data[:len(data) // 3]
            yield i, {"image": io.BytesIO(data), "label": i % 3}


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("jpegs"))
    CorruptJpegs(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _split_by_decodability(data_dir, split):
    """(indices of the images TensorFlow cannot decode, labels of the others), one by one in order."""
    records = CorruptJpegs(data_dir=data_dir).as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    bad, good_labels = [], []
    for index in range(len(records)):
        example = records[index]
        try:
            tf.io.decode_jpeg(example["image"])
            good_labels.append(int(example["label"]))
        except tf.errors.InvalidArgumentError:
            bad.append(index)
    return bad, good_labels


def _corrupt_index(data_dir, split):
    bad, _ = _split_by_decodability(data_dir, split)
    assert len(bad) == 1
    return bad[0]


def _config(data_dir, **overrides):
    return tiny_digits_config(data_dir, total_steps=4, batch_size=8, eval_batch_size=8, log_every_steps=2,
                              checkpoint_every_steps=4, **{"data.source": "tfds", "data.name": "corrupt_jpegs",
                                                           "data.image_size": 16, "data.mean": (0.5,) * 3,
                                                           "data.std": (0.5,) * 3, "model.variant": "mu/8",
                                                           **overrides})


def test_corrupt_image_fails_the_run_naming_its_index(jpeg_dir, tmp_path):
    with pytest.raises(types.CorruptImageError,
                       match=rf"cannot be decoded\) in example\(s\) {_corrupt_index(jpeg_dir, 'train')} "
                             r"of split 'train'.*skip"):
        train.run(_config(jpeg_dir), str(tmp_path))


def test_corrupt_image_is_skipped_with_a_warning_naming_it(jpeg_dir, tmp_path, capfd):
    summary = train.run(_config(jpeg_dir, **{"data.on_corrupt_image": "skip"}), str(tmp_path))
    assert summary["step"] == 4
    assert summary["eval_examples"] == NUM_EXAMPLES - 1  # every good example evaluated once
    err = capfd.readouterr().err
    index = _corrupt_index(jpeg_dir, 'validation')
    assert f"example(s) {index} of split 'validation' of 'corrupt_jpegs' - skipped" in err
    assert f"example(s) {_corrupt_index(jpeg_dir, 'train')} of split 'train' of 'corrupt_jpegs' - skipped" in err


def test_good_examples_all_arrive_in_order_with_their_labels(jpeg_dir):
    """The per-example error check keeps every good example, once, in the split's order."""
    from masksub_jax.data import tfds_source
    source = tfds_source.TfdsSource(_config(jpeg_dir, **{"data.on_corrupt_image": "skip"}))
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in source.eval_batches()])
    np.testing.assert_array_equal(labels, _split_by_decodability(jpeg_dir, "validation")[1])
    assert len(labels) == NUM_EXAMPLES - 1
