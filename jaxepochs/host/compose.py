"""Composing a batch of runs: what its runs share (a `Composition`) and what each brings (a `Member`).

    compose(template config, hooks, dataset, ...) -> Composition    the data, model, task, optimizer, tracker,
                                                                    the run program's spec, where it runs, the loop
    member(config, name, fold, composition) -> Member               a run's seed, optimizer and stopping numbers

Every error a config or an experiment module's hook can cause is raised here, before anything compiles. A run
(`jaxepochs run`) is composed as a batch of one; a sweep's program group as a batch of many. Below this module
nothing reads the config: the RunBatch (host/batch.py) and the driver take these typed pieces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxepochs.core import early_stopping as early_stopping_lib
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import layout as layout_lib
from jaxepochs.core import optim
from jaxepochs.core import program as program_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import devices, driver, finetune, setup, specs, warm_start


class Member(NamedTuple):
    """One run of a batch: what may differ from the other runs without changing the program's shapes."""

    name: str  # "r0" for a run; a sweep's "r003", "r003_fold1"
    config: Any  # its validated config: the model's initialisation reads its seed (an NNX get_model, all of it)
    fold: int  # its cross-validation fold, or -1
    opt_hparams: optim.OptHParams  # its optimizer's numbers (a swept learning rate, ...)
    tracker: early_stopping_lib.EarlyStopping  # its early stopping's numbers
    group_values: tuple | None  # fine-tuning: each group's first trainable epoch and rate multiplier


@dataclasses.dataclass(frozen=True, eq=False)
class Composition:
    """What the runs of a batch share: the data, the pieces, the run program's spec, where it runs, the loop."""

    dataset: data_lib.Dataset
    pieces: setup.Pieces
    spec: program_lib.RunSpec  # the run program's: the splits evaluated every epoch and their batch sizes
    loop: driver.LoopSpec  # epochs, the pace of the calls, the checkpoints' cadence, profiling
    layout: layout_lib.Layout | None  # a run's batches over "data" (and a sweep's runs over "runs"); None: one device
    runs_devices: int  # without a layout: devices a sweep's run axis is split over (jax.shard_map)
    eval_batch_size: int
    restore_best: bool  # early stopping ends a run with its best epoch's parameters
    has_val: bool
    cv: int = 0  # K folds of the training split as each configuration's runs (their validation splits)
    split_seed: int = 0
    chunk_steps: int = 0  # a streamed run's training batches per chunk
    stream_budget: int = 0  # a streamed run's device budget in bytes (held-out splits kept on the device within it)

    @property
    def train(self) -> data_lib.Split:
        return self.dataset.train

    def splits(self, folds: list[int], on_host: bool = False) -> dict:
        """The arrays the program trains and evaluates on: with `cv`, each run's fold ([R, ...]: its training
        and validation parts), else the splits shared by the runs. `on_host`: numpy arrays (to be placed)."""
        put = (lambda split: _batch(split, np.asarray)) if on_host else (lambda split: _batch(split, jnp.asarray))
        d = self.dataset
        if self.cv:
            n = data_lib.count(d.train)
            parts = [data_lib.fold_indices(n, self.cv, fold, self.split_seed) for fold in folds]
            stack = lambda k: jax.tree.map(lambda *a: np.stack(a), *[_batch(data_lib.take(d.train, p[k]), np.asarray)
                                                                     for p in parts])  # fmt: skip
            splits = {"train": stack(0), "val": stack(1)}
            splits = splits if on_host else jax.tree.map(jnp.asarray, splits)
        else:
            splits = {"train": put(d.train)}
            if "val" in self.spec.eval_batch_sizes:
                splits["val"] = put(d.val)
        if "test" in self.spec.eval_batch_sizes:
            splits["test"] = put(d.test)
        for name in self.spec.eval_every:  # shared by the runs, folds or not
            splits[name] = put(d.evals[name])
        return splits


def _batch(split: data_lib.Split, array) -> dict:
    return data_lib.as_batch(split, array)


def member(config, name: str, fold: int, pieces: setup.Pieces, has_val: bool) -> Member:
    """A run's own numbers from its config (checked: fine-tuning values that do not fit raise ConfigError)."""
    names = pieces.tx.group_names
    tracker = setup.make_tracker(config.early_stopping, has_val, pieces.metric_names, pieces.eval_names)[0]
    groups = finetune.group_values(specs.specs_of(config).finetune, names) if names else None
    return Member(name, config, fold, optim.hparams_of(config.optimizer.to_dict()), tracker, groups)


def compose(config, dataset: data_lib.Dataset, hooks, *, cv: int = 0, sweep: bool = False, fresh: bool = True,
            say=lambda text: None) -> Composition:  # fmt: skip
    """The composition of `config`'s runs on `dataset`: a run's (`sweep` False: its batches over the mesh's data
    axis, streamed where the data asks for it) or a sweep's program group's (its runs over the mesh's runs
    axis; with `cv`, K folds of the training split as the validation splits). `fresh`: the runs start afresh,
    so init.from_workdir's source is read and checked now (a resumed run restores its own checkpoint: the
    source may have gone). ConfigError for anything that cannot run, before anything compiles."""
    n_train = data_lib.count(dataset.train)
    if cv:
        n_train = data_lib.fold_indices(n_train, cv, 0, config.data.split_seed)[0].shape[0]
    setup.check_shapes(config.model, config.train.batch_size, dataset, n_train)
    has_val = bool(cv) or data_lib.count(dataset.val) > 0
    steps = config.train.steps_per_epoch or epoch_lib.steps_per_epoch(n_train, config.train.batch_size)
    pieces = setup.make_pieces(config, dataset, hooks, steps, has_val)
    if fresh:  # the arrays its fresh runs take from init.from_workdir, read and checked now
        trace_init = lambda x: pieces.source.trace_init(config, x)
        pieces = warm_start.attach(pieces, config.init, trace_init, setup.first_example(dataset.train))
    m, batch_size = config.mesh, config.train.batch_size
    if sweep:
        runs_devices, layout = devices.sweep_mesh(m, batch_size)[0], devices.sweep_layout(m, batch_size)
    else:
        layout = devices.run_layout(m, batch_size, config.train.accumulate_steps, dataset.streamed, say)
        runs_devices = 1
    every_epoch = _every_epoch_sizes(config.train, dataset, cv)
    axes = {"train": 0, "val": 0} if cv else {}
    monitor = config.optimizer.schedule.monitor
    trace_params = lambda x: pieces.source.trace_init(config, x)[0]
    layers = _layers(trace_params, dataset) if config.logging.layer_norms else ()
    spec = setup.run_spec(config.train, pieces, every_epoch, axes, layout=layout, plateau_monitor=monitor,
                          norms=config.logging.norms, eval_every=eval_cadence(config.train, dataset),
                          layers=layers)  # fmt: skip
    e = config.early_stopping
    return Composition(
        dataset, pieces, spec, specs.specs_of(config).loop, layout, runs_devices, config.train.eval_batch_size,
        bool(e.enabled and e.restore_best), has_val, cv, config.data.split_seed,
    )  # fmt: skip


def _every_epoch_sizes(t, dataset: data_lib.Dataset, cv: int) -> dict[str, int]:
    """The held-out splits the run program evaluates when due, and their batch sizes: validation (a CV run's
    fold), the test split with train.log_test (`t`: the config's train section), and the further evaluation sets."""
    n_val = data_lib.count(dataset.train) // cv if cv else data_lib.count(dataset.val)
    sizes = setup.eval_sizes(t.eval_batch_size, {"val": n_val})
    if t.log_test:
        sizes.update(setup.eval_sizes(t.eval_batch_size, {"test": data_lib.count(dataset.test)}))
    sizes.update(setup.eval_sizes(t.eval_batch_size, {k: data_lib.count(s) for k, s in dataset.evals.items()}))
    return sizes


def _layers(trace_params, dataset: data_lib.Dataset) -> tuple[str, ...]:
    """The model's top-level parameter groups (`trace_params(x)`, traced: nothing compiled), for
    logging.layer_norms."""
    params = jax.eval_shape(trace_params, setup.first_example(dataset.train))
    if not isinstance(params, dict) or not all(isinstance(name, str) for name in params):
        raise config_lib.ConfigError(
            f"logging.layer_norms: the model's parameters are a {type(params).__name__} without named top-level "
            "groups; it needs a dict of them (a linen module's, an NNX module's state). Set it False."
        )
    return tuple(params)


def eval_cadence(t, dataset: data_lib.Dataset) -> dict[str, int]:
    """Every further evaluation set's cadence in epochs: train.validate_every, or its train.eval_every entry
    ("name=N"; `t`: the config's train section); ConfigError for an entry naming no set."""
    every = {name: t.validate_every for name in dataset.evals}
    for entry in t.eval_every:
        name, _, n = str(entry).partition("=")
        if name.strip() not in every:
            raise config_lib.ConfigError(
                f"config.train.eval_every entry {entry!r} names no evaluation set; the sets are "
                f"{sorted(every) or 'none'} (get_data's further splits, data.eval_splits)."
            )
        every[name.strip()] = int(n)
    return every
