"""A TFDS split read as the trainer's arrays (array_record through `tfds.data_source`): decoded in memory, read
from its decoded copy on disk (written once beside the TFDS files), or as Rows a streamed run reads a chunk at a
time. Damaged files raise a DataError that says to prepare the dataset again.
"""

from __future__ import annotations

import contextlib
import os
import pathlib

import numpy as np

from jaxepochs.data import lock
from jaxepochs.data import rows as rows_lib
from jaxepochs.data.splits import DataError, Split


def source(builder, split: str):
    """The split's TFDS data source (array_record), and its files."""
    if split not in builder.info.splits:
        raise DataError(
            f'Dataset {builder.name} has no split "{split}"; it has {sorted(builder.info.splits)}. '
            "Set data.train_split / data.test_split."
        )
    files = [str(f) for f in builder.info.splits[split].filepaths]
    return builder.as_data_source(split=split), files


def damaged(builder, split: str, files: list[str], e: Exception) -> DataError:
    return DataError(
        f'Split "{split}" of {builder.name} in {builder.data_path} cannot be read ({type(e).__name__}: {e}); '
        f"its files ({', '.join(pathlib.Path(f).name for f in files)}) are damaged. Delete {builder.data_path} and "
        "prepare it again (a built-in dataset is prepared again by the next run)."
    )


def as_arrays(examples: list, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded examples as the trainer's (x, y) arrays."""
    x = np.stack([np.asarray(e[x_key]) for e in examples])
    y = np.asarray([e[y_key] for e in examples])
    if x.dtype == np.uint8:  # images: pixels to [0, 1]
        x = x.astype(np.float32) / 255.0
    # Other integer inputs are tokens, kept as int32 for an embedding.
    x = x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)
    # Integer labels are class ids; any other labels are kept as float targets (the task decides what they mean).
    y = y.astype(np.int32) if np.issubdtype(y.dtype, np.integer) or y.dtype == bool else y.astype(np.float32)
    return x, y


# Decoded splits of this process, newest last: {(files with their sizes and times, x_key, y_key): (x, y)}. A run
# after the first (in a notebook, a study, a test session) skips TFDS's example-by-example decoding; a file that
# changes (prepared again, damaged) is another key. Read-only arrays, and only small splits are kept.
_DECODED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_DECODED_KEEP, _DECODED_MAX_BYTES = 4, 64 << 20
# A split up to this size is read from its decoded copy on disk (written once beside the TFDS files, as a streamed
# run's rows are): a later process reads it in milliseconds instead of decoding every example again (MNIST-1D's
# 5,000: 0.34 s of a run's start on 2 CPU cores). Larger ones are decoded in memory, doubling no disk use.
_COPY_MAX_BYTES = 256 << 20


def read_split(builder, split: str, x_key: str, y_key: str, quiet: bool = True) -> Split:
    data_source, files = source(builder, split)
    try:
        key = (tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files), x_key, y_key)
    except OSError:  # not local files: read as they are
        key = None
    if key in _DECODED:
        return Split(*_DECODED[key])
    if len(data_source) == 0:
        raise DataError(f'Split "{split}" of {builder.name} is empty; choose a split that holds examples.')
    x = y = None
    if key is not None and example_bytes(builder, (x_key, y_key)) * len(data_source) <= _COPY_MAX_BYTES:
        # The copy saves time only: where it cannot be built (a data dir this process may not write to, a full
        # disk, damaged files, inputs that are not finite) the split is decoded here, whose errors say what is wrong.
        with contextlib.suppress(OSError, DataError):
            x, y = (np.array(a) for a in decoded_rows(builder, split, data_source, files, x_key, y_key, quiet))
    if x is None:
        try:
            x, y = as_arrays(data_source.__getitems__(list(range(len(data_source)))), x_key, y_key)
        except Exception as e:  # array_record and TFDS raise RuntimeError, OSError, ValueError... for damaged files
            raise damaged(builder, split, files, e) from None
    if key is not None and x.nbytes + y.nbytes <= _DECODED_MAX_BYTES:
        x.flags.writeable = y.flags.writeable = False
        _DECODED[key] = (x, y)
        while len(_DECODED) > _DECODED_KEEP:
            del _DECODED[next(iter(_DECODED))]
    return Split(x, y)


def example_bytes(builder, keys) -> int:
    """An example's bytes as the trainer's arrays (4 bytes an element: float32 or int32) of the features `keys`
    that the dataset has, from its TFDS metadata."""
    features, per_example = builder.info.features, 0
    for key in keys:
        if key in features:
            shape = getattr(features[key], "shape", ()) or ()
            per_example += 4 * int(np.prod([s or 1 for s in shape], dtype=np.int64))
    return per_example


def decoded_rows(builder, split: str, data_source, files: list[str], x_key: str, y_key: str, quiet: bool) -> tuple:
    """The split's decoded copy beside its TFDS files (built once, under a lock, its inputs checked finite: a copy
    is checked once, whichever path builds it), as memory-mapped Rows. OSError where the copy cannot be written."""

    def check(x, y):
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DataError(f"{builder.name} {split} split: inputs contain NaN or inf; clean the data before training.")

    directory = pathlib.Path(str(builder.data_path)) / rows_lib.ROWS_DIR / f"{split}-{x_key}-{y_key}"
    with lock.wait_for(directory.parent / f".{directory.name}.lock", f"decoding {builder.name} {split}", quiet):
        try:
            return rows_lib.build_tfds_rows(
                data_source, directory, files, lambda examples: as_arrays(examples, x_key, y_key), check
            )
        except DataError:
            raise
        except OSError as e:
            if e.filename and rows_lib.ROWS_DIR in str(e.filename):
                raise
            raise damaged(builder, split, files, e) from None
        except Exception as e:
            raise damaged(builder, split, files, e) from None


def rows_split(builder, split: str, x_key: str, y_key: str, quiet: bool) -> Split:
    """The split as Rows on the host's disk (a decoded copy, written once beside the TFDS files): for a streamed
    run. Scalar labels are read whole (4 bytes an example); other labels stay rows."""
    data_source, files = source(builder, split)
    if len(data_source) == 0:
        raise DataError(f'Split "{split}" of {builder.name} is empty; choose a split that holds examples.')
    x, y = decoded_rows(builder, split, data_source, files, x_key, y_key, quiet)
    return Split(x, np.asarray(y) if y.ndim == 1 else y)
