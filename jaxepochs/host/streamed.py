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
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import program as program_lib
from jaxepochs.core import stream as stream_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import devices
from jaxepochs.host.reading import (  # noqa: F401  (streamed.BatchOrder: the names streamed runs are read by)
    BatchOrder,
    ReadError,
    _host_batch_indices,
    _TrainChunks,
    chunks,
    eval_order,
    putter,
    read,
)


def budget(d) -> tuple[int, str]:
    """The bytes the data may take on the device (by the config's `data` section `d`), and a phrase saying where
    the figure comes from."""
    total, what = (d.device_memory_bytes, "data.device_memory_bytes") if d.device_memory_bytes else devices.free_bytes()
    return int(
        d.device_memory_fraction * total
    ), f"data.device_memory_fraction = {d.device_memory_fraction} of {what} ({total / 1e6:.1f} MB)"


def wants_stream(d, steps_per_epoch: int, data_bytes: int) -> bool:
    """Whether the run streams: `data.stream` where set (`d`: the config's data section); else with
    `train.steps_per_epoch`, or data over budget."""
    if d.stream is not None:
        return bool(d.stream)
    return bool(steps_per_epoch) or data_bytes > budget(d)[0]


CHUNK_BYTES = 32 << 20  # train.steps_per_call = 0: chunks of about this size (a quarter of the budget at most)


def _row_bytes(split: data_lib.Split) -> int:
    """Bytes of one example as the device gets it: its inputs, its label and its mask entry."""
    row = sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize for a in jax.tree.leaves(split.x))
    return row + int(np.prod(split.y.shape[1:], dtype=np.int64)) * split.y.dtype.itemsize + 1


def chunk_steps(t, d, dataset: data_lib.Dataset, steps: int) -> int:
    """Batches per chunk: `train.steps_per_call`, or with 0 as many as make about CHUNK_BYTES (at most a quarter
    of the device budget, and at most an epoch): a chunk per epoch for small data, few calls per epoch for large.
    ConfigError when two chunks (the one training and the next, put ahead) exceed the device budget. `t`, `d`:
    the config's train and data sections."""
    limit, where = budget(d)
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
    final_eval_chunk: Any  # eval_chunk of states already as evaluated; eval_chunk itself for most optimizers


def make_programs(spec: program_lib.RunSpec) -> Programs:
    """The streamed epoch's programs, jitted (each compiles at its first chunk shape)."""
    eval_chunk = jax.jit(stream_lib.make_eval_chunk(spec))
    final = jax.jit(stream_lib.make_eval_chunk(spec, trained=False)) if hasattr(spec.tx, "eval_params") else None
    return Programs(
        jax.jit(stream_lib.make_train_chunk(spec)),
        eval_chunk,
        jax.jit(stream_lib.make_conclude(spec)),
        jax.jit(stream_lib.make_validate_and_conclude(spec)),
        final or eval_chunk,
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


def held_out_for_training(budget_bytes: int, spec, held_out: dict, chunk_examples: int) -> dict[str, HeldOut]:
    """The held-out splits evaluated during training; kept on the device while together they take at most a
    quarter of the device budget (`budget_bytes`)."""
    room, out = budget_bytes // 4, {}
    for name in spec.eval_batch_sizes:
        split = held_out[name]
        size = data_lib.count(split) * _row_bytes(split)
        out[name] = HeldOut(split, name, spec.eval_batch_sizes[name], chunk_examples, size <= room, putter(spec))
        room -= size if size <= room else 0
    return out


def evaluate(programs: Programs, spec, state_r, held: HeldOut, final: bool = False) -> Any:
    """A held-out split's metric sums for the runs' states (training's; `final`: the final states)."""
    sums = stream_lib.zero_sums(spec, jax.tree.leaves(state_r.step)[0].shape[0])
    chunk_program = programs.final_eval_chunk if final else programs.eval_chunk
    for chunk in held.chunks():
        sums = chunk_program(state_r, sums, {"x": chunk["x"], "y": chunk["y"]}, chunk["mask"])
    return sums


def final_sums(programs: Programs, spec, states_r, held_out: dict, batch_size: int, chunk_examples: int) -> dict:
    """Every held-out split's metric sums of the runs' `states_r` (a run axis), read a chunk at a time."""
    out = {}
    for name, split in held_out.items():
        sizes = {**spec.eval_batch_sizes, name: min(batch_size, data_lib.count(split))}
        held = HeldOut(split, name, sizes[name], chunk_examples, keep=False, put=putter(spec))
        out[name] = jax.device_get(evaluate(programs, dataclasses.replace(spec, eval_batch_sizes=sizes), states_r,
                                            held, final=True))  # fmt: skip
    return out


def restore_position(ckpt_in, batch, after_epoch: int, steps: int, say) -> Position | None:
    """The newest checkpoint inside the epoch after the epoch checkpoint `after_epoch` (its rows taken into
    `batch`, a RunBatch of one run), or None: one written before that epoch ended, or none at all."""
    like_inside = {"state": batch.abstract.state, "sums": _abstract_sums(batch)}
    for key in reversed(ckpt_in.epochs()):
        if key <= after_epoch * steps:
            return None
        try:
            state = checkpoint_lib.restore_state(ckpt_in, batch.abstract, say, like_inside, key=key)
        except checkpoint_lib.CheckpointError as e:
            if "earlier jaxepochs" in str(e):
                raise
            say(f"{e}; falling back to the previous checkpoint.")
            continue
        if state.epoch != after_epoch:
            return None
        batch.histories.update({name: list(rows) for name, rows in state.histories.items()})
        say(f"Resuming at step {state.step} of epoch {state.epoch + 1} (a checkpoint inside the epoch).")
        carry = state.carry._replace(state=state.inside["state"])
        return Position(state.carry, carry, state.inside["sums"], state.epoch + 1, state.step)
    return None


def _abstract_sums(batch):
    zero = stream_lib.zero_sums(batch.comp.spec, len(batch.members), train=True)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), zero)


def save_position(ckpt_in, batch, at: Position, steps: int) -> None:
    """A checkpoint inside an epoch: the epoch's start carry, the state and metric sums after its first steps."""
    if ckpt_in is None:
        return
    inside = {"state": devices.fetch(at.carry.state), "sums": devices.fetch(at.sums)}
    state = checkpoint_lib.CheckpointState(devices.fetch(at.start), batch.histories, batch.non_finite, at.epoch - 1,
                                           at.step, inside, batch.lineage(at.epoch - 1))  # fmt: skip
    checkpoint_lib.save_state(ckpt_in, state, key=(at.epoch - 1) * steps + at.step)


class Loop(NamedTuple):
    """What a streamed run's epochs need (host/run.py builds it)."""

    programs: Programs
    spec: program_lib.RunSpec
    es_hparams: Any
    train: data_lib.Split
    held_out: dict  # {name: HeldOut} evaluated during training: "val", and "test" with train.log_test
    steps: int  # steps per epoch
    per_chunk: int  # training batches per chunk (chunk_steps)
    zero: epoch_lib.Metrics  # training's metric sums of no examples (run axis 1): an epoch's start
    last_epoch: int
    held_out_zero: epoch_lib.Metrics  # a held-out split's sums of no examples: one not evaluated this epoch
    val_zero: epoch_lib.Metrics  # the validation split's (with train.eval_weights "both": the trained weights' too)


class StreamedEpochs:
    """A streamed run's epochs as the driver's calls (host/driver.py): `call(carry, first, 1)` trains epoch
    `first` chunk by chunk from the position, evaluates the held-out splits when due and concludes it, returning
    (carry, rows) as the device-resident program does. grain's threads read on across calls (the next epoch's
    first chunks while this one ends). Inside an epoch, after a chunk, a checkpoint of the position is saved when
    `checkpoints.due_inside` says so or Ctrl-C came (`stop()`): then the call returns no rows, and the run stops
    there. `latest` is the carry of the last finished epoch; a failure to read saves the position first."""

    def __init__(self, loop: Loop, order: BatchOrder, position: Position, checkpoints, save_inside, stop):
        self.loop, self.position, self.latest = loop, position, position.start
        self.checkpoints, self.save_inside, self.stop = checkpoints, save_inside, stop
        self.fields: dict[int, dict] = {}  # epoch -> its row's input_wait_seconds (and rate, resumed inside it)
        self.source = _TrainChunks(loop.train, order, position.epoch, position.step, loop.last_epoch, loop.per_chunk)
        self.reader = read(self.source, self._name, putter(loop.spec))

    def _name(self, g: int) -> str:
        e, first, _ = self.source.where(g)
        return f"chunk {first // self.loop.per_chunk + 1} of {self.source.per_epoch} of epoch {e}'s batches"

    def __call__(self, carry, first: int, count: int):
        start, carry, sums, epoch, step = self.position
        loop, began, waited, resumed_at = self.loop, time.perf_counter(), 0.0, step
        while step < loop.steps:
            try:
                chunk, wait = next(self.reader)
            except ReadError:
                if step:
                    self.save_inside(Position(start, carry, sums, epoch, step))
                raise
            waited += wait
            carry, sums = loop.programs.train_chunk(carry, sums, {"x": chunk["x"], "y": chunk["y"]}, chunk["mask"])
            step += chunk["mask"].shape[0]
            if step < loop.steps and (self.stop() or self.checkpoints.due_inside((epoch - 1) * loop.steps + step)):
                self.save_inside(Position(start, carry, sums, epoch, step))
                self.checkpoints.done(step=(epoch - 1) * loop.steps + step)
                if self.stop():
                    return start, _no_rows(loop, start)
        carry, rows = _conclude(loop, start, carry, sums, epoch)
        seconds = time.perf_counter() - began
        self.fields[epoch] = {"input_wait_seconds": waited}
        if resumed_at and seconds > 0:  # resumed inside it: its later steps only
            self.fields[epoch]["steps_fraction"] = (loop.steps - resumed_at) / loop.steps
        self.position, self.latest = Position(carry, carry, loop.zero, epoch + 1, 0), carry
        return carry, rows


def _no_rows(loop: Loop, start):
    """A call's rows when it ended inside an epoch: no epoch ran."""
    zeros = (loop.zero, loop.held_out_zero, loop.val_zero)
    train, held_out, val = (jax.tree.map(lambda a: a[:, None], zero) for zero in zeros)
    column = jnp.zeros((loop.zero.count.shape[0], 1))
    return program_lib.EpochRows(train, val, held_out, column, column.astype(bool), jnp.zeros((), jnp.int32),
                                 start.halted, {name: held_out for name in loop.spec.eval_every})  # fmt: skip


def _conclude(loop: Loop, start, carry, sums, epoch: int):
    val_due = bool(program_lib.validation_due(loop.spec, epoch, loop.last_epoch))
    test_due = bool(program_lib.due_for_test(loop.spec, epoch, loop.last_epoch))
    test = zero = loop.held_out_zero
    val = loop.val_zero
    if "test" in loop.held_out and test_due:
        test = evaluate(loop.programs, loop.spec, carry.state, loop.held_out["test"])
    due = {name: bool(d) for name, d in program_lib.evals_due_at(loop.spec, epoch, loop.last_epoch).items()}
    evals = {name: evaluate(loop.programs, loop.spec, carry.state, loop.held_out[name]) if due[name] else zero
             for name in loop.spec.eval_every}  # fmt: skip
    more = (evals, {name: np.asarray(d) for name, d in due.items()})
    when = (loop.es_hparams, np.asarray(epoch, np.int32), np.asarray(val_due))
    held = loop.held_out.get("val")
    if held is not None and held.keep:  # its chunks on the device: evaluated inside the concluding program
        return loop.programs.validate_and_conclude(start, carry, sums, held.chunks(), test, *when, *more)
    if held is not None and val_due:
        val = evaluate(loop.programs, loop.spec, carry.state, held)
        trained = evaluate(loop.programs, loop.spec, carry.state, held, final=True) if loop.spec.eval_both else None
        val = stream_lib.with_trained(loop.spec, val, trained)
    return loop.programs.conclude(start, carry, sums, val, test, *when, *more)
