"""A streamed run's training (host/streamed.py): its epochs are calls of the host loop (host/driver.py) like the
device-resident program's, paced one epoch a call, with the one cadence object deciding checkpoints at epoch
ends and inside epochs, and the one checkpoint format (a checkpoint inside an epoch adds the position).
"""

from __future__ import annotations

import contextlib
import pathlib

import jax
import numpy as np

from jaxepochs.core import stream as stream_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import driver, setup, streamed
from jaxepochs.host import workdir as workdir_lib


def train_streamed(run, workdir, ckpt_resume, ckpt, progress, stop, timings: dict, train):
    """Restores the run (its last epoch checkpoint, then a position inside the next epoch) or initialises it,
    and trains its streamed epochs by `train` (host/run.py's host loop): Trained. A failure to read the data
    saves the last finished epoch (and the position inside the epoch) before it is raised as a DataError."""
    batch, comp = run.batch, run.batch.comp
    steps = comp.pieces.steps_per_epoch
    timings["compile"] = 0.0  # the chunk programs compile at their first call
    carry = batch.restore(ckpt_resume, progress.message) if ckpt_resume is not None else None
    carry = batch.initial_carry() if carry is None else carry
    with checkpoint_lib.opened(workdir, 2, ckpt is not None, name=checkpoint_lib.IN_EPOCH_DIR) as ckpt_in:
        position = None
        if ckpt_resume is not None and ckpt_in is not None:
            position = streamed.restore_position(ckpt_in, batch, batch.last_good_epoch(), steps, progress.message)
        if position is None:
            if batch.last_good_epoch():
                progress.message(f"Resuming {workdir} from the checkpoint of epoch {batch.last_good_epoch()}.")
            zero = jax.tree.map(np.asarray, stream_lib.zero_sums(comp.spec, 1, train=True))
            position = streamed.Position(carry, carry, zero, batch.first_epoch(), 0)
        epochs = _epochs(run, position, ckpt_in, ckpt is not None, stop)
        try:
            fields_of = lambda epoch: epochs.fields.pop(epoch, {})
            return train(run, epochs, position.start, workdir, ckpt, progress, stop, limit=1, overlap=False,
                         checkpoints=epochs.checkpoints, fields_of=fields_of)  # fmt: skip
        except (OSError, streamed.ReadError) as error:  # the epochs logged are saved before anything closes
            with contextlib.suppress(Exception):
                batch.save(ckpt, epochs.latest)
            if isinstance(error, OSError):
                raise error from None
            raise data_lib.DataError(
                f"{error}. The run saved its last finished epoch and its position inside the "
                "epoch; fix the data and run the same command again to resume."
            ) from error


def _epochs(run, position: streamed.Position, ckpt_in, checkpointing: bool, stop) -> streamed.StreamedEpochs:
    """The streamed epochs from `position` as the driver's calls."""
    batch, comp = run.batch, run.batch.comp
    steps, spec = comp.pieces.steps_per_epoch, comp.spec
    examples = comp.chunk_steps * spec.batch_size
    held = streamed.held_out_for_training(comp.stream_budget, spec, held_out(comp), examples)
    zero = stream_lib.zero_sums(spec, 1, train=True)
    loop = streamed.Loop(streamed.make_programs(spec), spec, batch.es_hparams(), comp.train, held, steps,
                         comp.chunk_steps, zero, comp.loop.epochs, stream_lib.zero_sums(spec, 1),
                         stream_lib.zero_sums(spec, 1, val=True))  # fmt: skip
    key = setup.without_run_axis(position.start).state.key
    order = streamed.BatchOrder(key, data_lib.count(comp.train), spec.batch_size, spec.shuffle, steps)
    done_steps = (position.epoch - 1) * steps + position.step
    cadence = driver.cadence_of(comp.loop, checkpointing, steps, done_steps)
    save_inside = lambda at: streamed.save_position(ckpt_in, batch, at, steps)
    return streamed.StreamedEpochs(loop, order, position, cadence, save_inside, stop)


def held_out(comp) -> dict:
    """The held-out splits by name: validation and test where they have examples, and the further evaluation sets."""
    splits = {name: getattr(comp.dataset, name) for name in ("val", "test")}
    return {**{name: split for name, split in splits.items() if data_lib.count(split)}, **comp.dataset.evals}


def final_metrics(batch, states_r, held_out: dict) -> dict:
    """evaluate(states) for a streamed run: every held-out split's metric sums, read a chunk at a time."""
    comp = batch.comp
    programs = streamed.make_programs(comp.spec)
    examples = comp.chunk_steps * comp.spec.batch_size
    return streamed.final_sums(programs, comp.spec, states_r, held_out, comp.eval_batch_size, examples)


def say_position_dropped(batch, workdir: pathlib.Path, progress) -> None:
    """A streamed run's position inside an epoch, resumed with device-resident data (whose epochs start whole):
    said, as the epoch that trains again from its start."""
    steps, done = batch.comp.pieces.steps_per_epoch, batch.last_good_epoch()
    later = [key for key in workdir_lib.in_epoch_steps(workdir) if key > done * steps]
    if not later:
        return
    epoch, step = max(later) // steps + 1, max(later) % steps
    since = f"from the checkpoint of epoch {done}" if done else "from its initialisation"
    progress.message(
        f"{workdir} holds a streamed run's position inside epoch {epoch} (step {step} of {steps}); with "
        f"data.stream = False epochs start whole, so the run resumes {since} and epoch {epoch} trains again from "
        "its start (the same run: only time is lost). Run with data.stream = True to resume at that step."
    )
