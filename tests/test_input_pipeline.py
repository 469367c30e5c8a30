"""The TFDS input pipeline on generated real JPEGs and on mocked imagenet2012: batches, order,
repeated augmentation, process shards, exact resumption, eval coverage, and its errors."""
import io
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from masksub_jax import config as config_lib
from masksub_jax.data import crop, generated, indexed, pipeline, prepare, tfds_source, types
from tests.conftest import mock_imagenet

NUM_TRAIN, NUM_EVAL = 24, 10  # generated_jpegs/tiny


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("generated"))
    generated.prepare("tiny", data_dir)
    return data_dir


def _config(data_dir, **overrides):
    c = config_lib.base()
    c.data.name, c.data.data_dir, c.data.image_size = "generated_jpegs/tiny", data_dir, 16
    c.model.variant = "mu/8"
    c.batch_size, c.eval_batch_size = 12, 8
    config_lib.override(c, overrides)
    config_lib.validate(c)
    return c


def _source(data_dir, process_index=0, process_count=1, **overrides):
    return tfds_source.TfdsSource(_config(data_dir, **overrides), process_index, process_count)


def _take(batches, count):
    return [next(batches) for _ in range(count)]


def _indices(source, step):
    return source.train_request(step)["index"].numpy()


@pytest.mark.parametrize("recipe", ["3augment", "rand-m9-mstd0.5-inc1", "rand-m7-mstd0.5", "crop_flip"])
@pytest.mark.smoke
def test_train_batches_have_the_configured_shape_dtype_and_labels(jpeg_dir, recipe):
    source = _source(jpeg_dir, **{"data.augment": recipe})
    for batch in _take(source.train_batches(), 2):
        assert batch["image"].shape == (12, 16, 16, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
        assert 0 < batch["image"].std()  # real pixels, not zeros


def _labels_by_index(data_dir, split):
    """Labels in the order of the data set's files (TFDS shuffles at generation), read by TFDS itself."""
    records = tfds.builder("generated_jpegs/tiny", data_dir=data_dir).as_data_source(split)
    return np.array([records[i]["label"] for i in range(len(records))])


def test_labels_are_those_of_the_requested_examples(jpeg_dir):
    source, labels = _source(jpeg_dir), _labels_by_index(jpeg_dir, "train")
    for step, batch in enumerate(_take(source.train_batches(), 3)):
        np.testing.assert_array_equal(batch["label"], labels[_indices(source, step)])


def test_each_epoch_is_a_seeded_permutation_repeated_three_times(jpeg_dir):
    """B=12, N=24: 2 steps per epoch of 24 positions = 8 distinct images, each 3 times; a new order
    each epoch and each seed."""
    source = _source(jpeg_dir)
    layout = indexed.batch_layout(12, 3)
    epochs = []
    for epoch in range(3):
        stream = np.empty(24, np.int64)
        for q in range(2):  # batch slot -> stream position
            stream[q * 12 + layout] = _indices(source, 2 * epoch + q)
        np.testing.assert_array_equal(stream[0::3], stream[1::3])  # consecutive copies
        np.testing.assert_array_equal(stream[0::3], stream[2::3])
        assert len(set(stream[0::3])) == 8
        epochs.append(stream[0::3])
    assert len({tuple(e) for e in epochs}) == 3
    assert not np.array_equal(_indices(_source(jpeg_dir, seed=1), 0), _indices(source, 0))
    no_repeats = _source(jpeg_dir, **{"data.repeated_aug": 1})
    one_epoch = np.concatenate([_indices(no_repeats, 0), _indices(no_repeats, 1)])
    np.testing.assert_array_equal(np.sort(one_epoch), np.arange(24))


def test_copies_of_an_image_land_on_different_device_shards_with_different_augmentations(jpeg_dir):
    source = _source(jpeg_dir)
    index, batch = _indices(source, 0), next(source.train_batches())
    for shards in (3, 4, 6, 12):  # contiguous device shards of 12 / shards examples
        shard_of = np.arange(12) // (12 // shards)
        for example in set(index):
            copies = np.flatnonzero(index == example)
            assert len(set(shard_of[copies])) == len(copies), (shards, copies)
            images = batch["image"][copies]
            assert not np.array_equal(images[0], images[1])


def test_processes_read_their_slices_of_the_same_global_batch(jpeg_dir):
    """Two processes: disjoint slices whose concatenation is the one-process batch, pixel for pixel."""
    one = _take(_source(jpeg_dir).train_batches(), 2)
    two = [_take(_source(jpeg_dir, p, 2).train_batches(), 2) for p in range(2)]
    for step in range(2):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([two[0][step][key], two[1][step][key]]), one[step][key])
    no_repeats = [_source(jpeg_dir, p, 2, **{"data.repeated_aug": 1}) for p in range(2)]
    for step in range(2):  # without repeated augmentation, each example of an epoch is read by one process
        assert not set(_indices(no_repeats[0], step)) & set(_indices(no_repeats[1], step))
    assert not set(np.concatenate([_indices(no_repeats[0], s) for s in range(2)])) & set(
        np.concatenate([_indices(no_repeats[1], s) for s in range(2)]))


def test_resumed_iteration_equals_uninterrupted_iteration(jpeg_dir):
    """Started at step 3 (mid-epoch 1): the same batches as steps 3-5 of a run from step 0."""
    source = _source(jpeg_dir, **{"data.augment": "rand-m9-mstd0.5-inc1"})
    uninterrupted = _take(source.train_batches(0), 6)
    resumed = _take(_source(jpeg_dir, **{"data.augment": "rand-m9-mstd0.5-inc1"}).train_batches(3), 3)
    for a, b in zip(uninterrupted[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(uninterrupted[0]["image"], uninterrupted[2]["image"])  # new epoch, new draws


def _eval_batches_per_process(data_dir, process_count):
    return [list(_source(data_dir, p, process_count).eval_batches()) for p in range(process_count)]


def test_eval_covers_each_example_once_across_two_processes(jpeg_dir):
    """10 examples, eval batch 8 over 2 processes (4 each): 5 per process in 2 padded batches."""
    per_process = _eval_batches_per_process(jpeg_dir, 2)
    assert [len(b) for b in per_process] == [2, 2]
    labels = []
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (4, 16, 16, 3) and batch["mask"].shape == (4,)
            labels += list(batch["label"][batch["mask"] > 0])
    assert sum(b["mask"].sum() for batches in per_process for b in batches) == NUM_EVAL
    np.testing.assert_array_equal(labels, _labels_by_index(jpeg_dir, "validation"))  # each example once, in order
    single = list(_source(jpeg_dir).eval_batches())
    images = np.concatenate([b["image"][b["mask"] > 0] for batches in per_process for b in batches])
    np.testing.assert_array_equal(images, np.concatenate([b["image"][b["mask"] > 0] for b in single]))


def test_a_small_eval_set_is_not_padded_out_to_a_large_eval_batch(jpeg_dir):
    """10 eval examples, eval batch 1024 on 4 devices: one batch of 12 (10 rounded up to 4), not 1024."""
    tfds_batches = list(tfds_source.TfdsSource(_config(jpeg_dir, eval_batch_size=1024), batch_multiple=4)
                        .eval_batches())
    assert [b["label"].shape for b in tfds_batches] == [(12,)] and tfds_batches[0]["mask"].sum() == NUM_EVAL
    images = np.zeros((300, 8, 8, 1), np.uint8)
    digits_like = pipeline.ArraySource((images, np.zeros(300, np.int32)), (images, np.arange(300) % 10),
                                       num_classes=10, seed=0, batch_size=64, eval_batch_size=1024, batch_multiple=8)
    assert [len(b["label"]) for b in digits_like.eval_batches()] == [304]
    assert types.capped_eval_batch_size(256, 1000, 8) == 256  # a large eval set keeps the configured batch


def test_eval_preprocessing_is_the_centre_crop_of_the_resized_image(jpeg_dir):
    records = tfds.builder("generated_jpegs/tiny", data_dir=jpeg_dir).as_data_source(
        "validation", decoders={"image": tfds.decode.SkipDecoding()})
    expected = crop.resize_and_centre_crop(records[0]["image"], size=16, crop_ratio=1.0)
    np.testing.assert_array_equal(next(_source(jpeg_dir).eval_batches())["image"][0], expected)


def test_mocked_imagenet2012():
    """Mocked imagenet2012 through the DeiT-III recipe at 32 px, train and eval."""
    c = config_lib.base()
    c.data.image_size, c.model.variant, c.batch_size, c.eval_batch_size = 32, "mu/8", 8, 8
    with mock_imagenet(num_examples=20):
        source = tfds_source.TfdsSource(c)
        assert (source.num_classes, source.num_train_examples) == (1000, 20)
        batch = next(source.train_batches())
        evals = list(source.eval_batches())
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
    assert [b["mask"].sum() for b in evals] == [8, 8, 4]


def test_unprepared_and_tfrecord_data_sets_name_the_prepare_command(tmp_path, jpeg_dir):
    with pytest.raises(types.DataNotFoundError, match=r"not prepared .*python -m masksub_jax.data.prepare "
                                                         r"--name=generated_jpegs/tiny.*without the data, "
                                                         r"train on generated images: --config.data.source=synthetic"):
        _source(str(tmp_path / "empty"))
    generated.GeneratedJpegs(config="tiny", data_dir=str(tmp_path / "tfrecord")).download_and_prepare()
    with pytest.raises(tfds_source.DataFormatError, match=r"stored as tfrecord.*masksub_jax.data.prepare"):
        _source(str(tmp_path / "tfrecord"))
    with pytest.raises(types.DataNotFoundError, match=r"split 'nope'.*\['train', 'validation'\]"):
        _source(jpeg_dir, **{"data.eval_split": "nope"})


@pytest.mark.smoke
def test_prepare_builds_array_record_once(tmp_path):
    data_dir = str(tmp_path)
    assert "Prepared" in prepare.prepare("generated_jpegs/tiny", data_dir)
    assert "Nothing to do" in prepare.prepare("generated_jpegs/tiny", data_dir)
    assert _source(data_dir).num_train_examples == NUM_TRAIN


def test_corrupt_examples_in_training_are_replaced_within_their_batch(jpeg_dir, monkeypatch):
    """on_corrupt_image=skip: a failed slot gets a copy of a good example of the same batch, so the
    other examples of that batch and every later batch are unchanged."""
    source = _source(jpeg_dir, **{"data.on_corrupt_image": "skip"})
    clean = _take(source.train_batches(), 2)
    broken = int(_indices(source, 0)[0])
    original = tfds_source._read

    features = tfds.builder("generated_jpegs/tiny", data_dir=jpeg_dir).info.features

    def read_with_one_truncated(records, index):
        out = original(records, index)
        for i in np.flatnonzero(index == broken):
            example = features.deserialize_example_np(out[i], decoders={"image": tfds.decode.SkipDecoding()})
            example["image"] = io.BytesIO(example["image"][:len(example["image"]) // 3])
            out[i] = features.serialize_example(example)
        return out
    monkeypatch.setattr(tfds_source, "_read", read_with_one_truncated)
    dirty = _take(_source(jpeg_dir, **{"data.on_corrupt_image": "skip"}).train_batches(), 2)
    bad = _indices(source, 0) == broken
    assert bad.sum() == 3
    np.testing.assert_array_equal(dirty[0]["image"][~bad], clean[0]["image"][~bad])
    for image, label in zip(dirty[0]["image"][bad], dirty[0]["label"][bad]):
        donors = [j for j in np.flatnonzero(~bad) if np.array_equal(clean[0]["image"][j], image)]
        assert donors and clean[0]["label"][donors[0]] == label
    np.testing.assert_array_equal(dirty[1]["image"], clean[1]["image"])
    with pytest.raises(types.CorruptImageError, match=rf"example\(s\) {broken} of split 'train'"):
        next(_source(jpeg_dir).train_batches())


def test_the_pipeline_reads_a_bounded_number_of_batches_ahead(jpeg_dir):
    """No cache and no shuffle buffer: having handed out k batches, the pipeline has read at most a
    few batches more, and stops there until more are taken."""
    reads = []
    original = tfds_source._read

    def counting(records, index):
        reads.append(len(index))
        return original(records, index)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds_source, "_read", counting)
        batches = _source(jpeg_dir).train_batches()
        for taken in range(1, 4):
            next(batches)
            assert _settled(reads) <= taken + 2 * indexed.STEPS_IN_FLIGHT + 2


def _settled(reads, quiet_s=0.5, limit_s=20):
    """len(reads) once it has not changed for `quiet_s`."""
    count, deadline = -1, time.time() + limit_s
    while len(reads) != count and time.time() < deadline:
        count = len(reads)
        time.sleep(quiet_s)
    assert len(reads) == count, "the pipeline kept reading ahead"
    return count


def test_prefetch_keeps_order_and_runs_a_fixed_number_ahead():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i
    ahead = pipeline.prefetch(items(), size=2)
    assert produced == []  # nothing before the first request
    taken = []
    for item in ahead:
        taken.append(item)
        assert len(produced) == min(6, len(taken) + 2)
    assert taken == list(range(6))


def test_synthetic_eval_split_has_the_training_classes_templates():
    """A model that learns the training split can score on the eval split: each eval image is nearest
    to the mean training image of its own class (the eval split once drew templates of its own)."""
    from masksub_jax.data.pipeline import synthetic_examples
    size = dict(image_size=8, num_classes=5, channels=3)
    train_images, train_labels = synthetic_examples(200, seed=0, **size)
    eval_images, eval_labels = synthetic_examples(50, seed=0, noise_seed=1, **size)
    assert not np.array_equal(train_images[:50], eval_images)
    means = np.stack([train_images[train_labels == k].mean(0) for k in range(5)]).reshape(5, -1)
    distances = ((eval_images.reshape(50, 1, -1).astype(np.float64) - means) ** 2).sum(-1)
    assert np.mean(distances.argmin(1) == eval_labels) == 1.0
