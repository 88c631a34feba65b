"""Reading a streamed run's batches: the epoch's order as indices into a split, and the chunks of batches that
grain's threads gather on the host and put on the device while the current chunk trains.

Pass p (1-based) of the training split is ordered by `epoch.batch_indices(fold_in(key, SHUFFLE), p)`, its last
batch padded with index 0 and masked: the device-resident epoch's own order, so a streamed run trains on what a
device-resident run of its config trains on.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import program as program_lib
from jaxepochs.data import loading as data_lib

READ_THREADS = 2  # grain's threads gathering rows
HOST_ORDER_FROM = 1 << 17  # larger training splits get their epoch order from numpy (see _host_batch_indices)
READ_AHEAD = 2  # chunks grain holds ready on the host, beyond the one on the device


class BatchOrder:
    """The training batches of a run's epochs as indices into the training split, [steps, B], and their masks.

    Pass p (1-based) of the split is the device-resident epoch p's own order. With natural epochs, epoch e is pass
    e; with `train.steps_per_epoch` = S, epoch e is the global batches [(e - 1) S, e S) of the passes read one
    after another (every example once a pass, each pass's last batch padded and masked)."""

    def __init__(self, run_key, n: int, batch_size: int, shuffle: bool, steps: int):
        self.n, self.steps = n, steps
        self.per_pass = epoch_lib.steps_per_epoch(n, batch_size)
        shuffle_key = jax.random.fold_in(jnp.asarray(run_key), epoch_lib.SHUFFLE_STREAM)
        if n <= HOST_ORDER_FROM:  # one small compiled program is faster; its temporaries are small too
            on_device = jax.jit(lambda p: epoch_lib.batch_indices(shuffle_key, p, n, batch_size, shuffle))
            self._order = lambda p: tuple(np.asarray(a) for a in jax.device_get(on_device(np.int32(p))))
        else:
            self._order = functools.partial(_host_batch_indices, shuffle_key, n, batch_size, shuffle)
        self._passes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()  # grain's reader threads ask for passes

    def _pass(self, p: int):
        with self._lock:
            if p not in self._passes:
                self._passes = {k: v for k, v in self._passes.items() if k >= p - 2}  # reads in flight may need
                self._passes[p] = self._order(p)
            return self._passes[p]

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's batches: indices int32 [S, B] and mask bool [S, B]."""
        return self.batches(epoch, 0, self.steps)

    def batches(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps [start, stop) of the epoch: indices int32 [stop - start, B] and mask bool (a chunk's, read
        without copying the rest of the epoch)."""
        g, end = (epoch - 1) * self.steps + start, (epoch - 1) * self.steps + stop
        idx, mask = [], []
        while g < end:
            p, b = g // self.per_pass + 1, g % self.per_pass
            count = min(self.per_pass - b, end - g)
            idx_sb, mask_sb = self._pass(p)
            idx.append(idx_sb[b : b + count]), mask.append(mask_sb[b : b + count])
            g += count
        return np.concatenate(idx), np.concatenate(mask)


@jax.jit
def _round_keys(shuffle_key, p):
    return jax.random.bits(jax.random.fold_in(shuffle_key, p), (epoch_lib.FEISTEL_ROUNDS,), jnp.uint32)


def _host_batch_indices(shuffle_key, n: int, batch_size: int, shuffle: bool, p: int):
    """`epoch.batch_indices(shuffle_key, p, n, batch_size, shuffle)` computed with numpy on the host, bit for bit
    (the permutation is integer arithmetic): its temporaries (2^b codes, b >= log2 n) are returned to the system
    when freed, where the device's allocator would keep them in the process."""
    if not shuffle or n > 1 << 24:
        idx, mask = epoch_lib.batch_indices(shuffle_key, np.int32(p), n, batch_size, shuffle)
        return np.asarray(idx), np.asarray(mask)
    with np.errstate(over="ignore"):
        values = epoch_lib.feistel_values(np.asarray(_round_keys(shuffle_key, np.int32(p))), n, np)
    order = values[values < n]  # in the order of their codes, as the device's prefix count and scatter place them
    return epoch_lib.in_batches(order, batch_size, np)


def eval_order(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A held-out split in order, [S, B]: the last batch padded with the last example and masked (as eval_epoch)."""
    steps = epoch_lib.steps_per_epoch(n, batch_size)
    flat = np.arange(steps * batch_size)
    return np.minimum(flat, n - 1).reshape(steps, batch_size), (flat < n).reshape(steps, batch_size)


def _gather(split: data_lib.Split, idx: np.ndarray, mask: np.ndarray) -> dict:
    """The rows of batches `idx` [C, B] of a split, read on the host, as a chunk {"x", "y", "mask"}."""
    flat = idx.reshape(-1)
    gather = lambda a: np.asarray(a[flat]).reshape(*idx.shape, *a.shape[1:])
    return {"x": jax.tree.map(gather, split.x), "y": gather(split.y), "mask": mask}


class _Chunks:
    """grain's random-access source: chunk c of a read plan, the rows of its batches gathered on the host."""

    def __init__(self, split: data_lib.Split, idx_sb: np.ndarray, mask_sb: np.ndarray, per_chunk: int):
        self.split, self.idx_sb, self.mask_sb, self.per_chunk = split, idx_sb, mask_sb, per_chunk

    def __len__(self) -> int:
        return math.ceil(self.idx_sb.shape[0] / self.per_chunk)

    def __getitem__(self, c: int) -> dict:
        part = slice(c * self.per_chunk, (c + 1) * self.per_chunk)
        return _gather(self.split, self.idx_sb[part], self.mask_sb[part])


class _TrainChunks:
    """grain's source over a run's training chunks from a position to the last epoch, across epochs: grain's
    threads read the next epoch's first chunks while this epoch ends (for small data, a whole epoch is one chunk).
    Chunk g is steps [start, stop) of an epoch: the first epoch's from the position's step, every later one's
    from 0, `per_chunk` steps each and a shorter last one."""

    def __init__(self, split, order: BatchOrder, position_epoch: int, position_step: int, last_epoch: int,
                 per_chunk: int):  # fmt: skip
        self.split, self.order, self.per_chunk = split, order, per_chunk
        self.epoch0, self.step0, steps = position_epoch, position_step, order.steps
        self.first = math.ceil((steps - position_step) / per_chunk)
        self.per_epoch = math.ceil(steps / per_chunk)
        self.count = self.first + max(0, last_epoch - position_epoch) * self.per_epoch

    def __len__(self) -> int:
        return self.count

    def where(self, g: int) -> tuple[int, int, int]:
        """Chunk g's epoch and its steps [start, stop)."""
        if g < self.first:
            epoch, start = self.epoch0, self.step0 + g * self.per_chunk
        else:
            epoch, start = self.epoch0 + 1 + (g - self.first) // self.per_epoch, (g - self.first) % self.per_epoch
            start *= self.per_chunk
        return epoch, start, min(start + self.per_chunk, self.order.steps)

    def __getitem__(self, g: int) -> dict:
        return _gather(self.split, *self.order.batches(*self.where(g)))


class ReadError(RuntimeError):
    """Reading the data failed inside the input pipeline; the message names the split, the chunk and the error."""


def chunks(split: data_lib.Split, idx_sb, mask_sb, per_chunk: int, what: str, put=jax.device_put):
    """The plan's chunks on the device, each with the seconds the host waited for it (see `read`)."""
    source = _Chunks(split, idx_sb, mask_sb, per_chunk)
    return read(source, lambda c: f"chunk {c + 1} of {len(source)} of {what}", put)


def putter(spec: program_lib.RunSpec):
    """How a chunk [C, B, ...] goes on the device: whole, or with a layout each batch's rows over "data"."""
    if spec.layout is None:
        return jax.device_put
    return functools.partial(jax.device_put, device=NamedSharding(spec.layout.mesh, P(None, "data")))


def read(source, name, put=jax.device_put) -> Iterator[tuple[dict, float]]:
    """A chunk source's chunks on the device, each with the seconds the host waited for it: grain's threads read
    the next chunks while this one trains, and the next is put on the device when this one is taken (after the
    caller dispatched its work on this one). A failure in a reader thread is a ReadError naming the chunk
    (`name(c)`)."""
    options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD)
    reader = iter(grain.MapDataset.source(source).to_iter_dataset(options))
    for c in range(len(source)):
        start = time.perf_counter()
        try:
            chunk = next(reader)
        except Exception as e:
            raise ReadError(f"reading {name(c)} failed: {type(e).__name__}: {e}") from e
        yield put(chunk), time.perf_counter() - start
