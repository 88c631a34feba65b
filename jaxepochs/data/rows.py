"""Rows read on demand: a split's arrays on the host's disk (a decoded copy of its TFDS files), never held whole.

A streamed run reads its splits a chunk of batches at a time. `Rows` is the array-like that the data code passes
around in place of an in-memory array: it knows its shape and dtype, gives the rows it is indexed by as a numpy
array, and `take` gives a view of some of its rows (the training split after validation is held out) without
reading them. Its base is a `.npy` file opened as a memory map, or an in-memory array (an experiment module's
get_data, streamed to the device): reading rows faults their pages in, and the map is told after each read that
its pages are not needed, so the process holds the rows it returned, not the file (the kernel's page cache keeps
what it can, outside the process).

`build_tfds_rows` writes the decoded copy of a TFDS split once (`<the dataset's directory>/jaxepochs_rows/`),
reading it in blocks through `tfds.data_source`: TFDS's array_record files decode one example at a time in Python
(about 30 us an example here), too slow to feed a step of 100 examples in the 0.1 ms it takes, while a gather of
rows from a memory map costs well under a microsecond a row.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import pathlib
import shutil

import numpy as np

ROWS_DIR = "jaxepochs_rows"
# 2: every copy had its inputs checked finite when built (a copy of format 1 may not have been): built again.
ROWS_FORMAT = 2
BUILD_BLOCK = 4096  # examples decoded at once while building: the memory the build holds
RELEASE_ROWS = 2048  # rows gathered between releases of the memory map's pages: the pages a read holds at most


class Rows:
    """Rows [N, ...] of `base` (an array or a memory-mapped .npy), through `indices` (None: all, in order)."""

    def __init__(self, base: np.ndarray, indices: np.ndarray | None = None):
        self.base, self.indices = base, indices

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.base.shape[1:], dtype=np.int64)) * self.base.dtype.itemsize

    def __len__(self) -> int:
        return self.base.shape[0] if self.indices is None else self.indices.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        """The rows `idx` (an int, a slice or an index array) as a numpy array: they are read here."""
        rows = idx if self.indices is None else self.indices[idx]
        if not isinstance(self.base, np.memmap) or np.ndim(rows) == 0 or isinstance(rows, slice):
            out = np.array(self.base[rows])
            self._release()
            return out
        # Random rows touch a page each: a chunk of them could fault in most of the file before a release, so
        # they are gathered RELEASE_ROWS at a time, the pages dropped after each (at most that many stay mapped).
        out = np.empty((len(rows), *self.base.shape[1:]), self.base.dtype)
        for start in range(0, len(rows), RELEASE_ROWS):
            np.take(self.base, rows[start : start + RELEASE_ROWS], axis=0, out=out[start : start + RELEASE_ROWS])
            self._release()
        return out

    def take(self, idx) -> Rows:
        """A view of the rows `idx`: nothing is read."""
        indices = np.arange(len(self))[idx] if self.indices is None else self.indices[idx]
        return Rows(self.base, np.asarray(indices, np.int64))

    def blocks(self, size: int = BUILD_BLOCK):
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def max(self):
        return max(block.max() for block in self.blocks())

    def __array__(self, dtype=None, copy=None):
        """The whole of it, read: for small splits only (a check, a plot); the streamed epoch never calls it."""
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype)

    def _release(self) -> None:
        handle = getattr(self.base, "_mmap", None)
        if handle is not None and hasattr(handle, "madvise"):
            handle.madvise(mmap.MADV_DONTNEED)


def is_rows(a) -> bool:
    return isinstance(a, Rows)


def _open(directory: pathlib.Path) -> tuple[Rows, Rows] | None:
    """The rows written before, if they are complete and their source files have not changed since."""
    try:
        info = json.loads((directory / "rows.json").read_text())
        x = np.load(directory / "x.npy", mmap_mode="r")
        y = np.load(directory / "y.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if x.shape[0] != info["num_examples"] or y.shape[0] != info["num_examples"]:
        return None
    return Rows(x), Rows(y)


def _reserve(path: pathlib.Path) -> None:
    """Allocates a memory-mapped file's blocks now: a full disk is an OSError here, not a SIGBUS at a page write."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a filesystem that cannot: as before
                raise


def _sources_stamp(files: list[str]) -> list:
    return [[pathlib.Path(f).name, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def build_tfds_rows(source, directory: pathlib.Path, files: list[str], convert, check) -> tuple[Rows, Rows]:
    """The decoded rows of a TFDS data source in `directory`, written once (block by block, so the build holds
    BUILD_BLOCK examples) and opened as memory maps. `convert(examples) -> (x, y)` decodes a block as the
    device-resident path reads a split; `check(x, y)` raises for data that cannot be trained on. The caller holds
    a lock: two processes never build one split at once."""
    stamp = _sources_stamp(files)
    opened = _open(directory)
    info = json.loads((directory / "rows.json").read_text()) if opened is not None else {}
    if opened is not None and info.get("sources") == stamp and info.get("format") == ROWS_FORMAT:
        return opened
    n = len(source)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    x_out = y_out = None
    for start in range(0, n, BUILD_BLOCK):
        x, y = convert(source.__getitems__(list(range(start, min(start + BUILD_BLOCK, n)))))
        check(x, y)
        if x_out is None:
            x_out = np.lib.format.open_memmap(tmp / "x.npy", "w+", x.dtype, (n, *x.shape[1:]))
            y_out = np.lib.format.open_memmap(tmp / "y.npy", "w+", y.dtype, (n, *y.shape[1:]))
            _reserve(tmp / "x.npy"), _reserve(tmp / "y.npy")
        x_out[start : start + len(x)], y_out[start : start + len(y)] = x, y
    x_out.flush(), y_out.flush()
    del x_out, y_out
    (tmp / "rows.json").write_text(json.dumps({"num_examples": n, "sources": stamp, "format": ROWS_FORMAT}))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return _open(directory)
