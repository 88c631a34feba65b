"""One epoch as one XLA program: on-device shuffle, `lax.scan` over every batch, metrics in the carry.

An epoch uses every training example exactly once: ceil(N / B) steps, the last batch padded to B rows with
index 0 and masked out, so its loss and gradient are those of the real rows alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SHUFFLE_STREAM, DROPOUT_STREAM = 0, 1  # fold_in tags: independent random streams from one run key


class TrainState(NamedTuple):
    params: Any  # model parameters
    opt_state: Any  # the optimizer's state (optim.OptState: holds the learning rate)
    step: jax.Array  # int32 [] optimizer steps taken
    key: jax.Array  # PRNG key of the run; epochs and steps fold into it, it never advances


class Metrics(NamedTuple):
    """Sums over the examples seen; divided once, on the host, at the end of the epoch."""

    loss_sum: jax.Array  # float32 []
    correct: jax.Array  # float32 []
    count: jax.Array  # float32 [] real (unmasked) examples

    @staticmethod
    def zeros() -> Metrics:
        return Metrics(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    def __add__(self, other: Metrics) -> Metrics:  # type: ignore[override]
        return Metrics(*(a + b for a, b in zip(self, other, strict=True)))

    def means(self, prefix: str) -> dict[str, float]:
        count = max(float(self.count), 1.0)
        return {
            f"{prefix}_loss": float(self.loss_sum) / count,
            f"{prefix}_accuracy": float(self.correct) / count,
        }


ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (params, x_b...) -> logits_bc


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


FEISTEL_ROUNDS = 6


def _mix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer: every input bit moves every output bit (uint32 in, uint32 out)."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


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
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = bits // 2
    mask = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.bits(key, (FEISTEL_ROUNDS,), jnp.uint32)
    codes = jnp.arange(1 << bits, dtype=jnp.uint32)
    left, right = codes >> half, codes & mask
    for r in range(FEISTEL_ROUNDS):
        left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    values = ((left << half) | right).astype(jnp.int32)
    keep = values < n
    slot = jnp.where(keep, jnp.cumsum(keep.astype(jnp.int32)) - 1, n)
    return jnp.zeros(n, jnp.int32).at[slot].set(values, mode="drop")


def batch_indices(key: jax.Array, epoch: jax.Array, num_examples: int, batch_size: int, shuffle: bool = True):
    """The epoch's example indices as [steps, B] and their mask: each index in [0, N) once, padding masked."""
    steps = steps_per_epoch(num_examples, batch_size)
    if shuffle:
        order_n = permutation(jax.random.fold_in(key, epoch), num_examples)
    else:
        order_n = jnp.arange(num_examples)
    pad = steps * batch_size - num_examples
    idx_sb = jnp.pad(order_n, (0, pad)).reshape(steps, batch_size)
    mask_sb = (jnp.arange(steps * batch_size) < num_examples).reshape(steps, batch_size)
    return idx_sb, mask_sb


def _class_sum(x_bc: jax.Array, fixed_order: bool) -> jax.Array:
    """x.sum(-1); with `fixed_order`, halves added pairwise. XLA's row reduction sums in an order that depends on
    the shape around it (the number of runs in a sweep), so a run's held-out loss differed in its last bit
    between a sweep and the run alone; evaluation sums in the fixed order. Training does not (it costs 0.4 us a
    step at batch size 1 on CPU, half the step) and has not needed to: its sums came out the same."""
    if not fixed_order:
        return x_bc.sum(-1)
    width = 1 << max(x_bc.shape[-1] - 1, 0).bit_length()
    x_bc = jnp.pad(x_bc, [(0, 0)] * (x_bc.ndim - 1) + [(0, width - x_bc.shape[-1])])
    while x_bc.shape[-1] > 1:
        half = x_bc.shape[-1] // 2
        x_bc = x_bc[..., :half] + x_bc[..., half:]
    return x_bc[..., 0]


def cross_entropy(logits_bc: jax.Array, y_b: jax.Array, fixed_order: bool = False) -> jax.Array:
    """-log softmax(logits)[y] per row [B], accurate to float32's relative precision at any confidence.

    With z = logits - logits[y] and m = max(z) >= 0, -log p_y = m + log1p(sum_{j != y} exp(z_j - m) + expm1(-m)).
    The usual logsumexp form rounds 1 + tiny to 1 once p_y > 1 - 6e-8, so the loss and the gradient on the
    correct logit become exactly 0 while weight decay still pulls; Nanda et al. (2023) compute their grokking loss
    in float64 for this reason. This form keeps both in float32, as fast as optax's loss on CPU.
    """
    is_label_bc = jnp.arange(logits_bc.shape[-1]) == y_b[:, None]
    # The answer's logit by a masked sum, not take_along_axis: a gather costs more than the whole loss on CPU.
    z_bc = logits_bc - _class_sum(jnp.where(is_label_bc, logits_bc, 0.0), fixed_order)[:, None]
    m_b = jax.lax.stop_gradient(z_bc.max(-1))  # the identity holds for any m; the max keeps exp() in range
    others_b = _class_sum(jnp.where(is_label_bc, 0.0, jnp.exp(z_bc - m_b[:, None])), fixed_order)
    return m_b + jnp.log1p(others_b + jnp.expm1(-m_b))


def loss_and_metrics(
    apply_fn: ApplyFn, params, x_b, y_b, mask_b=None, fixed_order: bool = False
) -> tuple[jax.Array, Metrics]:
    """The mean cross-entropy of a batch and its metric sums: the one loss body of training and evaluation.

    `mask_b` (bool [B]) marks the real rows of a padded batch: the mean and the sums are theirs alone. Without
    it every row is real and nothing is masked (on CPU each op in a loop body has a fixed cost: at batch size 1
    the mask's ops were a fifth of a step); `count` is then the batch size, a constant. `fixed_order`: see
    `cross_entropy` (evaluation).
    """
    logits_bc = apply_fn(params, x_b)
    losses_b = cross_entropy(logits_bc, y_b, fixed_order)
    correct_b = jnp.argmax(logits_bc, -1) == y_b
    if mask_b is None:
        count = jnp.asarray(y_b.shape[0], jnp.float32)
        loss_sum, correct = losses_b.sum(), correct_b.sum().astype(jnp.float32)
    else:
        weights_b = mask_b.astype(jnp.float32)
        count = weights_b.sum()
        loss_sum, correct = (losses_b * weights_b).sum(), (correct_b * weights_b).sum()
    return loss_sum / jnp.maximum(count, 1.0), Metrics(loss_sum, correct, count)


def train_step(state: TrainState, batch, *, apply_fn: ApplyFn, tx) -> tuple[TrainState, Metrics]:
    """One optimizer step on a batch (x_b, y_b) of real rows, or (x_b, y_b, mask_b) padded. Pure."""
    loss_fn = lambda params: loss_and_metrics(apply_fn, params, *batch)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1, state.key), metrics


# Two steps per loop iteration: XLA fuses across them and the loop's per-iteration cost halves (measured on
# 2 CPU cores: about 20% faster for MNIST-1D's MLP at batch 100 and logistic regression at batch 1, compile
# time about the same).
SCAN_UNROLL = 2
# Up to this size the training split is permuted whole at the start of an epoch (one gather) and the scan
# slices batches from the copy, as a pre-batched loop does: 10-15% faster for MNIST-1D's MLP on CPU than a
# gather per batch. Larger splits gather per batch and need no second copy on the device; so do batches of one
# example, whose gather XLA makes a slice already (the copy only cost time there: 6% of a digits epoch).
PERMUTE_WHOLE_BYTES = 1 << 28


def _whole_batches(x_n, y_n, idx_sb, permute_whole: bool, in_order: bool):
    """The epoch's whole batches as scan inputs and how a step gets its batch from one: [S, B, ...] arrays
    (sliced in order, or gathered in the epoch's order once), or the indices [S, B] to gather per step."""
    steps, batch_size = idx_sb.shape
    if in_order:  # no permutation: the leading rows are the batches
        cut = lambda a: a[: steps * batch_size].reshape(steps, batch_size, *a.shape[1:])
        return (cut(x_n), cut(y_n)), lambda batch: batch
    if not permute_whole:
        return idx_sb, lambda idx_b: (x_n[idx_b], y_n[idx_b])
    order = idx_sb.reshape(-1)
    xs = x_n[order].reshape(steps, batch_size, *x_n.shape[1:])
    return (xs, y_n[order].reshape(steps, batch_size)), lambda batch: batch


def train_epoch(
    state: TrainState,
    x_n,
    y_n,
    epoch,
    *,
    apply_fn: ApplyFn,
    tx,
    batch_size: int,
    shuffle: bool = True,
    permute_whole: bool | None = None,
):
    """Shuffles with fold_in(key, epoch) (unless `shuffle` is False: batches in order, as some published recipes
    train) and scans over all ceil(N / B) batches: the N // B whole batches unmasked, then the partial last
    batch, if any, padded to B rows and masked. `permute_whole` (default: for splits up to PERMUTE_WHOLE_BYTES
    and batches of 2 or more) gathers the epoch's order once instead of per batch; the batches and the results
    are the same."""
    shuffle_key = jax.random.fold_in(state.key, SHUFFLE_STREAM)
    num_examples = x_n.shape[0]
    idx_sb, mask_sb = batch_indices(shuffle_key, epoch, num_examples, batch_size, shuffle)
    whole = num_examples // batch_size
    if permute_whole is None:
        permute_whole = batch_size > 1 and x_n.size * x_n.dtype.itemsize <= PERMUTE_WHOLE_BYTES
    inputs, batch_of = _whole_batches(x_n, y_n, idx_sb[:whole], permute_whole, in_order=not shuffle)

    def body(carry, step_input):
        state, loss_sum, correct = carry
        state, metrics = train_step(state, batch_of(step_input), apply_fn=apply_fn, tx=tx)
        return (state, loss_sum + metrics.loss_sum, correct + metrics.correct), None

    zero = jnp.zeros((), jnp.float32)
    (state, loss_sum, correct), _ = jax.lax.scan(body, (state, zero, zero), inputs, unroll=SCAN_UNROLL)
    totals = Metrics(loss_sum, correct, jnp.asarray(whole * batch_size, jnp.float32))
    if whole < idx_sb.shape[0]:  # the partial last batch
        idx_b, mask_b = idx_sb[whole], mask_sb[whole]
        state, metrics = train_step(state, (x_n[idx_b], y_n[idx_b], mask_b), apply_fn=apply_fn, tx=tx)
        totals = totals + metrics
    return state, totals


def eval_epoch(params, x_n, y_n, *, apply_fn: ApplyFn, batch_size: int) -> Metrics:
    """Loss and accuracy sums over a whole split, in order: a scan over its whole batches (sliced, unmasked),
    then the partial last batch, if any, padded and masked as in training."""
    n = x_n.shape[0]
    whole = n // batch_size
    metrics_of = lambda x_b, y_b, mask_b=None: loss_and_metrics(apply_fn, params, x_b, y_b, mask_b, fixed_order=True)[1]
    totals = Metrics.zeros()
    if whole == 1:  # the usual validation split: one batch, no loop
        totals = metrics_of(x_n[:batch_size], y_n[:batch_size])
    elif whole > 1:
        cut = lambda a: a[: whole * batch_size].reshape(whole, batch_size, *a.shape[1:])
        body = lambda totals, batch: (totals + metrics_of(*batch), None)
        totals, _ = jax.lax.scan(body, totals, (cut(x_n), cut(y_n)))
    if whole * batch_size < n:
        idx_b = jnp.minimum(jnp.arange(whole * batch_size, (whole + 1) * batch_size), n - 1)
        totals = totals + metrics_of(x_n[idx_b], y_n[idx_b], jnp.arange(batch_size) < n - whole * batch_size)
    return totals
