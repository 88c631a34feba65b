"""Datasets as in-memory arrays: read once through `tfds.data_source`, split, checked, then put on the device.

The whole of each split lives on the device; an epoch permutes indices into it, so nothing here runs per batch.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from typing import NamedTuple

import ml_collections
import numpy as np


class Split(NamedTuple):
    x: np.ndarray  # float32 [N, *feature_shape]
    y: np.ndarray  # int32 [N]


class Dataset(NamedTuple):
    name: str
    train: Split
    val: Split  # N may be 0 when data.validation_fraction is 0
    test: Split
    num_classes: int


class DataError(ValueError):
    """Data that cannot be trained on; the message says what is wrong and how to fix it."""


def data_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    chosen = config.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return pathlib.Path(chosen).expanduser()


@contextlib.contextmanager
def _absl_quiet():
    """TFDS warns that a freshly generated dataset has no stored metadata yet; that is expected here."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _builder(name: str, directory: pathlib.Path, quiet: bool = False, data_config=None):
    import tensorflow_datasets as tfds

    from jaxepochs.data import datasets

    if name in datasets.BUILTIN:
        kwargs = {}
        if data_config is not None and name == "mnist1d":
            variant = datasets.mnist1d_config(data_config.args.to_dict())
            kwargs["config"] = "default" if variant.name == "default" else variant  # TFDS: a known one by name
        if data_config is not None and name == "modular_addition":
            m = data_config.modular
            variant = datasets.modular_config(m.modulus, m.train_fraction, m.seed)
            known = [c.name for c in datasets.ModularAddition.BUILDER_CONFIGS]
            kwargs["config"] = variant.name if variant.name in known else variant
        with _absl_quiet():
            builder = datasets.BUILTIN[name](data_dir=str(directory), file_format="array_record", **kwargs)
            if not builder.is_prepared():  # built locally, once: nothing is downloaded
                if not quiet:
                    which = f" ({builder.builder_config.name})" if builder.builder_config else ""
                    print(f"jaxepochs: preparing {name}{which} in {directory} (once)", file=sys.stderr)
                tfds.disable_progress_bar()
                builder.download_and_prepare()
        return builder
    if not name.startswith("tfds:"):
        known = ", ".join(sorted(datasets.BUILTIN))
        raise DataError(
            f'Unknown dataset "{name}". Use a built-in one ({known}) or "tfds:<name>" for a TFDS dataset '
            "prepared in the data dir."
        )
    tfds_name = name.removeprefix("tfds:")
    try:
        builder = tfds.builder(tfds_name, data_dir=str(directory))
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f'TFDS has no dataset "{tfds_name}" (from data.name="{name}"): {e}') from None
    if not builder.is_prepared():
        raise DataError(
            f'TFDS dataset "{tfds_name}" is not prepared in {directory}. Prepare it on a machine with internet '
            f"and copy it there: python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}', "
            f"data_dir='{directory}').download_and_prepare(file_format='array_record')\" "
            "(or point data.data_dir / $TFDS_DATA_DIR at a directory that holds it)."
        )
    return builder


def _read_split(builder, split: str, x_key: str, y_key: str) -> Split:
    if split not in builder.info.splits:
        raise DataError(
            f'Dataset {builder.name} has no split "{split}"; it has {sorted(builder.info.splits)}. '
            "Set data.train_split / data.test_split."
        )
    source = builder.as_data_source(split=split)
    if len(source) == 0:
        raise DataError(f'Split "{split}" of {builder.name} is empty; choose a split that holds examples.')
    examples = source.__getitems__(list(range(len(source))))
    x = np.stack([np.asarray(e[x_key]) for e in examples])
    y = np.asarray([e[y_key] for e in examples])
    if x.dtype == np.uint8:  # images: pixels to [0, 1]
        x = x.astype(np.float32) / 255.0
    # Other integer inputs are tokens, kept as int32 for an embedding.
    x = x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)
    return Split(x, y.astype(np.int32))


def check_split(split: Split, num_classes: int, what: str) -> None:
    """Raises DataError for mismatched lengths, non-finite inputs or labels outside [0, num_classes)."""
    if split.x.shape[0] != split.y.shape[0]:
        raise DataError(
            f"{what}: {split.x.shape[0]} inputs but {split.y.shape[0]} labels; every input needs one label."
        )
    if split.y.ndim != 1:
        raise DataError(f"{what}: labels have shape {split.y.shape}; expected integer class ids of shape [N].")
    if split.y.size and (split.y.min() < 0 or split.y.max() >= num_classes):
        raise DataError(
            f"{what}: labels span [{split.y.min()}, {split.y.max()}] but the model has {num_classes} classes "
            f"(valid labels 0..{num_classes - 1}). Set model.num_classes to at least {split.y.max() + 1}, "
            "or fix the labels."
        )
    if not np.isfinite(split.x).all():
        raise DataError(f"{what}: inputs contain NaN or inf; clean the data before training.")


def add_label_noise(split: Split, fraction: float, num_classes: int, seed: int) -> Split:
    """Redraws each label with probability `fraction`, uniformly over the classes (it may land on itself), as
    the MNIST-1D double-descent notebook does; seeded, so every run of a config sees the same noisy labels."""
    if fraction == 0:
        return split
    rng = np.random.default_rng([seed, 0x6E6F6973])  # a stream apart from the validation split's
    redraw_n = rng.random(split.y.shape[0]) < fraction
    y = np.where(redraw_n, rng.integers(0, num_classes, split.y.shape[0]), split.y).astype(np.int32)
    return Split(split.x, y)


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Holds out round(fraction * N) training examples (at least 1 if fraction > 0), chosen by `seed`."""
    n = train.y.shape[0]
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * n)))
    if n_val >= n:
        raise DataError(f"data.validation_fraction={fraction} leaves no training examples out of {n}.")
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return Split(train.x[train_idx], train.y[train_idx]), Split(train.x[val_idx], train.y[val_idx])


def load_dataset(config: ml_collections.ConfigDict, quiet: bool = False) -> Dataset:
    """Reads `config.data` into checked train/val/test arrays; `config.model.num_classes` 0 means the dataset's."""
    d = config.data
    builder = _builder(d.name, data_dir(d), quiet, d)
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2:
        raise DataError(f"Dataset {d.name} has no (input, label) supervised_keys; jaxepochs needs a classifier.")
    x_key, y_key = keys
    full_train = _read_split(builder, d.train_split, x_key, y_key)
    test = _read_split(builder, d.test_split, x_key, y_key)
    label_feature = builder.info.features[y_key]
    dataset_classes = getattr(label_feature, "num_classes", None) or int(full_train.y.max()) + 1
    num_classes = config.model.num_classes or dataset_classes
    check_split(full_train, num_classes, f"{d.name} {d.train_split} split")
    check_split(test, num_classes, f"{d.name} {d.test_split} split")
    full_train = add_label_noise(full_train, d.label_noise, num_classes, d.split_seed)
    train, val = split_validation(full_train, d.validation_fraction, d.split_seed)
    return Dataset(d.name, train, val, test, num_classes)
