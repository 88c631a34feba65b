"""Reading a run from its workdir: `load(workdir, epoch, run)` (exported as `jaxepochs.load`), the train state of
one of its checkpoints, its model and optimizer state rebuilt from its config.json and the shapes in its run.json.
The run may be finished or still training (its checkpoints are read without the workdir's lock), and may be a
member of a sweep or a --cv sweep's refit (host/members.py: `run="r3"`, or the path `SWEEPDIR/r3`).

    saved = open_run(workdir, epoch, run)   # -> SavedRun: the state, its config, the model's pieces, the shapes
"""

from __future__ import annotations

import math
import pathlib
import time
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import optim
from jaxepochs.data import loading as data_lib
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import hooks as hooks_lib
from jaxepochs.host import members as members_lib
from jaxepochs.host import report, setup
from jaxepochs.host.workdir import WorkdirError


class SavedRun(NamedTuple):
    """One checkpoint of one run, read back with what is needed to use it."""

    state: epoch_lib.TrainState  # its parameters ("best": the best epoch's) and model state, no run axis
    config: Any  # the run's config
    pieces: setup.Pieces  # its model (pieces.source, pieces.task: the evaluation's apply), optimizer, tracker
    shapes: dict  # run.json's: "inputs" ([shape per example, dtype] of each input), "num_classes", ...
    where: members_lib.Where  # where its checkpoints are and its name there
    epoch: int  # the checkpoint's epoch
    best_epoch: int = 0  # the epoch whose parameters `state` holds with epoch="best" (0: the checkpoint's own)


def shapes_of(dataset: data_lib.Dataset, steps_per_epoch: int, num_val_examples: int) -> dict:
    """run.json's contents: the shapes `load` needs to rebuild a run's state without its data."""
    return {
        "steps_per_epoch": steps_per_epoch,
        "num_classes": dataset.num_classes,
        "inputs": jax.tree.map(lambda a: [list(a.shape[1:]), str(a.dtype)], dataset.train.x),
        "label_shape": list(np.shape(jax.tree.leaves(dataset.train.y)[0])[1:]),
        "label_dtype": str(jax.tree.leaves(dataset.train.y)[0].dtype),
        "labels": jax.tree.map(lambda a: [list(a.shape[1:]), str(a.dtype)], dataset.train.y),  # a pytree (custom)
        "extra": jax.tree.map(lambda a: [list(a.shape[1:]), str(a.dtype)], dataset.train.extra),
        "num_val_examples": num_val_examples,
        "eval_sets": sorted(dataset.evals),  # early stopping may watch one: its tracker is rebuilt with them
    }


def write_shapes(path: pathlib.Path, dataset: data_lib.Dataset, steps_per_epoch: int, num_val_examples: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(path, shapes_of(dataset, steps_per_epoch, num_val_examples))


def _is_spec(spec) -> bool:
    return isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], str)


def input_specs(shapes: dict):
    """The model's inputs as run.json records them: a pytree of (shape of one example, dtype) pairs."""
    inputs = shapes.get("inputs", [shapes.get("input_shape"), shapes.get("input_dtype", "float32")])
    return jax.tree.map(lambda spec: (tuple(spec[0]), np.dtype(spec[1])), inputs, is_leaf=_is_spec)


def _dataset_of(shapes: dict) -> data_lib.Dataset:
    """A dataset of two zero examples shaped as the run's (run.json), to rebuild its model and state from."""
    x = jax.tree.map(lambda spec: np.zeros([2, *spec[0]], spec[1]), input_specs(shapes), is_leaf=lambda s:
                     isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], np.dtype))  # fmt: skip
    y = np.zeros([2, *shapes.get("label_shape", [])], shapes.get("label_dtype", "int32"))
    if isinstance(shapes.get("labels"), dict):  # a custom task's pytree of labels
        y = jax.tree.map(lambda spec: np.zeros([2, *spec[0]], spec[1]), shapes["labels"], is_leaf=_is_spec)
    extra = shapes.get("extra")
    extra = None if extra is None else jax.tree.map(lambda s: np.zeros([2, *s[0]], s[1]), extra, is_leaf=_is_spec)
    split = data_lib.Split(x, y, extra)
    empty = data_lib.take(split, slice(0, 0))
    return data_lib.Dataset(
        "run.json",
        split,
        empty if not shapes["num_val_examples"] else split,
        split,
        shapes["num_classes"],
        evals={name: split for name in shapes.get("eval_sets", [])},
    )


def _shapes_from_data(where: members_lib.Where, hooks: hooks_lib.Hooks) -> dict:
    """A sweep chunk's shapes where it has no run.json (written before chunks had one): read from its data."""
    config = where.config
    dataset = setup.load_data(config, hooks, quiet=True)
    n_train = n_all = data_lib.count(dataset.train)
    if where.cv:
        n_train = data_lib.fold_indices(n_all, where.cv, 0, config.data.split_seed)[0].shape[0]
    num_val = n_all // where.cv if where.cv else data_lib.count(dataset.val)
    steps = config.train.steps_per_epoch or math.ceil(n_train / config.train.batch_size)
    return shapes_of(dataset, steps, num_val)


def _open_checkpoints(directory: pathlib.Path, tries: int = 5) -> checkpoint_lib.Checkpointer:
    """The checkpoints in `directory`, read while a live run may be rotating them: orbax lists the directories,
    then reads each one's time, and one deleted in between (max_to_keep) is a FileNotFoundError; list again."""
    for attempt in range(tries):
        try:
            return checkpoint_lib.Checkpointer(directory)
        except FileNotFoundError:
            if attempt == tries - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _restore(where: members_lib.Where, like, epoch: int | str | None):
    """(the checkpoint's carry of every run on its axis, its epoch); WorkdirError where there is none."""
    if not (where.directory / checkpoint_lib.CHECKPOINT_DIR).is_dir():
        raise WorkdirError(f"{where.label} has no finished checkpoint yet: it has not finished an epoch.")
    ckpt = _open_checkpoints(where.directory)
    try:
        saved = ckpt.epochs()
        if not saved:
            raise WorkdirError(f"{where.label} has no checkpoints: it has not finished an epoch yet.")
        newest = epoch in (None, "best", "last")
        if not newest and int(epoch) not in saved:
            raise WorkdirError(f"{where.label} has no checkpoint of epoch {epoch}; it has epochs {saved}.")
        # The newest first; in a live run it may be one still being written, or removed by max_to_keep after it
        # was listed: then the one before (a checkpoint that is there and does not restore is an error).
        for chosen in reversed(saved) if newest else [int(epoch)]:
            try:
                return checkpoint_lib.restore_state(ckpt, like, lambda text: None, key=chosen).carry, chosen
            except checkpoint_lib.CheckpointError as e:
                if (
                    newest and isinstance(e.__cause__, FileNotFoundError | KeyError) and chosen != saved[0]
                ):  # an item missing
                    warnings.warn(f"{e}; reading the checkpoint before it.", stacklevel=3)
                    continue
                others = [e for e in saved if e != chosen]
                raise checkpoint_lib.CheckpointError(f"{e}. Its other checkpoints: epochs {others}.") from None
    finally:
        ckpt.close()
    raise AssertionError("unreachable")


def open_run(workdir: str | pathlib.Path, epoch: int | str | None = None, run: str | None = None) -> SavedRun:
    """One checkpoint of a run: the newest (None or "last"), "best" (the newest checkpoint with its best epoch's
    parameters) or epoch N; `run`: a sweep's member ("r3", "r3_fold1") or refit ("refit/r3")."""
    where = members_lib.resolve(workdir, run)
    config = where.config
    hooks = hooks_lib.load_hooks(config)
    shapes = where.shapes if where.shapes is not None else _shapes_from_data(where, hooks)
    dataset = _dataset_of(shapes)
    pieces = setup.make_pieces(config, dataset, hooks, shapes["steps_per_epoch"], shapes["num_val_examples"] > 0)
    one = setup.abstract_carry(pieces, config, setup.first_example(dataset.train))  # a run: a batch of one
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct((where.size, *a.shape[1:]), a.dtype), one)
    carry, chosen = _restore(where, like, epoch)
    # The parameters as evaluated: the best epoch's, else the optimizer's evaluation parameters (schedule-free's).
    carry = carry._replace(state=optim.evaluation_states(pieces.tx, carry.state))
    carry = jax.tree.map(lambda a: a[where.index], carry)
    has_best = int(carry.es_state.best_epoch) > 0  # no epoch monitored yet: the last is the best known
    state = carry.state._replace(params=carry.best_params) if epoch == "best" and has_best else carry.state
    best = int(carry.es_state.best_epoch) if epoch == "best" and has_best else 0
    return SavedRun(state, config, pieces, shapes, where, chosen, best)


def load(workdir: str | pathlib.Path, epoch: int | str | None = None, run: str | None = None) -> epoch_lib.TrainState:
    """The train state of a run's checkpoint: the newest (None), "best" (its best epoch's parameters) or epoch N;
    `run` names a sweep's member or refit (see `open_run`)."""
    return open_run(workdir, epoch, run).state
