"""Datasets as in-memory arrays: read once through `tfds.data_source`, split, checked, then put on the device.

The whole of each split lives on the device; an epoch permutes indices into it, so nothing here runs per batch.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys

import ml_collections
import numpy as np

from jaxepochs.data import lock, tfds_read
from jaxepochs.data import rows as rows_lib
from jaxepochs.data.checks import check_like_train, check_numeric, check_split  # noqa: F401  (loading's names)
from jaxepochs.data.splits import (  # noqa: F401
    DataError,
    Dataset,
    Split,
    as_batch,
    check_eval_name,
    count,
    eval_splits,
    fold_indices,
    take,
)


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


def _prepare(make, name: str, directory: pathlib.Path, quiet: bool):
    """Builds a built-in dataset in `directory`, one process at a time: a second process that wants it waits,
    then finds it prepared (two preparing at once would collide in TFDS's temporary files)."""
    import tensorflow_datasets as tfds

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data.data_dir {directory} cannot be created ({e.strerror}); point data.data_dir (or $TFDS_DATA_DIR) "
            "at a writable directory."
        ) from None
    with lock.wait_for(directory / f".{name}.prepare.lock", f"preparing {name} in {directory}", quiet):
        builder = make()  # afresh: the process it waited for may have prepared it
        if not builder.is_prepared():
            if not quiet:
                which = f" ({builder.builder_config.name})" if builder.builder_config else ""
                print(f"jaxepochs: preparing {name}{which} in {directory} (once)", file=sys.stderr)
            tfds.disable_progress_bar()
            builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def _no_leftover_metadata_dirs():
    """TFDS makes a temporary directory each time it makes the builder of a dataset not prepared yet (for metadata
    from its GCS bucket, which is off here: it stays empty) and leaves it behind; a first run left two or three in
    the user's temporary directory, and each variant of a dataset more. Those it makes meanwhile are removed when
    empty (os.rmdir removes nothing else)."""
    from tensorflow_datasets.core import dataset_info

    real, made = dataset_info.tempfile, []

    class Recording:
        def __getattr__(self, attribute):
            return getattr(real, attribute)

        def mkdtemp(self, *args, **kwargs):
            made.append(real.mkdtemp(*args, **kwargs))
            return made[-1]

    dataset_info.tempfile = Recording()
    try:
        yield
    finally:
        dataset_info.tempfile = real
        for path in made:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _builder(name: str, directory: pathlib.Path, quiet: bool = False, data_config=None):
    with _no_leftover_metadata_dirs():
        return _make_builder(name, directory, quiet, data_config)


def _make_builder(name: str, directory: pathlib.Path, quiet: bool = False, data_config=None):
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
        make = lambda: datasets.BUILTIN[name](data_dir=str(directory), file_format="array_record", **kwargs)
        with _absl_quiet():
            builder = make()
            if not builder.is_prepared():  # built locally, once: nothing is downloaded
                builder = _prepare(make, name, directory, quiet)
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


def add_label_noise(split: Split, fraction: float, num_classes: int, seed: int) -> Split:
    """Redraws each label with probability `fraction`, uniformly over the classes (it may land on itself), as
    the MNIST-1D double-descent notebook does; seeded, so every run of a config sees the same noisy labels."""
    if fraction == 0:
        return split
    rng = np.random.default_rng([seed, 0x6E6F6973])  # a stream apart from the validation split's
    redraw_n = rng.random(split.y.shape[0]) < fraction
    y = np.where(redraw_n, rng.integers(0, num_classes, split.y.shape[0]), split.y).astype(np.int32)
    return Split(split.x, y, split.extra)


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Holds out round(fraction * N) training examples (at least 1 if fraction > 0), chosen by `seed`."""
    n = count(train)
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * n)))
    if n_val >= n:
        raise DataError(f"data.validation_fraction={fraction} leaves no training examples out of {n}.")
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return take(train, train_idx), take(train, val_idx)


def num_outputs(task: str, splits: list[Split], num_classes: int = 0) -> int:
    """Classification: the classes (`num_classes`, or the largest label + 1); else the targets per example."""
    single = isinstance(splits[0].y, np.ndarray)
    if task == "classification" or (task == "custom" and single and splits[0].y.ndim == 1 and
                                    np.issubdtype(splits[0].y.dtype, np.integer)):  # fmt: skip
        return num_classes or max(int(split.y.max()) + 1 for split in splits if split.y.size)
    if not single:  # a custom task's pytree of labels: the model's outputs are the module's to choose
        return num_classes
    return int(np.prod(splits[0].y.shape[1:], dtype=int))


def _finish(config, name: str, full_train: Split, test: Split, val: Split | None, num_classes: int) -> Dataset:
    """Checks the splits against the task, adds label noise (classification) and holds out validation."""
    d, task = config.data, config.task
    check_split(full_train, num_classes, f"{name} training split", task)
    check_split(test, num_classes, f"{name} test split", task)
    if val is not None:
        check_split(val, num_classes, f"{name} validation split", task)
    if task == "classification":
        full_train = add_label_noise(full_train, d.label_noise, num_classes, d.split_seed)
    train, held_out = (
        (full_train, val) if val is not None else split_validation(full_train, d.validation_fraction, d.split_seed)
    )
    return Dataset(name, train, held_out, test, num_classes)


def from_arrays(config: ml_collections.ConfigDict, splits, where: str, name: str = "") -> Dataset:
    """A dataset of in-memory splits (an experiment module's get_data): {"train": batch, "test": batch} and
    optionally "validation", each {"x": array or pytree, "y": array}; `where` names their source in errors,
    `name` the dataset in the outputs."""
    if not isinstance(splits, dict) or not {"train", "test"} <= set(splits):
        keys = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
        raise DataError(
            f'{where} returned {keys}; return {{"train": batch, "test": batch}}, optionally "validation" and more '
            'evaluation sets by name ("shifted": batch), each batch a dict {"x": inputs, "y": labels} of arrays '
            "with one leading example axis."
        )
    eval_names = sorted(set(splits) - {"train", "test", "validation"})
    for eval_name in eval_names:
        check_eval_name(eval_name, where)
    parts = {}
    custom = config.task == "custom"
    for split_name, batch in splits.items():  # not `name`: that is the dataset's, in every message and output
        more = set(batch) - {"x", "y"} if isinstance(batch, dict) else set()
        if not isinstance(batch, dict) or not {"x", "y"} <= set(batch) or (more - {"weight"} and not custom):
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise DataError(
                f'{where}: split "{split_name}" is {keys}; give a dict with "x" (inputs) and "y" (labels), and '
                'optionally "weight" (a sample weight); other keys reach your hooks when the module defines loss_fn.'
            )
        x = _as_arrays(batch["x"])
        y = _as_arrays(batch["y"]) if custom else np.asarray(batch["y"])
        extra = {key: _as_arrays(batch[key]) for key in sorted(more)} or None
        check_numeric(x, y, where, split_name, extra)
        if not custom:
            y = y.astype(np.int32) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
        parts[split_name] = Split(x, y, extra)
    check_like_train(parts, where)
    full_train, test, val = parts["train"], parts["test"], parts.get("validation")
    present = [split for split in (full_train, test, val) if split is not None]
    for label, split in parts.items():
        if count(split) == 0:
            raise DataError(f'{where}: split "{label}" is empty; every split needs examples.')
    num_classes = num_outputs(config.task, present, config.model.num_classes)
    dataset = _finish(config, where, full_train, test, val, num_classes)
    for eval_name in eval_names:
        check_split(parts[eval_name], num_classes, f'{where} evaluation set "{eval_name}"', config.task)
    return dataset._replace(name=name or where, evals={n: parts[n] for n in eval_names})


def _as_arrays(x):
    import jax

    def as_array(a):
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating):
            return a.astype(np.float32)
        return a.astype(np.int32) if np.issubdtype(a.dtype, np.integer) else a

    return jax.tree.map(as_array, x)


def as_streamed(dataset: Dataset) -> Dataset:
    """An in-memory dataset whose splits are read a chunk at a time, as a streamed one is (get_data's arrays larger
    than the device)."""
    import jax

    rows = lambda split: Split(jax.tree.map(rows_lib.Rows, split.x), split.y)
    evals = {name: rows(split) for name, split in dataset.evals.items()}
    return dataset._replace(
        train=rows(dataset.train), val=rows(dataset.val), test=rows(dataset.test), evals=evals, streamed=True
    )


def _feature_keys(d, builder) -> tuple[str, str]:
    """The input and label features: data.input_key and data.label_key, else the dataset's supervised keys."""
    keys = builder.info.supervised_keys or ()
    return d.input_key or (keys[0] if len(keys) == 2 else ""), d.label_key or (keys[1] if len(keys) == 2 else "")


def estimated_bytes(config: ml_collections.ConfigDict, quiet: bool = False) -> int:
    """The bytes the dataset of `config.data` takes as the trainer's arrays (float32 or int32 inputs and labels),
    from its TFDS metadata: nothing is read. Prepares a built-in dataset first."""
    d = config.data
    builder = _builder(d.name, data_dir(d), quiet, d)
    per_example = tfds_read.example_bytes(builder, _feature_keys(d, builder))
    examples = sum(
        builder.info.splits[s].num_examples for s in (d.train_split, d.test_split) if s in builder.info.splits
    )
    return per_example * examples


def load_dataset(config: ml_collections.ConfigDict, quiet: bool = False, streamed: bool = False) -> Dataset:
    """Reads `config.data` into checked train/val/test arrays; `config.model.num_classes` 0 means the dataset's.
    `streamed`: the splits' inputs are Rows on the host's disk (data/rows.py), read a chunk at a time."""
    d = config.data
    builder = _builder(d.name, data_dir(d), quiet, d)
    x_key, y_key = _feature_keys(d, builder)
    features = list(builder.info.features)
    for key, what in ((x_key, "input"), (y_key, "label")):
        if key not in features:
            raise DataError(
                f"Dataset {d.name} has no {what} feature {key!r}; its features are {features}. Set data.input_key "
                "and data.label_key."
            )
    read = (lambda split: tfds_read.rows_split(builder, split, x_key, y_key, quiet)) if streamed else (
        lambda split: tfds_read.read_split(builder, split, x_key, y_key, quiet))  # fmt: skip
    full_train, test = read(d.train_split), read(d.test_split)
    evals = {name: read(source) for name, source in eval_splits(d.eval_splits, d.name, builder.info.splits)}
    label_feature = builder.info.features[y_key]
    classes = getattr(label_feature, "num_classes", None) if config.task == "classification" else None
    num_classes = config.model.num_classes or classes or num_outputs(config.task, [full_train, test])
    for name, split in evals.items():
        check_split(split, num_classes, f'{d.name} evaluation set "{name}"', config.task)
    return _finish(config, d.name, full_train, test, None, num_classes)._replace(streamed=streamed, evals=evals)
