"""Many epochs in one compiled call (`train.epochs_per_call` > 1): a `lax.while_loop` over whole epochs.

Each iteration is the same `train_epoch` and evaluation passes as a one-epoch call, then early stopping's pure
update and the best-epoch parameters, all on the device; the host fetches the metrics of every epoch of the
call at once. For long runs of short epochs (full-batch grokking: one step per epoch) the per-call host work
and dispatch disappear from the epoch.

The loop stops early inside the call when a training loss is non-finite (that epoch's state is discarded, as
in the one-epoch path) or early stopping fires (that epoch's state is kept). Calls begin at any epoch, so a
resumed run continues with the same per-epoch computation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxepochs import epoch as epoch_lib
from jaxepochs import report, schedules
from jaxepochs.early_stopping import EarlyStopping, EarlyStoppingState


class Carry(NamedTuple):
    state: epoch_lib.TrainState
    es_state: EarlyStoppingState
    best_params: Any  # the parameters of es_state.best_epoch
    halted: jax.Array  # bool [] a non-finite loss or early stopping ended the run: later calls change nothing

    @staticmethod
    def start(state, es_state, best_params) -> Carry:
        return Carry(state, es_state, best_params, jnp.zeros((), bool))


class EpochRows(NamedTuple):
    """Per epoch of the call, [K] each; entries past `ran` are zeros."""

    train: epoch_lib.Metrics
    val: epoch_lib.Metrics
    test: epoch_lib.Metrics  # count 0 on epochs the test split was not evaluated (train.test_every)
    learning_rate: jax.Array  # float32 [K]
    ran: jax.Array  # int32 [] epochs computed in this call (the last one may be the non-finite one)
    halted: jax.Array  # bool [] a non-finite loss or early stopping ended the loop


def _metric(metrics: epoch_lib.Metrics, name: str) -> jax.Array:
    """`loss` or `accuracy` as a mean, on the device (the host's Metrics.means)."""
    count = jnp.maximum(metrics.count, 1.0)
    return (metrics.loss_sum if name == "loss" else metrics.correct) / count


def make_run_epochs(
    *,
    apply_fn,
    tx,
    batch_size: int,
    eval_batch_sizes: dict[str, int],
    tracker: EarlyStopping,
    may_stop: bool,
    epochs_per_call: int,
    test_every: int,
    shuffle: bool = True,
):
    """(carry, splits, first_epoch, last_epoch) -> (carry, EpochRows): up to `epochs_per_call` epochs from
    `first_epoch`, never past `last_epoch`. `splits` maps train/val/test to (x_n, y_n); val and test are
    evaluated when they appear in `eval_batch_sizes` (test on epochs divisible by `test_every`, and the last)."""
    monitor_split, monitor_metric = tracker.monitor.split("_", 1)
    k = epochs_per_call

    def evaluate(name, params, splits):
        x_n, y_n = splits[name]
        return epoch_lib.eval_epoch(params, x_n, y_n, apply_fn=apply_fn, batch_size=eval_batch_sizes[name])

    def run(carry: Carry, splits: dict, first_epoch: jax.Array, last_epoch: jax.Array, es_hparams=None):
        """`es_hparams`: early stopping's numeric hyperparameters as arrays (a sweep's per-run values)."""
        zeros_k = epoch_lib.Metrics(*(jnp.zeros((k,), jnp.float32) for _ in range(3)))
        rows0 = (zeros_k, zeros_k, zeros_k, jnp.zeros((k,), jnp.float32))
        n = jnp.minimum(k, last_epoch - first_epoch + 1)

        def cond(loop):
            i, _, _, halted = loop
            return (i < n) & ~halted

        def body(loop):
            i, carry, rows, _ = loop
            epoch = first_epoch + i
            x_n, y_n = splits["train"]
            state, train_m = epoch_lib.train_epoch(
                carry.state, x_n, y_n, epoch, apply_fn=apply_fn, tx=tx, batch_size=batch_size, shuffle=shuffle
            )
            zero = epoch_lib.Metrics.zeros()
            val_m = evaluate("val", state.params, splits) if "val" in eval_batch_sizes else zero
            test_m = zero
            if "test" in eval_batch_sizes:
                due = (epoch % test_every == 0) | (epoch == last_epoch)
                test_m = jax.lax.cond(due, lambda p: evaluate("test", p, splits), lambda p: zero, state.params)
            by_split = {"train": train_m, "val": val_m}
            value = _metric(by_split[monitor_split], monitor_metric)
            es_state = tracker.update(carry.es_state, value, _metric(train_m, "loss"), es_hparams)
            finite = jnp.isfinite(train_m.loss_sum)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            improved = es_state.best_epoch == epoch
            best = jax.tree.map(lambda a, b: jnp.where(finite & improved, a, b), state.params, carry.best_params)
            halted = ~finite | (es_state.should_stop if may_stop else False)
            carry = Carry(keep(state, carry.state), keep(es_state, carry.es_state), best, halted)
            lr = schedules.learning_rate_of(state.opt_state).astype(jnp.float32)
            put = lambda buffer, value: buffer.at[i].set(value)
            rows = (
                jax.tree.map(put, rows[0], train_m),
                jax.tree.map(put, rows[1], val_m),
                jax.tree.map(put, rows[2], test_m),
                put(rows[3], lr),
            )
            return i + 1, carry, rows, halted

        halted = carry.halted | (carry.es_state.should_stop if may_stop else False)
        i, carry, rows, halted = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, rows0, halted))
        return carry, EpochRows(*rows, ran=i, halted=halted)

    return run


def call_rows(rows: EpochRows, first_epoch: int, steps_per_epoch: int, run: int | None = None):
    """The metrics.jsonl rows of the epochs a call ran (of run `run` of a sweep's batched rows), and whether the
    call ended at a non-finite training loss (that epoch is not among the rows: its state was discarded)."""
    take = (lambda a, i: a[i]) if run is None else (lambda a, i: a[run, i])
    ran = int(rows.ran if run is None else rows.ran[run])
    out = []
    for i in range(ran):
        pick = lambda metrics, i=i: epoch_lib.Metrics(*(take(a, i) for a in metrics))
        epoch = first_epoch + i
        val = pick(rows.val) if float(take(rows.val.count, i)) > 0 else None
        test = pick(rows.test) if float(take(rows.test.count, i)) > 0 else None
        row = report.metrics_row(
            epoch, epoch * steps_per_epoch, pick(rows.train), val, test, take(rows.learning_rate, i)
        )
        if not math.isfinite(row["train_loss"]):
            return out, True
        out.append(row)
    return out, False
