"""The streamed epoch's programs: an epoch as a sequence of compiled chunks that the host feeds.

Where a split does not fit the device (or `data.stream` asks for it), the host reads the epoch's batches in the
epoch's order a chunk at a time, and these programs consume them:

    train_chunk(carry_R, sums_R, batches_CxB, mask_CxB) -> (carry_R, sums_R)    C optimizer steps
    eval_chunk(state_R, sums_R, batches_CxB, mask_CxB) -> sums_R                C evaluation batches
    conclude(carry_at_start_R, carry_R, train_R, val_R, test_R, es_hparams_R, epoch, val_due, evals_R, evals_due)
        -> (carry_R, rows)

`conclude` is `program.conclude_epoch`, the same code that ends a device-resident epoch: early stopping,
reduce-on-plateau, the best parameters and the non-finite guard are written once. Every step takes its batch's
mask (the padding of an epoch's last batch, or of a pass's last batch with `train.steps_per_epoch`), so one
program serves any chunk wherever it falls. Batches are shared by the runs (`in_axes` None): a chunk read once
serves them all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import optim
from jaxepochs.core import program as program_lib


def make_train_chunk(spec: program_lib.RunSpec):
    """train_chunk(carry_R, sums_R, batches_CxB, mask_CxB) -> (carry_R, sums_R): C masked training steps of each
    run that has not halted (a halted run's state is kept), its metric sums added to `sums_R`."""
    step = functools.partial(
        epoch_lib.train_step,
        task=spec.task,
        tx=spec.tx,
        augment=spec.augment,
        accumulate=spec.accumulate_steps,
        layout=spec.layout,
        norms=spec.norms,
        layers=spec.layers,
    )

    def one(carry: program_lib.RunCarry, sums: epoch_lib.Metrics, batches, mask):
        def body(loop, inputs):
            state, totals = loop
            state, metrics = step(state, inputs[0], mask_b=inputs[1])
            return (state, totals + metrics), None

        (state, sums), _ = jax.lax.scan(body, (carry.state, sums), (batches, mask), unroll=epoch_lib.SCAN_UNROLL)
        state = jax.tree.map(lambda old, new: jnp.where(carry.halted, old, new), carry.state, state)
        return carry._replace(state=state), sums

    return jax.vmap(one, in_axes=(0, 0, None, None))


def make_eval_chunk(spec: program_lib.RunSpec, trained: bool = True):
    """eval_chunk(state_R, sums_R, batches_CxB, mask_CxB) -> sums_R: evaluation-mode metric sums of C batches.
    `trained`: the states are training's, evaluated at the optimizer's evaluation parameters (the epoch's
    validation and test); False: they are already (the final states, best epoch's parameters restored)."""

    def one(state: epoch_lib.TrainState, sums: epoch_lib.Metrics, batches, mask):
        state = optim.evaluation_state(spec.tx, state) if trained else state

        def body(totals, inputs):
            batch, mask_b = inputs
            _, (metrics, _) = epoch_lib.loss_and_metrics(
                spec.task, state.params, state.model_state, batch, None, False, mask_b, state.hparams
            )
            return totals + metrics, None

        return jax.lax.scan(body, sums, (batches, mask))[0]

    return jax.vmap(one, in_axes=(0, 0, None, None))


def make_conclude(spec: program_lib.RunSpec):
    """conclude(carry_at_start_R, carry_R, train_R, val_R, test_R, es_hparams_R, epoch, val_due, evals_R,
    evals_due) -> (carry_R, EpochRows with K = 1): the end of a streamed epoch, by the device-resident epoch's own
    code (`evals_R`: the further evaluation sets' sums, `evals_due` which of them were evaluated)."""

    def one(start, carry, train_m, val_m, test_m, es_hparams, epoch, val_due, evals, evals_due):
        return program_lib.conclude_epoch(
            spec, start, carry.state, train_m, val_m, test_m, es_hparams, epoch, val_due, evals, evals_due
        )

    def conclude(start, carry, train_m, val_m, test_m, es_hparams, epoch, val_due, evals, evals_due):
        trained = ~start.halted
        out, (train_m, val_m, test_m, lr, evals) = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, None, None, 0, None))(
            start, carry, train_m, val_m, test_m, es_hparams, epoch, val_due, evals, evals_due
        )
        column = lambda a: a[:, None]
        rows = program_lib.EpochRows(
            jax.tree.map(column, train_m),
            jax.tree.map(column, val_m),
            jax.tree.map(column, test_m),
            column(lr),
            column(trained),
            jnp.ones((), jnp.int32),
            out.halted,
            jax.tree.map(column, evals),
        )
        return out, rows

    return conclude


def with_trained(spec: program_lib.RunSpec, val_m: epoch_lib.Metrics, trained: epoch_lib.Metrics):
    """The validation sums `val_m` and, with train.eval_weights "both", the trained weights' (`trained`) beside
    them under program.TRAINED names."""
    if not spec.eval_both:
        return val_m
    return val_m._replace(sums={**val_m.sums, **{program_lib.TRAINED + k: v for k, v in trained.sums.items()}})


def make_validate_and_conclude(spec: program_lib.RunSpec):
    """validate_and_conclude(carry_at_start_R, carry_R, train_R, val_chunks, test_R, es_hparams_R, epoch, val_due,
    evals_R, evals_due) -> (carry_R, rows): the validation split's chunks (kept on the device) evaluated when due,
    then `conclude`, in one call: a streamed epoch of small data ends in one program, not two."""
    eval_chunk, conclude = make_eval_chunk(spec), make_conclude(spec)
    trained_chunk = make_eval_chunk(spec, trained=False)  # "both": the trained weights as they are

    def validate_and_conclude(start, carry, train_m, val_chunks, test_m, es_hparams, epoch, val_due, *evals):
        zero = zero_sums(spec, carry.halted.shape[0])

        def validate(state):
            sums = trained = zero
            for chunk in val_chunks:
                batch = {"x": chunk["x"], "y": chunk["y"]}
                sums = eval_chunk(state, sums, batch, chunk["mask"])
                if spec.eval_both:
                    trained = trained_chunk(state, trained, batch, chunk["mask"])
            return with_trained(spec, sums, trained)

        no_val = zero_sums(spec, carry.halted.shape[0], val=True)
        val_m = jax.lax.cond(val_due, validate, lambda state: no_val, carry.state)
        return conclude(start, carry, train_m, val_m, test_m, es_hparams, epoch, val_due, *evals)

    return validate_and_conclude


def zero_sums(spec: program_lib.RunSpec, runs: int, train: bool = False, val: bool = False) -> epoch_lib.Metrics:
    """Metric sums of no examples, for `runs` runs: a held-out split's, (`train`) the training split's, or (`val`)
    the validation split's (with train.eval_weights "both", its trained weights' too)."""
    names = spec.train_metric_names if train else spec.val_metric_names if val else spec.metric_names
    zero = epoch_lib.Metrics.zeros(names)
    return jax.tree.map(lambda a: jnp.zeros((runs, *a.shape), a.dtype), zero)
