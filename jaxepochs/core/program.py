"""The run program, written once: K epochs of a batch of runs as one compiled XLA program.

    run_epochs(carry_R, splits, es_hparams_R, first_epoch, num_epochs, last_epoch) -> (carry_R, EpochRows)

Each epoch of each run is the shuffled training scan, the validation pass, the test split when due, early
stopping's pure update, reduce-on-plateau's, the best epoch's parameters and the non-finite guard; nothing of it
is decided anywhere else. Every array of the carry has a leading run axis R: `jaxepochs run` is a batch of one,
`jaxepochs sweep` a batch of many (the epoch is `jax.vmap`ped over the runs), so a sweep member and its solo run
are the same program and compute the same numbers. A run that halts (a non-finite training loss, or early
stopping) keeps flowing through the batch with its updates masked, so the batch stays rectangular; the loop over
epochs ends at `num_epochs` or when every run has halted. K = 1 is an ordinary call, not a second loop.

A non-finite training loss discards that epoch (its state, early stopping and plateau updates are not kept) and
halts the run; its row is returned so the host can name the epoch. Early stopping's epoch is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxepochs.core import averages, optim
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core.early_stopping import EarlyStopping, EarlyStoppingHParams, EarlyStoppingState
from jaxepochs.core.task import Task

TRAINED = "trained_"  # train.eval_weights "both": the trained weights' validation sums, val_trained_<metric>


class RunCarry(NamedTuple):
    """Everything a run carries from epoch to epoch (and a checkpoint holds); a leading run axis in a program."""

    state: epoch_lib.TrainState
    es_state: EarlyStoppingState
    plateau: optim.PlateauState | None  # reduce_on_plateau's state; None for other schedules
    best_params: Any  # the parameters of es_state.best_epoch, as evaluated (optim.evaluation_state)
    halted: jax.Array  # bool [] a non-finite loss or early stopping ended the run: later epochs change nothing


def start_carry(state: epoch_lib.TrainState, tracker: EarlyStopping, plateau) -> RunCarry:
    """The carry of a run before its first epoch (no run axis)."""
    return RunCarry(state, tracker.init(), plateau, state.params, jnp.zeros((), bool))


class EpochRows(NamedTuple):
    """What a call returns to the host: per run and epoch of the call, [R, K] each (zeros past `ran`)."""

    train: epoch_lib.Metrics
    val: epoch_lib.Metrics  # count 0 without a validation split
    test: epoch_lib.Metrics  # count 0 on epochs the test split was not evaluated
    learning_rate: jax.Array  # float32 [R, K] the rate of the epoch's last step
    trained: jax.Array  # bool [R, K] the run had not halted before this epoch: the row is real
    ran: jax.Array  # int32 [] epochs the call ran
    halted: jax.Array  # bool [R] each run's halted flag after the call
    evals: dict = {}  # the further evaluation sets' metrics by name (count 0 on epochs a set was not evaluated)


@dataclasses.dataclass(frozen=True, eq=False)
class RunSpec:
    """What is compiled into the program: the model's apply function, the optimizer and the epoch's settings."""

    task: Task  # the model's apply, the loss and the metrics (core/task.py)
    tx: optim.TrainerOptimizer  # optim.Optimizer, or another optimizer that does what the trainer asks of one
    metric_names: tuple[str, ...]  # "loss" and the task's metrics: the structure of every split's sums
    batch_size: int
    eval_batch_sizes: dict[str, int]  # "val", "test", eval_every's sets -> batch size; one not named: not evaluated
    tracker: EarlyStopping  # early stopping's rule; with may_stop False it only tracks the best epoch
    may_stop: bool
    epochs_per_call: int  # K: the most epochs one call runs (the size of EpochRows' epoch axis)
    test_every: int = 1  # the test split on epochs divisible by this, and the last
    validate_every: int = 1  # the validation split on epochs divisible by this, and the last
    shuffle: bool = True
    plateau_monitor: str | None = None  # reduce_on_plateau's metric ("val_loss", "train_loss") where it is used
    data_axes: dict[str, int | None] = dataclasses.field(default_factory=dict)  # split -> 0 if per run (CV folds)
    augment: Callable | None = None  # (key, batch) -> batch, in each training step
    accumulate_steps: int = 1  # micro-batches per optimizer step (epoch.train_step)
    layout: Any = None  # core/layout.Layout: the batch over the mesh's data axis, the runs over its runs axis
    norms: bool = False  # logging.norms: each step's gradient, update and parameter norms in the training sums
    layers: tuple[str, ...] = ()  # logging.layer_norms: the top-level parameter groups whose norms are summed too
    swa_stats: bool = False  # SWA on a model with state: its statistics recomputed for the average (core/averages)
    eval_both: bool = False  # train.eval_weights "both": validation at the trained weights too (val_trained_*)
    eval_every: dict[str, int] = dataclasses.field(default_factory=dict)  # further evaluation sets: their cadence

    @property
    def val_metric_names(self) -> tuple[str, ...]:
        """The structure of the validation split's sums: `metric_names`, and their trained weights' with both."""
        return self.metric_names + (tuple(f"{TRAINED}{name}" for name in self.metric_names) if self.eval_both else ())

    @property
    def train_metric_names(self) -> tuple[str, ...]:
        """The structure of the training split's sums: `metric_names`, and the norms' where they are logged."""
        return self.metric_names + (epoch_lib.NORM_SUMS if self.norms else ()) + epoch_lib.layer_norm_names(self.layers)


def _metric(by_split: dict[str, epoch_lib.Metrics], monitor: str) -> jax.Array:
    split, name = monitor.split("_", 1)
    return by_split[split].mean(name)


def _observed(monitor: str, val_due, evals_due: dict):
    """Whether an epoch measured `monitor`: a validation metric where validation was due, an evaluation set's
    where that set was, a training metric every epoch."""
    split = monitor.split("_", 1)[0]
    return val_due if split == "val" else evals_due.get(split, True)


def due_every(every: int, epoch, last_epoch):
    """Whether a split evaluated every `every` epochs (and after the last) is due at `epoch`."""
    return (epoch % every == 0) | (epoch == last_epoch)


def _evaluate(spec: RunSpec, name: str, state: epoch_lib.TrainState, splits) -> epoch_lib.Metrics:
    batch_size = spec.eval_batch_sizes[name]
    return epoch_lib.eval_epoch(
        state.params,
        state.model_state,
        splits[name],
        task=spec.task,
        batch_size=batch_size,
        layout=spec.layout,
        hparams=state.hparams,
    )


def _one_epoch(spec: RunSpec, carry: RunCarry, splits, es_hparams, epoch, test_due, val_due, evals_due):
    """One epoch of one run: (carry, (train, val, test, learning rate, evals)). Vmapped over the runs."""
    state, train_m = epoch_lib.train_epoch(
        carry.state,
        splits["train"],
        epoch,
        task=spec.task,
        tx=spec.tx,
        batch_size=spec.batch_size,
        shuffle=spec.shuffle,
        augment=spec.augment,
        accumulate=spec.accumulate_steps,
        layout=spec.layout,
        norms=spec.norms,
        layers=spec.layers,
    )
    if spec.swa_stats:
        state = averages.with_recomputed_stats(
            spec.tx, spec.task, state, splits["train"], spec.batch_size, epoch, spec.layout
        )
    zero = epoch_lib.Metrics.zeros(spec.metric_names)
    val_m = test_m = zero
    evaluated = optim.evaluation_state(spec.tx, state)
    # test_due and val_due are the same for every run: real branches under vmap.
    if "val" in spec.eval_batch_sizes:
        val_m = jax.lax.cond(val_due, lambda s: _evaluate(spec, "val", s, splits), lambda s: zero, evaluated)
        if spec.eval_both:  # the trained weights too, in the same sums under TRAINED names
            trained = jax.lax.cond(val_due, lambda s: _evaluate(spec, "val", s, splits), lambda s: zero, state)
            val_m = val_m._replace(sums={**val_m.sums, **{TRAINED + k: v for k, v in trained.sums.items()}})
    if "test" in spec.eval_batch_sizes:
        test_m = jax.lax.cond(test_due, lambda s: _evaluate(spec, "test", s, splits), lambda s: zero, evaluated)
    evals = {
        name: jax.lax.cond(evals_due[name], lambda s, n=name: _evaluate(spec, n, s, splits), lambda s: zero, evaluated)
        for name in spec.eval_every
    }
    return conclude_epoch(spec, carry, state, train_m, val_m, test_m, es_hparams, epoch, val_due, evals, evals_due)


def conclude_epoch(
    spec: RunSpec, carry: RunCarry, state, train_m, val_m, test_m, es_hparams, epoch, val_due, evals, evals_due
):
    """Everything an epoch decides once it has trained (`state`, `train_m`) and evaluated (`val_m`, `test_m`,
    the further sets' `evals`; `val_due` and `evals_due` say which were evaluated): early stopping,
    reduce-on-plateau, the best parameters and the non-finite guard. One run; the device-resident epoch and the
    streamed one (whose epoch trains in chunks that the host feeds) both end here. Returns (carry, (train, val,
    test, learning rate, evals))."""
    by_split = {"train": train_m, "val": val_m, **evals}
    # Early stopping sees every epoch (its patience counts epochs); its monitor is observed where it was measured.
    es_state = spec.tracker.update(
        carry.es_state,
        _metric(by_split, spec.tracker.monitor),
        train_m.mean("loss"),
        es_hparams,
        observed=_observed(spec.tracker.monitor, val_due, evals_due),
    )
    learning_rate = spec.tx.learning_rate(state.opt_state).astype(jnp.float32)
    plateau = carry.plateau
    if plateau is not None:
        # reduce_on_plateau is fed only the epochs its monitor was measured: with validation every n epochs its
        # patience and cooldown count validations (as optax's count the values fed to it), not epochs.
        fed = optim.plateau_update(plateau, _metric(by_split, spec.plateau_monitor))
        observed = _observed(spec.plateau_monitor, val_due, evals_due)
        plateau = jax.tree.map(lambda new, old: jnp.where(observed, new, old), fed, plateau)
        state = state._replace(opt_state=spec.tx.with_plateau_scale(state.opt_state, plateau.scale))
    finite = jnp.isfinite(train_m.sums["loss"])
    # A run halted before this epoch keeps everything; a non-finite epoch is discarded and halts the run.
    discard = carry.halted | ~finite
    select = lambda old, nxt: jnp.where(discard, old, nxt)
    improved = ~discard & (es_state.best_epoch == epoch)
    out = RunCarry(
        jax.tree.map(select, carry.state, state),
        jax.tree.map(select, carry.es_state, es_state),
        jax.tree.map(select, carry.plateau, plateau),
        jax.tree.map(
            lambda old, nxt: jnp.where(improved, nxt, old),
            carry.best_params,
            optim.evaluation_state(spec.tx, state).params,  # the parameters that were evaluated
        ),
        discard | (es_state.should_stop if spec.may_stop else False),
    )
    return out, (train_m, val_m, test_m, learning_rate, evals)


def due_for_test(spec: RunSpec, epoch, last_epoch):
    """Whether epoch `epoch` evaluates the logged test split: every `spec.test_every` epochs and the last."""
    return due_every(spec.test_every, epoch, last_epoch)


def validation_due(spec: RunSpec, epoch, last_epoch):
    """Whether epoch `epoch` evaluates the validation split: every `spec.validate_every` epochs and the last."""
    return due_every(spec.validate_every, epoch, last_epoch)


def evals_due_at(spec: RunSpec, epoch, last_epoch) -> dict:
    """Whether epoch `epoch` evaluates each further evaluation set (`spec.eval_every`)."""
    return {name: due_every(every, epoch, last_epoch) for name, every in spec.eval_every.items()}


def make_run_epochs(spec: RunSpec, axis_name: str | None = None):
    """run_epochs(carry, splits, es_hparams, first_epoch, num_epochs, last_epoch) -> (carry, EpochRows).

    `carry` and `es_hparams` have a leading run axis R; `splits` maps "train", "val", "test" to batches, with
    a run axis where `spec.data_axes` says 0. The call runs epochs first_epoch, first_epoch + 1, ... for at most
    min(num_epochs, K) epochs, and stops early once every run has halted; `last_epoch` is the run's last (the
    test split is evaluated there). With `axis_name`, the runs are split over the devices of that mesh axis
    (under `jax.shard_map`): each device runs this program on its own runs, and they agree on when to stop."""
    k = spec.epochs_per_call

    def all_halted(halted):
        done = jnp.all(halted)
        if axis_name is not None:
            done = jax.lax.pmin(done.astype(jnp.int32), axis_name) > 0
        return done

    def run_epochs(
        carry: RunCarry, splits: dict, es_hparams: EarlyStoppingHParams, first_epoch, num_epochs, last_epoch
    ):
        axes = {name: spec.data_axes.get(name) for name in splits}
        one = jax.vmap(
            lambda c, s, h, e, t, v, d: _one_epoch(spec, c, s, h, e, t, v, d),
            in_axes=(0, axes, 0, None, None, None, None),
            spmd_axis_name=_runs_axis(spec),
        )
        runs = carry.halted.shape[0]
        zeros = lambda dtype=jnp.float32: jnp.zeros((runs, k), dtype)
        metrics0 = lambda names: epoch_lib.Metrics({name: zeros() for name in names}, zeros())
        held_out0 = metrics0(spec.metric_names)
        train0, evals0 = metrics0(spec.train_metric_names), {name: held_out0 for name in spec.eval_every}
        val0 = metrics0(spec.val_metric_names)
        rows0 = EpochRows(train0, val0, held_out0, zeros(), zeros(bool), jnp.zeros((), jnp.int32), carry.halted, evals0)
        count = jnp.minimum(num_epochs, k)

        def cond(loop):
            i, _, _, done = loop
            return (i < count) & ~done

        def body(loop):
            i, carry, rows, _ = loop
            epoch = first_epoch + i
            due_test = due_for_test(spec, epoch, last_epoch)
            trained = ~carry.halted
            val_due = validation_due(spec, epoch, last_epoch)
            due_evals = evals_due_at(spec, epoch, last_epoch)
            carry, (train_m, val_m, test_m, lr, evals) = one(carry, splits, es_hparams, epoch, due_test, val_due,
                                                             due_evals)  # fmt: skip
            put = lambda buffer, value: buffer.at[:, i].set(value)
            rows = EpochRows(
                jax.tree.map(put, rows.train, train_m),
                jax.tree.map(put, rows.val, val_m),
                jax.tree.map(put, rows.test, test_m),
                put(rows.learning_rate, lr),
                put(rows.trained, trained),
                i + 1,
                carry.halted,
                jax.tree.map(put, rows.evals, evals),
            )
            return i + 1, carry, rows, all_halted(carry.halted)

        start = (jnp.zeros((), jnp.int32), carry, rows0, all_halted(carry.halted))
        _, carry, rows, _ = jax.lax.while_loop(cond, body, start)
        return carry, rows

    return run_epochs


def _runs_axis(spec: RunSpec) -> str | None:
    """The mesh axis the vmapped run axis lies on: with a layout, each annotation inside gains it."""
    return None if spec.layout is None else "runs"


def make_evaluate(spec: RunSpec):
    """evaluate(state_R, splits) -> {split: Metrics [R]} for the splits in `spec.eval_batch_sizes`: the final
    evaluation of a batch of runs' TrainStates (the held-out splits are shared by the runs, or per run where
    data_axes says)."""

    def evaluate(state, splits):
        def one(s, data):
            return {name: _evaluate(spec, name, s, data) for name in spec.eval_batch_sizes}

        axes = {name: spec.data_axes.get(name) for name in splits}
        return jax.vmap(one, in_axes=(0, axes), spmd_axis_name=_runs_axis(spec))(state, splits)

    return evaluate
