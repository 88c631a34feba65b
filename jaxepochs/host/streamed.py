"""A streamed run: each epoch as a sequence of compiled chunks (core/stream.py) fed by a grain pipeline.

Where the data does not fit the device budget (`data.device_memory_fraction` of its free memory), where
`data.stream` is True, or where `train.steps_per_epoch` makes an epoch a number of steps, the splits stay on the
host (Rows on its disk, data/rows.py) and an epoch is read a chunk of `train.steps_per_call` batches at a time:
grain's threads gather the rows of the next chunks while the current one trains, and the next chunk is put on the
device before the current one's results are needed. The batches are the device-resident epoch's own: pass p of
the training split is ordered by `epoch.batch_indices(fold_in(key, SHUFFLE), p)`, its last batch padded with
index 0 and masked, so a streamed run trains on what a device-resident run of its config trains on.

Checkpoints can fall inside an epoch (`checkpoint.every_steps`, or `every_seconds`), holding the carry of the
epoch's start, the state after the last chunk and the epoch's metric sums so far: the data position is the
epoch and step, from which the order is recomputed. A run resumed from one ends where an uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import program as program_lib
from jaxepochs.core import stream as stream_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host.cadence import Periodic

READ_THREADS = 2  # grain's threads gathering rows
HOST_ORDER_FROM = 1 << 17  # larger training splits get their epoch order from numpy (see _host_batch_indices)
READ_AHEAD = 2  # chunks grain holds ready on the host, beyond the one on the device


def device_free_bytes() -> tuple[int, str]:
    """Free memory of the first device, and what it is: the accelerator's, or on CPU the host's available."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"free memory of {jax.local_devices()[0]}"
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = 4 << 30
    return available, "available host memory (the CPU device's)"


def budget(config) -> tuple[int, str]:
    """The bytes the data may take on the device, and a phrase saying where the figure comes from."""
    d = config.data
    total, what = (d.device_memory_bytes, "data.device_memory_bytes") if d.device_memory_bytes else device_free_bytes()
    return int(
        d.device_memory_fraction * total
    ), f"data.device_memory_fraction = {d.device_memory_fraction} of {what} ({total / 1e6:.1f} MB)"


def wants_stream(config, data_bytes: int) -> bool:
    """Whether the run streams: `data.stream` where set; else with `train.steps_per_epoch`, or data over budget."""
    if config.data.stream is not None:
        return bool(config.data.stream)
    return bool(config.train.steps_per_epoch) or data_bytes > budget(config)[0]


CHUNK_BYTES = 32 << 20  # train.steps_per_call = 0: chunks of about this size (a quarter of the budget at most)


def _row_bytes(split: data_lib.Split) -> int:
    """Bytes of one example as the device gets it: its inputs, its label and its mask entry."""
    row = sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize for a in jax.tree.leaves(split.x))
    return row + int(np.prod(split.y.shape[1:], dtype=np.int64)) * split.y.dtype.itemsize + 1


def chunk_steps(config, dataset: data_lib.Dataset, steps: int) -> int:
    """Batches per chunk: `train.steps_per_call`, or with 0 as many as make about CHUNK_BYTES (at most a quarter
    of the device budget, and at most an epoch): a chunk per epoch for small data, few calls per epoch for large.
    ConfigError when two chunks (the one training and the next, put ahead) exceed the device budget."""
    t = config.train
    limit, where = budget(config)
    row = _row_bytes(dataset.train)
    target = min(CHUNK_BYTES, limit // 4)
    per_call = t.steps_per_call or int(max(1, min(steps, target // (t.batch_size * row))))
    chunk = per_call * t.batch_size * row
    if 2 * chunk > limit:
        raise config_lib.ConfigError(
            f"A streamed chunk of train.steps_per_call = {per_call} batches of {t.batch_size} examples takes "
            f"{chunk / 1e6:.2f} MB, twice that with the next one put on the device ahead, more than the device "
            f"budget of {limit / 1e6:.2f} MB ({where}). Lower train.steps_per_call or train.batch_size, or raise "
            "data.device_memory_fraction."
        )
    return per_call


def steps_per_epoch(config, n_train: int) -> int:
    return config.train.steps_per_epoch or epoch_lib.steps_per_epoch(n_train, config.train.batch_size)


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


class Position(NamedTuple):
    """Where a streamed run is inside an epoch: what a checkpoint inside an epoch holds."""

    start: Any  # the RunCarry (run axis 1) at the epoch's start
    carry: Any  # the RunCarry after the chunks trained so far
    sums: epoch_lib.Metrics  # the epoch's training sums so far (run axis 1)
    epoch: int
    step: int  # steps of the epoch done


class Programs(NamedTuple):
    train_chunk: Any
    eval_chunk: Any
    conclude: Any
    validate_and_conclude: Any  # with the validation split kept on the device: its evaluation and conclude


def make_programs(spec: program_lib.RunSpec) -> Programs:
    """The streamed epoch's programs, jitted (each compiles at its first chunk shape)."""
    return Programs(
        jax.jit(stream_lib.make_train_chunk(spec)),
        jax.jit(stream_lib.make_eval_chunk(spec)),
        jax.jit(stream_lib.make_conclude(spec)),
        jax.jit(stream_lib.make_validate_and_conclude(spec)),
    )


class HeldOut:
    """A held-out split as evaluation chunks, in order: streamed at each evaluation, or with `keep` read once and
    kept on the device (a validation split that fits its share of the budget: the same chunks every epoch)."""

    def __init__(self, split: data_lib.Split, name: str, batch_size: int, chunk_examples: int, keep: bool,
                 put=jax.device_put):  # fmt: skip
        self.split, self.name, self.batch_size, self.keep, self.put = split, name, batch_size, keep, put
        self.per_chunk = max(1, chunk_examples // batch_size)
        self._kept: list[dict] | None = None

    def chunks(self):
        if self._kept is not None:
            return self._kept
        idx, mask = eval_order(data_lib.count(self.split), self.batch_size)
        what = f"the {self.name} split"
        read_now = (chunk for chunk, _ in chunks(self.split, idx, mask, self.per_chunk, what, self.put))
        if self.keep:
            self._kept = list(read_now)
            return self._kept
        return read_now


def held_out_for_training(config, spec, held_out: dict, chunk_examples: int) -> dict[str, HeldOut]:
    """The held-out splits evaluated during training; kept on the device while together they take at most a
    quarter of the budget."""
    room, out = budget(config)[0] // 4, {}
    for name in spec.eval_batch_sizes:
        split = held_out[name]
        size = data_lib.count(split) * _row_bytes(split)
        out[name] = HeldOut(split, name, spec.eval_batch_sizes[name], chunk_examples, size <= room, putter(spec))
        room -= size if size <= room else 0
    return out


def evaluate(programs: Programs, spec, state_r, held: HeldOut) -> Any:
    """A held-out split's metric sums for the runs' states."""
    sums = stream_lib.zero_sums(spec, jax.tree.leaves(state_r.step)[0].shape[0])
    for chunk in held.chunks():
        sums = programs.eval_chunk(state_r, sums, {"x": chunk["x"], "y": chunk["y"]}, chunk["mask"])
    return sums


def final_metrics(programs: Programs, spec, state, held_out: dict, chunk_examples: int) -> dict:
    """Every held-out split's metrics of `state` (no run axis), streamed."""
    state_r = jax.tree.map(lambda a: jnp.asarray(a)[None], state)
    out = {}
    for name, split in held_out.items():
        sizes = {**spec.eval_batch_sizes, name: min(spec.eval_batch_sizes.get(name, 1000), data_lib.count(split))}
        held = HeldOut(split, name, sizes[name], chunk_examples, keep=False, put=putter(spec))
        sums = evaluate(programs, dataclasses.replace(spec, eval_batch_sizes=sizes), state_r, held)
        out.update(jax.tree.map(lambda a: np.asarray(a)[0], jax.device_get(sums)).means(name))
    return out


def position_arrays(position: Position) -> dict:
    """What a checkpoint inside an epoch holds of a position (no run axis)."""
    first = lambda tree: jax.tree.map(lambda a: np.asarray(a)[0], jax.device_get(tree))
    return {
        "start": checkpoint_lib.arrays_of(first(position.start)),
        "state": first(position.carry.state),
        "sums": first(position.sums),
    }


def restore_position(ckpt_in, like_carry, sums_like, after_epoch: int, steps: int, say) -> Position | None:
    """The newest checkpoint inside an epoch past the epoch checkpoint `after_epoch`, or None."""
    for step in reversed(ckpt_in.epochs()):
        if step <= after_epoch * steps:
            return None
        like = {"start": checkpoint_lib.arrays_of(like_carry), "state": like_carry.state, "sums": sums_like}
        try:
            arrays, meta = ckpt_in.restore(step, like)
        except checkpoint_lib.CheckpointError as e:
            say(f"{e}; falling back to the previous checkpoint.")
            continue
        if meta["epoch"] != after_epoch + 1:
            return None
        with_axis = lambda tree: jax.tree.map(lambda a: np.asarray(a)[None], tree)
        start = checkpoint_lib.carry_of(arrays["start"], np.asarray(False))
        carry = start._replace(state=arrays["state"])
        say(f"Resuming at step {meta['step']} of epoch {meta['epoch']} (a checkpoint inside the epoch).")
        position = Position(with_axis(start), with_axis(carry), with_axis(arrays["sums"]), meta["epoch"], meta["step"])
        return position, meta["history"]
    return None


def in_epoch_path(workdir: pathlib.Path) -> pathlib.Path:
    return workdir / checkpoint_lib.IN_EPOCH_DIR


class Loop(NamedTuple):
    """What the streamed loop needs of its run (host/run.py builds it)."""

    programs: Programs
    spec: program_lib.RunSpec
    es_hparams: Any
    train: data_lib.Split
    held_out: dict  # {name: HeldOut} evaluated during training: "val", and "test" with train.log_test
    steps: int  # steps per epoch
    per_chunk: int  # training batches per chunk (chunk_steps)
    zero: epoch_lib.Metrics  # metric sums of no examples (run axis 1): an epoch's start, a split not evaluated
    last_epoch: int


def train_epochs(
    loop: Loop, position: Position, order: BatchOrder, *, consume, save, save_in_epoch, stop, cadence, latest: dict
):
    """Trains from `position` to the last epoch, or until every run halts or `stop()`: per epoch the chunks, the
    held-out splits when due, then `conclude`; `consume(rows, epoch, seconds, wait)` takes each epoch's rows and
    says whether the run halted. `cadence` = (epoch checkpoints, checkpoints inside an epoch). Returns the carry
    after the last finished epoch and whether Ctrl-C stopped it inside an epoch (its position then saved).
    `latest["carry"]` is the carry of the last finished epoch, for the caller to save when something fails; a
    failure to read the data saves the position of the chunks trained before it is raised."""
    epochs, steps_in = cadence
    start, carry, sums, epoch, step = position
    latest["carry"] = start
    source = _TrainChunks(loop.train, order, epoch, step, loop.last_epoch, loop.per_chunk)

    def name(g: int) -> str:
        e, first, _ = source.where(g)
        return f"chunk {first // loop.per_chunk + 1} of {source.per_epoch} of epoch {e}'s batches"

    began, waited = time.perf_counter(), 0.0
    try:
        for chunk, wait in read(source, name, putter(loop.spec)):
            waited += wait
            carry, sums = loop.programs.train_chunk(carry, sums, {"x": chunk["x"], "y": chunk["y"]}, chunk["mask"])
            step += chunk["mask"].shape[0]
            if step < loop.steps:
                if stop() or steps_in.due((epoch - 1) * loop.steps + step):
                    save_in_epoch(Position(start, carry, sums, epoch, step))
                    steps_in.done((epoch - 1) * loop.steps + step)
                    if stop():
                        return start, True
                continue
            carry, rows = _conclude(loop, start, carry, sums, epoch)
            latest["carry"] = carry
            halted = consume(jax.device_get(rows), epoch, time.perf_counter() - began, waited)
            start, sums, step = carry, loop.zero, 0
            if halted or stop() or epoch == loop.last_epoch:
                return carry, False
            if epochs.due(epoch):
                save(carry, epoch)
                epochs.done(), steps_in.done(epoch * loop.steps)
            epoch, began, waited = epoch + 1, time.perf_counter(), 0.0
    except ReadError:
        if step:
            save_in_epoch(Position(start, carry, sums, epoch, step))
        raise
    return start, False


def _conclude(loop: Loop, start, carry, sums, epoch: int):
    val_due = bool(program_lib.validation_due(loop.spec, epoch, loop.last_epoch))
    test_due = (epoch % loop.spec.test_every == 0) or epoch == loop.last_epoch
    val = test = loop.zero
    if "test" in loop.held_out and test_due:
        test = evaluate(loop.programs, loop.spec, carry.state, loop.held_out["test"])
    when = (loop.es_hparams, np.asarray(epoch, np.int32), np.asarray(val_due))
    held = loop.held_out.get("val")
    if held is not None and held.keep:  # its chunks on the device: evaluated inside the concluding program
        return loop.programs.validate_and_conclude(start, carry, sums, held.chunks(), test, *when)
    if held is not None and val_due:
        val = evaluate(loop.programs, loop.spec, carry.state, held)
    return loop.programs.conclude(start, carry, sums, val, test, *when)


class StepCadence:
    """Checkpoints inside an epoch: once `every_steps` steps have passed since the last checkpoint, or with 0 once
    `every_seconds` have."""

    def __init__(self, every_steps: int, every_seconds: float, enabled: bool):
        self.every_steps, self.every_seconds, self.enabled = every_steps, every_seconds, enabled
        self._last_step, self._last_time = 0, time.monotonic()

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        if self.every_steps:
            return step - self._last_step >= self.every_steps
        return time.monotonic() - self._last_time >= self.every_seconds

    def done(self, step: int) -> None:
        self._last_step, self._last_time = step, time.monotonic()


def cadences(config, enabled: bool, step: int) -> tuple[Periodic, StepCadence]:
    """Checkpoints at epoch ends (checkpoint.every_epochs or every_seconds) and inside epochs (every_steps, or
    every_seconds), counting from optimizer step `step`."""
    k = config.checkpoint
    inside = StepCadence(k.every_steps, k.every_seconds, enabled)
    inside.done(step)
    return Periodic(k.every_epochs, k.every_seconds, enabled=enabled), inside
