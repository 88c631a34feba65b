"""Datasets through TFDS: any TFDS dataset by name (with TFDS's mock data), and the built-in builders."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tiny_config
from tensorflow_datasets.testing.mocking import PickableDataSourceMock

import jaxepochs
from jaxepochs.data.loading import DataError, load_dataset
from jaxepochs.host.config import ConfigError

MOCK_EXAMPLES = 50  # per split


class _BatchReadableSourceMock(PickableDataSourceMock):
    """TFDS's mock ArrayRecord source, with a working `__getitems__` (batched reads, as jaxepochs does).

    tfds.testing.mock_data assigns `functools.partial(_getitems, generator=...)` to the mock's `__getitems__`;
    unittest.mock does not treat that name as a magic method, so the partial is called without the source it
    expects as `self`. This property receives the assignment and calls the partial as a method.
    """

    @property
    def __getitems__(self):
        return lambda keys: self._getitems_fn(self, keys)

    @__getitems__.setter
    def __getitems__(self, fn):
        self._getitems_fn = fn


@pytest.fixture(scope="module")
def mnist_metadata(tmp_path_factory):
    """A TFDS data dir holding only the metadata of `mnist` (dataset_info.json, features.json): what
    mock_data needs to treat the dataset as prepared. Built offline from TFDS's own mnist builder."""
    data_dir = tmp_path_factory.mktemp("tfds_metadata")
    builder = tfds.builder("mnist", data_dir=str(data_dir), file_format="array_record")
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[MOCK_EXAMPLES],
                    num_bytes=0,
                    filename_template=tfds.core.naming.ShardedFileTemplate(
                        data_dir=builder.data_path,
                        dataset_name="mnist",
                        split=split,
                        filetype_suffix="array_record",
                    ),
                )
                for split in ("train", "test")
            ]
        )
    )
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    return data_dir


@contextlib.contextmanager
def _mock_tfds(data_dir):
    with tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES,
        data_dir=str(data_dir),
        mock_array_record_data_source=_BatchReadableSourceMock(),
    ):
        yield


def _mnist_config(overrides=None):
    return tiny_config({"data.name": "tfds:mnist", "train.epochs": "1", "train.batch_size": "16", **(overrides or {})})


def test_tfds_images_are_read_as_unit_floats(mnist_metadata):
    with _mock_tfds(mnist_metadata):
        dataset = load_dataset(_mnist_config())
    assert dataset.num_classes == 10
    assert dataset.train.x.shape == (45, 28, 28, 1)  # 10% of 50 held out
    assert dataset.val.x.shape == (5, 28, 28, 1)
    assert dataset.test.x.shape == (MOCK_EXAMPLES, 28, 28, 1)
    for split in dataset[1:4]:
        assert split.x.dtype == np.float32 and split.y.dtype == np.int32
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0
        assert split.y.min() >= 0 and split.y.max() < 10
    assert dataset.train.x.max() > 0.5  # scaled from uint8 pixels, not all zero


def test_any_tfds_dataset_trains_end_to_end(mnist_metadata, tmp_path):
    with _mock_tfds(mnist_metadata):
        result = jaxepochs.train_and_evaluate(_mnist_config(), tmp_path, quiet=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dataset"] == "tfds:mnist"
    sizes = [summary[f"num_{split}_examples"] for split in ("train", "val", "test")]
    assert sizes == [45, 5, 50]
    assert summary["steps_per_epoch"] == 3  # ceil(45 / 16)
    assert summary["num_parameters"] == (28 * 28 * 16 + 16) + (16 * 10 + 10)  # images flattened
    assert np.isfinite(summary["test_loss"])
    assert len(result.history) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert "tensorflow" not in sys.modules  # TFDS is used without TensorFlow


def test_cnn_on_images_is_a_config_error(mnist_metadata, tmp_path):
    config = _mnist_config({"model.name": "cnn"})
    with (
        _mock_tfds(mnist_metadata),
        pytest.raises(ConfigError, match=r"model\.name=cnn cannot take.*\(28, 28, 1\)"),
    ):
        jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)


def test_tfds_input_and_label_keys_name_the_features(mnist_metadata):
    """data.input_key / data.label_key choose the features (the supervised keys by default); a feature the dataset
    lacks is an error that lists its features."""
    with _mock_tfds(mnist_metadata):
        dataset = load_dataset(_mnist_config({"data.input_key": "image", "data.label_key": "label"}))
        assert dataset.train.x.shape == (45, 28, 28, 1)
        with pytest.raises(DataError, match=r"no input feature 'pixels'; its features are \['image', 'label'\]"):
            load_dataset(_mnist_config({"data.input_key": "pixels"}))


def test_no_tensorflow_import():
    assert "tensorflow" not in sys.modules


# --- built-in builders --------------------------------------------------------------------------------------


def test_builtin_datasets_are_prepared_in_the_session_data_dir(tfds_data_dir):
    load_dataset(tiny_config())
    assert os.environ["TFDS_DATA_DIR"] == str(tfds_data_dir)
    assert (tfds_data_dir / "mnist1d" / "default" / "1.0.0" / "dataset_info.json").is_file()


def test_mnist1d_matches_the_mnist1d_package():
    from mnist1d.data import get_dataset_args, make_dataset

    dataset = load_dataset(tiny_config({"data.validation_fraction": "0.0"}))
    assert dataset.train.x.shape == (4000, 40) and dataset.test.x.shape == (1000, 40)
    assert dataset.val.x.shape == (0, 40)
    assert dataset.num_classes == 10

    reference = make_dataset(get_dataset_args())
    np.testing.assert_allclose(dataset.train.x, reference["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dataset.train.y, reference["y"])
    np.testing.assert_allclose(dataset.test.x, reference["x_test"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dataset.test.y, reference["y_test"])


def test_mnist1d_validation_split_is_a_fixed_subset_of_train():
    full = load_dataset(tiny_config({"data.validation_fraction": "0.0"}))
    split = load_dataset(tiny_config())
    assert split.train.x.shape == (3600, 40) and split.val.x.shape == (400, 40)
    # Together they are the training split, each example once.
    together = np.concatenate([split.train.x, split.val.x])
    np.testing.assert_array_equal(
        np.sort(together.view([("", together.dtype)] * 40), axis=0),
        np.sort(full.train.x.view([("", full.train.x.dtype)] * 40), axis=0),
    )
    again = load_dataset(tiny_config({"seed": "5"}))  # the run seed does not move the split
    np.testing.assert_array_equal(again.val.x, split.val.x)
    other = load_dataset(tiny_config({"data.split_seed": "1"}))
    assert not np.array_equal(other.val.x, split.val.x)


def test_digits_80_20_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    dataset = load_dataset(tiny_config({"data.name": "digits", "data.validation_fraction": "0.0"}))
    assert dataset.train.x.shape == (1437, 64) and dataset.test.x.shape == (360, 64)
    assert dataset.train.y.shape[0] + dataset.test.y.shape[0] == 1797
    assert dataset.num_classes == 10
    assert dataset.train.x.min() >= 0.0 and dataset.train.x.max() <= 1.0

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    np.testing.assert_allclose(dataset.train.x, x_train, atol=1e-6)
    np.testing.assert_array_equal(dataset.train.y, y_train)
    np.testing.assert_allclose(dataset.test.x, x_test, atol=1e-6)
    np.testing.assert_array_equal(dataset.test.y, y_test)


def test_a_split_read_once_is_read_again_from_its_decoded_copy(tfds_data_dir, tmp_path, monkeypatch):
    """The first read decodes the split example by example and keeps a decoded copy beside its TFDS files; a later
    process reads that copy (no decoding, the same arrays, bit for bit); a source file that changes makes a new
    copy."""
    import shutil

    from jaxepochs.data import rows as rows_lib
    from jaxepochs.data import tfds_read

    load_dataset(tiny_config({"data.name": "digits"}))  # prepared in the session's data dir
    data_dir = tmp_path / "data"
    shutil.copytree(tfds_data_dir / "digits", data_dir / "digits")
    config = tiny_config({"data.name": "digits", "data.data_dir": str(data_dir)})
    for copy in data_dir.rglob(rows_lib.ROWS_DIR):
        shutil.rmtree(copy)
    monkeypatch.setattr(tfds_read, "_DECODED", {})  # as a new process finds it
    first = load_dataset(config)
    copies = sorted(p.name for p in next(data_dir.rglob(rows_lib.ROWS_DIR)).iterdir() if p.is_dir())
    assert copies == ["test-x-label", "train-x-label"]
    decoded = []
    as_arrays = tfds_read.as_arrays
    monkeypatch.setattr(tfds_read, "as_arrays", lambda *a: decoded.append(1) or as_arrays(*a))
    monkeypatch.setattr(tfds_read, "_DECODED", {})
    again = load_dataset(config)
    assert not decoded
    for a, b in ((first.train.x, again.train.x), (first.train.y, again.train.y), (first.test.x, again.test.x)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    info = next(data_dir.rglob("train-x-label")) / "rows.json"  # a copy of an older format: built again
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "format"}))
    monkeypatch.setattr(tfds_read, "_DECODED", {})
    np.testing.assert_array_equal(load_dataset(config).train.x, first.train.x)
    assert decoded and json.loads(info.read_text())["format"] == rows_lib.ROWS_FORMAT
    decoded.clear()
    record = next(data_dir.rglob("digits-train.array_record*"))
    os.utime(record, ns=(record.stat().st_atime_ns, record.stat().st_mtime_ns + 1))  # prepared again, say
    monkeypatch.setattr(tfds_read, "_DECODED", {})
    np.testing.assert_array_equal(load_dataset(config).train.x, first.train.x)
    assert decoded  # the train split decoded anew


def test_a_data_dir_that_cannot_hold_the_decoded_copy_is_read_as_before(tfds_data_dir, monkeypatch):
    """A full disk (or a shared, read-only TFDS directory): the split is decoded in memory, as it was before the
    decoded copies; the same arrays, and no advice to delete the dataset."""
    from jaxepochs.data import rows as rows_lib
    from jaxepochs.data import tfds_read

    config = tiny_config({"data.name": "digits"})
    expected = load_dataset(config)

    def unwritable(source, directory, *args):  # numpy's memmap on a full disk: an OSError without a filename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rows_lib, "build_tfds_rows", unwritable)
    monkeypatch.setattr(tfds_read, "_DECODED", {})
    again = load_dataset(config)
    np.testing.assert_array_equal(again.train.x, expected.train.x)
    np.testing.assert_array_equal(again.test.y, expected.test.y)
