"""One epoch as one XLA program: on-device shuffle, `lax.scan` over every batch, metrics in the carry.

An epoch uses every training example exactly once: ceil(N / B) steps, the last batch padded to B rows with
index 0 and masked out, so its loss and gradient are those of the real rows alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxepochs.core.metrics import (  # noqa: F401  (epoch's names, as before)
    MAX,
    NORM_SUMS,
    NORMS,
    WEIGHT,
    Metrics,
    combine_sums,
    layer_norm_names,
    layer_norm_sums,
    norm_sums,
    weighted_mean,
)
from jaxepochs.core.task import Task

SHUFFLE_STREAM, DROPOUT_STREAM, AUGMENT_STREAM = 0, 1, 2  # fold_in tags: independent streams from one run key


class TrainState(NamedTuple):
    params: Any  # model parameters
    opt_state: Any  # the optimizer's state (optim.OptState, or another optim.TrainerOptimizer's)
    step: jax.Array  # int32 [] optimizer steps taken
    key: jax.Array  # PRNG key of the run; epochs and steps fold into it, it never advances
    model_state: Any = None  # what the model changes as it trains (BatchNorm's statistics); None or {} if nothing
    hparams: Any = None  # config.hparams' numbers (float32 [] each) passed to the loss, metrics and augment; or None


ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (params, x_b...) -> logits_bc


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


FEISTEL_ROUNDS = 6


def _mix32(x, xp=jnp):
    """murmur3's 32-bit finalizer: every input bit moves every output bit (uint32 in, uint32 out)."""
    x = (x ^ (x >> xp.uint32(16))) * xp.uint32(0x85EBCA6B)
    x = (x ^ (x >> xp.uint32(13))) * xp.uint32(0xC2B2AE35)
    return x ^ (x >> xp.uint32(16))


def feistel_values(round_keys, n: int, xp=jnp):
    """The keyed Feistel bijection of [0, 2^b) (b even, 2^b >= n) applied to every code in order: int32 [2^b],
    whose values below n, in code order, are the permutation. `xp` is jax.numpy or numpy: integer arithmetic
    only, so both give the same values bit for bit (the host computes a streamed run's order with numpy)."""
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = xp.uint32(bits // 2)
    mask = xp.uint32((1 << (bits // 2)) - 1)
    codes = xp.arange(1 << bits, dtype=xp.uint32)
    left, right = codes >> half, codes & mask
    for r in range(FEISTEL_ROUNDS):
        left, right = right, left ^ (_mix32(right ^ round_keys[r], xp) & mask)
    return ((left << half) | right).astype(xp.int32)


def in_batches(order_n, batch_size: int, xp=jnp):
    """An epoch's order as [steps, B] indices, the last batch padded with index 0, and the mask of real rows."""
    n = order_n.shape[0]
    steps = steps_per_epoch(n, batch_size)
    idx_sb = xp.pad(order_n, (0, steps * batch_size - n)).reshape(steps, batch_size)
    return idx_sb, (xp.arange(steps * batch_size) < n).reshape(steps, batch_size)


def permutation(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of [0, n), int32 [n], without a sort.

    A keyed Feistel network (FEISTEL_ROUNDS rounds, murmur3's mixer of each half and a random round key) is a
    bijection of [0, 2^b) whatever its keys, with b even and 2^b >= n; its values below n, in the order of
    their codes, are a permutation of [0, n) (the same construction as grain's index_shuffle, with filtering in
    place of cycle walking). Elementwise work on at most 4n codes, one prefix count and one scatter: on CPU
    0.1 ms for n = 3600 and 2 ms for 100,000, where sorting random keys (jax.random.permutation's method, or
    this module's earlier packed sort) took 0.34 ms and 15 ms. Integer arithmetic only, so numpy computes
    the same order bit for bit wherever the host needs it.
    """
    if n > 1 << 24:  # 2^b codes would cost memory; jax's sort-based permutation is as good there
        return jax.random.permutation(key, n).astype(jnp.int32)
    values = feistel_values(jax.random.bits(key, (FEISTEL_ROUNDS,), jnp.uint32), n)
    keep = values < n
    slot = jnp.where(keep, jnp.cumsum(keep.astype(jnp.int32)) - 1, n)
    return jnp.zeros(n, jnp.int32).at[slot].set(values, mode="drop")


def batch_indices(key: jax.Array, epoch: jax.Array, num_examples: int, batch_size: int, shuffle: bool = True):
    """The epoch's example indices as [steps, B] and their mask: each index in [0, N) once, padding masked."""
    if shuffle:
        order_n = permutation(jax.random.fold_in(key, epoch), num_examples)
    else:
        order_n = jnp.arange(num_examples)
    return in_batches(order_n, batch_size)


def num_examples(data) -> int:
    """The leading axis of a batch (a pytree of arrays with one leading example axis)."""
    return jax.tree.leaves(data)[0].shape[0]


def take(data, idx):
    """The examples `idx` (an index array, or a slice) of every array of a batch."""
    return jax.tree.map(lambda a: a[idx], data)


def loss_and_metrics(
    task: Task, params, model_state, batch, key, train: bool, mask_b=None, hparams=None
) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """The mean loss of a batch, its metric sums and the model's new state: the one loss body of training and
    evaluation.

    `mask_b` (bool [B]) marks the real rows of a padded batch: the mean and the sums are theirs alone. Without
    it every row is real and nothing is masked (on CPU each op in a loop body has a fixed cost: at batch size 1
    the mask's ops were a fifth of a step); `count` is then the batch size, a constant. Evaluation (`train`
    False) uses the task's evaluation loss. `hparams` (config.hparams' traced numbers, or None): the task's
    functions' third argument. A loss or metric may give (values [B], weights [B]): its figure is then
    sum(w * v) / sum(w) over the real rows (Metrics.WEIGHT).
    """
    outputs, model_state = task.apply(params, model_state, batch["x"], key, train)
    extra = () if hparams is None else (hparams,)
    loss = (task.loss if train else task.evaluation_loss())(outputs, batch, *extra)
    values = {"loss": loss, **task.metrics(outputs, batch, *extra)}
    if mask_b is None:
        count = jnp.asarray(num_examples(batch), jnp.float32)
        total = lambda v_b: v_b.sum().astype(jnp.float32)
    else:
        weights_b = mask_b.astype(jnp.float32)
        count = weights_b.sum()
        total = lambda v_b: (v_b * weights_b).sum()
    sums = {}
    for name, value in values.items():
        if isinstance(value, tuple):  # (values, weights): a weighted mean
            v_b, w_b = value
            w_b = w_b.astype(jnp.float32)
            sums[name], sums[name + WEIGHT] = total(v_b * w_b), total(w_b)
        else:
            sums[name] = total(value)
    if "loss" + WEIGHT in sums:
        return weighted_mean(sums["loss"], sums["loss" + WEIGHT]), (Metrics(sums, count), model_state)
    return sums["loss"] / jnp.maximum(count, 1.0), (Metrics(sums, count), model_state)


def _step_key(state: TrainState, stream: int) -> jax.Array:
    """This step's key of a random stream (dropout, augmentation): resuming at any step draws the same keys, and
    XLA drops it where nothing draws from it."""
    return jax.random.fold_in(jax.random.fold_in(state.key, stream), state.step)


def train_step(
    state: TrainState,
    batch,
    *,
    task: Task,
    tx,
    augment=None,
    mask_b=None,
    accumulate: int = 1,
    layout=None,
    norms: bool = False,
    layers: tuple[str, ...] = (),
) -> tuple[TrainState, Metrics]:
    """One optimizer step on a batch of real rows, or of padded ones marked by `mask_b`. Pure. `augment(key,
    batch) -> batch` changes the batch first (random crops, flips, noise). `accumulate` = k > 1 takes the
    gradient as the sum over k micro-batches of B / k rows (rows i, i + k, ...: each device's share of a batch
    split over the data axis holds its share of every micro-batch), each divided by the batch's real rows: the
    gradient of the whole batch's mean loss, in the memory of one micro-batch. `layout` (core/layout.py) keeps
    the batch split over the data axis and the state where it lives. `norms` adds the step's NORM_SUMS to its
    metrics, `layers` (top-level parameter groups) their layer_norm_sums."""
    if augment is not None:
        extra = () if state.hparams is None else (state.hparams,)
        batch = augment(_step_key(state, AUGMENT_STREAM), batch, *extra)
    key = _step_key(state, DROPOUT_STREAM)
    if layout is not None:
        batch = layout.rows(batch)
    if accumulate > 1:
        (metrics, model_state), grads = _accumulated_grads(task, state, batch, key, mask_b, accumulate, layout)
    else:
        loss_fn = lambda params: loss_and_metrics(
            task, params, state.model_state, batch, key, True, mask_b, state.hparams
        )
        (_, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if norms:
        metrics = Metrics({**metrics.sums, **norm_sums(grads, updates, state.params, params)}, metrics.count)
    if layers:
        metrics = Metrics({**metrics.sums, **layer_norm_sums(grads, params, layers)}, metrics.count)
    new_state = TrainState(params, opt_state, state.step + 1, state.key, model_state, state.hparams)
    return (new_state if layout is None else layout.state(new_state)), metrics


def _accumulated_grads(task: Task, state: TrainState, batch, key, mask_b, k: int, layout):
    """((Metrics, model state), gradient) of a batch as k micro-batches, scanned: the micro-batches' metric
    sums added, the model state threaded through them in order, each micro-batch its own dropout key."""
    rows = num_examples(batch)
    micro = lambda a: jnp.swapaxes(a.reshape(rows // k, k, *a.shape[1:]), 0, 1)  # [k, B / k, ...]: rows i::k
    batches = jax.tree.map(micro, batch)
    masks = None if mask_b is None else micro(mask_b)
    count = jnp.asarray(rows, jnp.float32) if mask_b is None else mask_b.astype(jnp.float32).sum()

    def body(carry, inputs):
        grads, totals, model_state = carry
        i, batch_m, mask_m = inputs
        if layout is not None:
            batch_m = layout.rows(batch_m)

        def loss_fn(params):
            _, (metrics, new_state) = loss_and_metrics(
                task, params, model_state, batch_m, jax.random.fold_in(key, i), True, mask_m, state.hparams
            )
            return metrics.sums["loss"] / jnp.maximum(count, 1.0), (metrics, new_state)

        (_, (metrics, model_state)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return (jax.tree.map(jnp.add, grads, g), totals + metrics, model_state), None

    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    _, batch_0, mask_0 = _first((jnp.arange(k), batches, masks))
    shapes = jax.eval_shape(
        lambda: loss_and_metrics(task, state.params, state.model_state, batch_0, key, True, mask_0, state.hparams)
    )
    zeros = jax.tree.map(jnp.zeros_like, shapes[1][0])
    (grads, totals, model_state), _ = jax.lax.scan(
        body, (zero_grads, zeros, state.model_state), (jnp.arange(k), batches, masks)
    )
    return (totals, model_state), grads


# Two steps per loop iteration: XLA fuses across them and the loop's per-iteration cost halves (measured on
# 2 CPU cores: about 20% faster for MNIST-1D's MLP at batch 100 and logistic regression at batch 1, compile
# time about the same).
SCAN_UNROLL = 2
# Up to this size the training split is permuted whole at the start of an epoch (one gather) and the scan
# slices batches from the copy, as a pre-batched loop does: 10-15% faster for MNIST-1D's MLP on CPU than a
# gather per batch. Larger splits gather per batch and need no second copy on the device; so do batches of one
# example, whose gather XLA makes a slice already (the copy only cost time there: 6% of a digits epoch).
PERMUTE_WHOLE_BYTES = 1 << 28


def _nbytes(data) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(data))


def _whole_batches(data_n, idx_sb, permute_whole: bool, in_order: bool):
    """The epoch's whole batches as scan inputs and how a step gets its batch from one: [S, B, ...] arrays
    (sliced in order, or gathered in the epoch's order once), or the indices [S, B] to gather per step."""
    steps, batch_size = idx_sb.shape
    cut = lambda a: a.reshape(steps, batch_size, *a.shape[1:])
    if in_order:  # no permutation: the leading rows are the batches
        return jax.tree.map(lambda a: cut(a[: steps * batch_size]), data_n), lambda batch: batch
    if not permute_whole:
        return idx_sb, lambda idx_b: take(data_n, idx_b)
    order = idx_sb.reshape(-1)
    return jax.tree.map(lambda a: cut(a[order]), data_n), lambda batch: batch


def train_epoch(
    state: TrainState,
    data_n,
    epoch,
    *,
    task: Task,
    tx,
    batch_size: int,
    shuffle: bool = True,
    permute_whole: bool | None = None,
    augment=None,
    accumulate: int = 1,
    layout=None,
    norms: bool = False,
    layers: tuple[str, ...] = (),
):
    """Shuffles with fold_in(key, epoch) (unless `shuffle` is False: batches in order, as some published recipes
    train) and scans over all ceil(N / B) batches of `data_n` (a batch of N examples): the N // B whole batches
    unmasked, then the partial last batch, if any, padded to B rows and masked. `permute_whole` (default: for
    splits up to PERMUTE_WHOLE_BYTES and batches of 2 or more) gathers the epoch's order once instead of per
    batch; the batches and the results are the same. `accumulate`, `layout`, `norms`, `layers`: as `train_step`'s."""
    shuffle_key = jax.random.fold_in(state.key, SHUFFLE_STREAM)
    n = num_examples(data_n)
    idx_sb, mask_sb = batch_indices(shuffle_key, epoch, n, batch_size, shuffle)
    whole = n // batch_size
    if permute_whole is None:
        permute_whole = batch_size > 1 and _nbytes(data_n) <= PERMUTE_WHOLE_BYTES
    inputs, batch_of = _whole_batches(data_n, idx_sb[:whole], permute_whole, in_order=not shuffle)
    if layout is not None and (permute_whole or not shuffle):  # the batches [S, B, ...]: rows over "data"
        inputs = layout.rows(inputs, axis=1)
    step = functools.partial(
        train_step, task=task, tx=tx, augment=augment, accumulate=accumulate, layout=layout, norms=norms, layers=layers
    )

    def body(carry, step_input):
        state, sums = carry
        state, metrics = step(state, batch_of(step_input))
        return (state, combine_sums(sums, metrics.sums)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: step(state, batch_of(_first(inputs)))[1].sums))
    (state, sums), _ = jax.lax.scan(body, (state, zeros), inputs, unroll=SCAN_UNROLL)
    totals = Metrics(sums, jnp.asarray(whole * batch_size, jnp.float32))
    if whole < idx_sb.shape[0]:  # the partial last batch
        state, metrics = step(state, take(data_n, idx_sb[whole]), mask_b=mask_sb[whole])
        totals = totals + metrics
    return state, totals


def _first(inputs):
    return jax.tree.map(lambda a: a[0], inputs)


def eval_epoch(params, model_state, data_n, *, task: Task, batch_size: int, layout=None, hparams=None) -> Metrics:
    """The metric sums over a whole split, in order, in evaluation mode: a scan over its whole batches (sliced,
    unmasked), then the partial last batch, if any, padded and masked as in training. `layout`: each batch's
    rows split over the data axis."""
    n = num_examples(data_n)
    whole = n // batch_size

    def metrics_of(batch, mask_b=None):
        if layout is not None:
            batch = layout.rows(batch)
        return loss_and_metrics(task, params, model_state, batch, None, False, mask_b, hparams)[1][0]

    if whole == 1:  # the usual validation split: one batch, no loop
        totals = metrics_of(take(data_n, slice(0, batch_size)))
    elif whole == 0:
        totals = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: metrics_of(take(data_n, slice(0, n)))))
    else:
        cut = lambda a: a[: whole * batch_size].reshape(whole, batch_size, *a.shape[1:])
        batches = jax.tree.map(cut, data_n)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: metrics_of(_first(batches))))
        totals, _ = jax.lax.scan(lambda t, batch: (t + metrics_of(batch), None), zeros, batches)
    if whole * batch_size < n:
        idx_b = jnp.minimum(jnp.arange(whole * batch_size, (whole + 1) * batch_size), n - 1)
        totals = totals + metrics_of(take(data_n, idx_b), jnp.arange(batch_size) < n - whole * batch_size)
    return totals
