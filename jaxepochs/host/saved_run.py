"""Reading a run from its workdir: `load(workdir, epoch)` (exported as `jaxepochs.load`), the train state of one of
its checkpoints, its model and optimizer state rebuilt from its config.json and the shapes in its run.json. The run
may be finished or still training (its checkpoints are read without the workdir's lock)."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import hooks as hooks_lib
from jaxepochs.host import setup
from jaxepochs.host.workdir import WorkdirError


def _shapes_of(run: dict) -> data_lib.Dataset:
    """A dataset of two zero examples shaped as the run's (run.json), to rebuild its model and state from."""
    is_leaf = lambda spec: isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], str)
    inputs = run.get("inputs", [run.get("input_shape"), run.get("input_dtype", "float32")])
    x = jax.tree.map(lambda spec: np.zeros([2, *spec[0]], spec[1]), inputs, is_leaf=is_leaf)
    y = np.zeros([2, *run.get("label_shape", [])], run.get("label_dtype", "int32"))
    if isinstance(run.get("labels"), dict):  # a custom task's pytree of labels
        y = jax.tree.map(lambda spec: np.zeros([2, *spec[0]], spec[1]), run["labels"], is_leaf=is_leaf)
    extra = run.get("extra")
    extra = None if extra is None else jax.tree.map(lambda s: np.zeros([2, *s[0]], s[1]), extra, is_leaf=is_leaf)
    split = data_lib.Split(x, y, extra)
    empty = data_lib.take(split, slice(0, 0))
    return data_lib.Dataset(
        "run.json", split, empty if not run["num_val_examples"] else split, split, run["num_classes"]
    )


def _open_checkpoints(workdir: pathlib.Path, tries: int = 5) -> checkpoint_lib.Checkpointer:
    """The workdir's checkpoints, read while a live run may be rotating them: orbax lists the directories, then
    reads each one's time, and one deleted in between (max_to_keep) is a FileNotFoundError; list again."""
    for attempt in range(tries):
        try:
            return checkpoint_lib.Checkpointer(workdir)
        except FileNotFoundError:
            if attempt == tries - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def load(workdir: str | pathlib.Path, epoch: int | str | None = None) -> epoch_lib.TrainState:
    """The train state of a run's checkpoint: the newest (None), "best" (its best epoch's parameters) or epoch N."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "run.json").exists():
        raise WorkdirError(f"{workdir} holds no jaxepochs run (no run.json); pass the --workdir of a run.")
    try:
        config = config_lib.from_json((workdir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{workdir / 'config.json'} is damaged ({e}); the run there cannot be read.") from None
    run = json.loads((workdir / "run.json").read_text())
    dataset = _shapes_of(run)
    hooks = hooks_lib.load_hooks(config)
    pieces = setup.make_pieces(config, dataset, hooks, run["steps_per_epoch"], run["num_val_examples"] > 0)
    like = setup.abstract_carry(pieces, config, setup.first_example(dataset.train))  # a run: a batch of one
    ckpt = _open_checkpoints(workdir)
    try:
        saved = ckpt.epochs()
        if not saved:
            raise WorkdirError(f"{workdir} has no checkpoints.")
        chosen = saved[-1] if epoch in (None, "best") else int(epoch)
        if chosen not in saved:
            raise WorkdirError(f"{workdir} has no checkpoint of epoch {epoch}; it has epochs {saved}.")
        try:
            restored = checkpoint_lib.restore_state(ckpt, like, lambda text: None, key=chosen)
        except checkpoint_lib.CheckpointError as e:
            others = [e for e in saved if e != chosen]
            raise checkpoint_lib.CheckpointError(f"{e}. Its other checkpoints: epochs {others}.") from None
    finally:
        ckpt.close()
    carry = setup.without_run_axis(restored.carry)
    has_best = int(carry.es_state.best_epoch) > 0  # no epoch monitored yet: the last is the best known
    return carry.state._replace(params=carry.best_params) if epoch == "best" and has_best else carry.state
