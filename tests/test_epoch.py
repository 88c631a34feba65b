"""The compiled epoch on synthetic arrays: shuffling, padding, masked loss, metrics, compilation, learning."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import task as task_lib
from jaxepochs.models import MLP


def _problem(n: int, features: int = 4, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.integers(0, classes, size=n).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def _model_and_state(x, classes: int = 3, tx=None, hidden=(8,), seed: int = 0):
    """A small MLP, its optimizer and initial TrainState (built in one jitted program: eager ops are slow)."""
    model = MLP(hidden, classes)
    tx = tx if tx is not None else optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)

    @jax.jit
    def init(x_1f):
        init_key, run_key = jax.random.split(jax.random.key(seed))
        params = model.init(init_key, x_1f)["params"]
        return epoch_lib.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), run_key)

    apply_fn = lambda p, xb: model.apply({"params": p}, xb)
    return apply_fn, tx, init(x[:1])


def _full_batch(apply_fn, params, x, y):
    """Mean cross-entropy, accuracy, loss sum and number correct over all rows, computed directly."""

    @jax.jit
    def compute(params):
        logits = apply_fn(params, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        hits = jnp.argmax(logits, -1) == y
        return losses.mean(), hits.mean(), losses.sum(), hits.sum()

    loss, accuracy, loss_sum, correct = compute(params)
    return float(loss), float(accuracy), float(loss_sum), int(correct)


def _task(apply_fn):
    """The classification task of a plain (params, x) -> logits function."""
    return task_lib.make_task(lambda params, model_state, x, key, train: (apply_fn(params, x), model_state))


def _epoch(apply_fn, tx, batch_size, **kwargs):
    """train_epoch as (state, x, y, epoch) -> (state, Metrics)."""
    task = _task(apply_fn)
    epoch = functools.partial(epoch_lib.train_epoch, task=task, tx=tx, batch_size=batch_size, **kwargs)
    return lambda state, x, y, e: epoch(state, {"x": x, "y": y}, e)


def _eval(apply_fn, batch_size):
    """eval_epoch as (params, x, y) -> Metrics."""
    task = _task(apply_fn)
    return lambda params, x, y: epoch_lib.eval_epoch(params, None, {"x": x, "y": y}, task=task, batch_size=batch_size)


def _loss(apply_fn, params, x_b, y_b, mask_b):
    """loss_and_metrics in training: (mean loss, Metrics)."""
    loss, (metrics, _) = epoch_lib.loss_and_metrics(
        _task(apply_fn), params, None, {"x": x_b, "y": y_b}, None, True, mask_b
    )
    return loss, metrics


_batch_indices = jax.jit(epoch_lib.batch_indices, static_argnums=(2, 3, 4))


def test_two_host_devices():
    assert jax.device_count() >= 2
    assert jax.devices()[0].platform == "cpu"


def test_compile_counter_sees_compilations(compile_counter):
    f = jax.jit(lambda a: a * 3 + 1)
    with compile_counter() as first:
        f(jnp.ones(5))
    with compile_counter() as again:
        f(jnp.zeros(5))
    with compile_counter() as new_shape:
        f(jnp.ones(6))
    assert first.count >= 1
    assert again.count == 0
    assert new_shape.count >= 1


@pytest.mark.parametrize("n, b", [(10, 3), (10, 1), (10, 10), (7, 4), (1, 1), (100, 7), (64, 64), (65, 64), (3600, 64)])
def test_batch_indices_cover_every_example_once(n, b):
    idx_sb, mask_sb = _batch_indices(jax.random.key(0), jnp.asarray(1, jnp.int32), n, b)
    idx_sb, mask_sb = np.asarray(idx_sb), np.asarray(mask_sb)
    steps = math.ceil(n / b)
    assert epoch_lib.steps_per_epoch(n, b) == steps
    assert idx_sb.shape == (steps, b)
    assert mask_sb.shape == (steps, b)
    assert mask_sb.dtype == np.bool_
    assert int(mask_sb.sum()) == n
    np.testing.assert_array_equal(np.sort(idx_sb[mask_sb]), np.arange(n))
    assert idx_sb.min() >= 0 and idx_sb.max() < n  # padding gathers a real row, never out of range
    assert not mask_sb[:-1].size or mask_sb[:-1].all()  # only the last batch is padded


def test_batch_indices_unshuffled_is_in_order():
    idx_sb, mask_sb = epoch_lib.batch_indices(None, 0, 7, 3, shuffle=False)
    np.testing.assert_array_equal(np.asarray(idx_sb)[np.asarray(mask_sb)], np.arange(7))


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed_key", "raw_key"])
def test_batch_indices_permutation_depends_on_epoch(make_key):
    key = make_key(0)

    def order(epoch, k=key):
        idx_sb, mask_sb = _batch_indices(k, jnp.asarray(epoch, jnp.int32), 50, 8)
        return np.asarray(idx_sb)[np.asarray(mask_sb)]

    np.testing.assert_array_equal(order(1), order(1))
    orders = [order(e) for e in (1, 2, 3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(orders[i], orders[j])
    assert not np.array_equal(order(1), order(1, make_key(1)))
    assert not np.array_equal(order(1), np.arange(50))


@pytest.mark.parametrize("padding", ["garbage", "repeated_row"])
def test_masked_loss_and_gradient_equal_those_of_the_real_rows(padding):
    x_real, y_real = _problem(5)
    apply_fn, _, state = _model_and_state(x_real)
    if padding == "garbage":
        x_pad = 50.0 * jax.random.normal(jax.random.key(7), (3, 4))
        y_pad = jnp.asarray([2, 0, 1], jnp.int32)
    else:  # what the epoch pads with: index 0, repeated
        x_pad, y_pad = jnp.repeat(x_real[:1], 3, axis=0), jnp.repeat(y_real[:1], 3)
    x_b = jnp.concatenate([x_real, x_pad])
    y_b = jnp.concatenate([y_real, y_pad])
    mask_b = jnp.arange(8) < 5

    def reference(params):
        logits = apply_fn(params, x_real)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_real).mean()

    (loss, metrics), grads = jax.jit(jax.value_and_grad(lambda p: _loss(apply_fn, p, x_b, y_b, mask_b), has_aux=True))(
        state.params
    )
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(state.params)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), grads, ref_grads)
    assert float(metrics.count) == 5.0
    np.testing.assert_allclose(metrics.sums["loss"], 5 * ref_loss, rtol=1e-6)
    _, accuracy, _, correct = _full_batch(apply_fn, state.params, x_real, y_real)
    assert float(metrics.sums["accuracy"]) == correct

    # The padding rows do matter when not masked, so the equality above is the mask's doing.
    unmasked = lambda p: _loss(apply_fn, p, x_b, y_b, jnp.ones(8, bool))[0]
    unmasked_grads = jax.jit(jax.grad(unmasked))(state.params)
    differences = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), unmasked_grads, ref_grads)
    assert max(jax.tree.leaves(differences)) > 1e-4


def test_train_epoch_counts_every_example_exactly_once():
    n, b = 103, 10
    x, y = _problem(n)
    # Learning rate 0: the parameters stay put, so the epoch's sums are those of one full-batch pass.
    apply_fn, tx, state = _model_and_state(x, tx=optax.inject_hyperparams(optax.sgd)(learning_rate=0.0))
    train = jax.jit(_epoch(apply_fn, tx, b))
    new_state, totals = train(state, x, y, jnp.asarray(1, jnp.int32))
    assert float(totals.count) == n
    assert int(new_state.step) == math.ceil(n / b)
    _, _, loss_sum, correct = _full_batch(apply_fn, state.params, x, y)
    np.testing.assert_allclose(float(totals.sums["loss"]), loss_sum, rtol=1e-5)
    assert float(totals.sums["accuracy"]) == correct


def test_train_epoch_metrics_count_with_learning():
    n, b = 103, 10
    x, y = _problem(n)
    apply_fn, tx, state = _model_and_state(x)
    train = jax.jit(_epoch(apply_fn, tx, b))
    new_state, totals = train(state, x, y, jnp.asarray(1, jnp.int32))
    assert float(totals.count) == n
    means = totals.means("train")
    assert set(means) == {"train_loss", "train_accuracy"}
    assert 0.0 <= means["train_accuracy"] <= 1.0
    assert math.isfinite(means["train_loss"])
    unchanged = jax.tree.map(lambda a, c: np.array_equal(a, c), new_state.params, state.params)
    assert not all(jax.tree.leaves(unchanged))


@pytest.mark.parametrize("batch_size", [1, 7, 10, 103])
def test_eval_epoch_matches_full_batch(batch_size):
    x, y = _problem(103, seed=3)
    apply_fn, _, state = _model_and_state(x)
    evaluate = jax.jit(_eval(apply_fn, batch_size))
    totals = evaluate(state.params, x, y)
    means = totals.means("val")
    loss, accuracy, _, _ = _full_batch(apply_fn, state.params, x, y)
    assert float(totals.count) == 103
    np.testing.assert_allclose(means["val_loss"], loss, rtol=1e-5)
    assert means["val_accuracy"] == pytest.approx(accuracy, abs=1e-7)


def test_metrics_means_of_nothing_is_zero_not_nan():
    means = epoch_lib.Metrics.zeros(("loss", "accuracy")).means("val")
    assert means == {"val_loss": 0.0, "val_accuracy": 0.0}


def test_jitted_train_epoch_compiles_once_for_all_epochs(compile_counter):
    x, y = _problem(103)
    apply_fn, tx, state = _model_and_state(x)
    train = jax.jit(_epoch(apply_fn, tx, 10))
    with compile_counter() as first:
        state1, totals1 = train(state, x, y, jnp.asarray(1, jnp.int32))
        jax.block_until_ready(state1)
    cache_size = train._cache_size()
    with compile_counter() as second:
        state2, totals2 = train(state1, x, y, jnp.asarray(2, jnp.int32))
        state3, _ = train(state2, x, y, jnp.asarray(3, jnp.int32))
        jax.block_until_ready(state3)
    assert first.count >= 1
    assert second.count == 0
    assert train._cache_size() == cache_size == 1
    assert int(state3.step) == 3 * 11
    # The two epochs saw different orders (and different parameters), so their sums differ.
    assert float(totals1.sums["loss"]) != float(totals2.sums["loss"])


def test_one_epoch_reduces_the_loss_on_a_separable_problem():
    rng = np.random.default_rng(0)
    n = 256
    y = rng.integers(0, 2, size=n).astype(np.int32)
    x = (rng.normal(size=(n, 4)) + np.where(y[:, None] == 1, 2.0, -2.0)).astype(np.float32)
    x, y = jnp.asarray(x), jnp.asarray(y)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=5e-2)
    apply_fn, tx, state = _model_and_state(x, classes=2, tx=tx)
    train = jax.jit(_epoch(apply_fn, tx, 32))
    evaluate = jax.jit(_eval(apply_fn, 64))

    before = evaluate(state.params, x, y).means("train")
    state, _ = train(state, x, y, jnp.asarray(1, jnp.int32))
    after_one = evaluate(state.params, x, y).means("train")
    for epoch in (2, 3):
        state, totals = train(state, x, y, jnp.asarray(epoch, jnp.int32))
    after_three = evaluate(state.params, x, y).means("train")

    assert after_one["train_loss"] < 0.7 * before["train_loss"]
    assert after_three["train_loss"] < after_one["train_loss"]
    assert after_three["train_accuracy"] >= 0.95
    assert totals.means("train")["train_accuracy"] >= 0.9


@pytest.mark.parametrize("n", [1, 2, 7, 100, 3600, 70000])
def test_permutation_is_a_permutation(n):
    order = np.asarray(jax.jit(lambda k: epoch_lib.permutation(k, n))(jax.random.PRNGKey(n)))
    assert order.dtype == np.int32
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_permutation_is_uniform():
    """Every element lands in every position equally often (chi-square over 20,000 shuffles of 6 elements)."""
    n, draws = 6, 20_000
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    orders = np.asarray(jax.jit(jax.vmap(lambda k: epoch_lib.permutation(k, n)))(keys))
    counts = np.stack([np.bincount(orders[:, pos], minlength=n) for pos in range(n)])
    expected = draws / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 60.0, counts  # 25 degrees of freedom: p < 1e-4 above ~60
    # and whole permutations: all 720 orders appear, none more than twice as often as the mean
    _, perm_counts = np.unique(orders, axis=0, return_counts=True)
    assert len(perm_counts) == 720 and perm_counts.max() < 2 * draws / 720


def test_unshuffled_epoch_is_the_in_order_loop_of_train_step():
    """train.shuffle=False: batches 0..B-1, B..2B-1, ... every epoch, as a plain in-order loop (last one padded)."""
    x, y = _problem(50)
    apply_fn, tx, state = _model_and_state(x)
    epoch_fn = jax.jit(_epoch(apply_fn, tx, 16, shuffle=False))
    fused, _ = epoch_fn(state, x, y, jnp.int32(7))
    step = jax.jit(functools.partial(epoch_lib.train_step, task=_task(apply_fn), tx=tx))
    looped = state
    for start in range(0, 50, 16):
        idx = np.arange(start, start + 16)
        mask = idx < 50
        idx = np.where(mask, idx, 0)
        looped, _ = step(looped, {"x": x[idx], "y": y[idx]}, mask_b=jnp.asarray(mask))
    for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(looped.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_cross_entropy_matches_optax_and_stays_accurate_when_nearly_certain():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 3, (64, 10)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64))
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    np.testing.assert_allclose(task_lib.cross_entropy(logits, y), expected, rtol=1e-5, atol=1e-6)
    # Nearly certain rows: the answer's logit 18-30 above the rest (p_y > 1 - 1e-7), where optax's float32
    # logsumexp rounds to a loss of exactly 0 and a zero gradient on the answer's logit.
    confident = np.zeros((3, 114), np.float32)
    confident[:, 5] = [18.0, 24.0, 30.0]
    labels = jnp.full((3,), 5)
    ours = jax.jit(task_lib.cross_entropy)(jnp.asarray(confident), labels)
    reference = np.log1p(113 * np.exp(-confident[:, 5].astype(np.float64)))  # exact, in float64
    assert float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(confident), labels)[2]) == 0.0
    np.testing.assert_allclose(ours, reference, rtol=1e-5)
    grad_answer = jax.grad(lambda z: task_lib.cross_entropy(z, labels).sum())(jnp.asarray(confident))[:, 5]
    np.testing.assert_allclose(grad_answer, -113 * np.exp(-confident[:, 5].astype(np.float64)), rtol=1e-5)
    # A confidently wrong row (the answer far below another class) stays finite and exact too.
    wrong = jnp.asarray([[0.0, 80.0, -5.0]])
    np.testing.assert_allclose(
        task_lib.cross_entropy(wrong, jnp.asarray([0])), 80.0 + np.log1p(np.exp(-80) + np.exp(-85)), rtol=1e-6
    )


def test_permuting_the_split_whole_equals_gathering_each_batch():
    """Small splits are permuted once per epoch and sliced; large ones gather per batch: the same batches, so the
    same epoch, bit for bit."""
    x, y = _problem(103)
    apply_fn, tx, state = _model_and_state(x)
    outcomes = []
    for permute_whole in (True, False):
        epoch = _epoch(apply_fn, tx, 10, permute_whole=permute_whole)
        outcomes.append(jax.jit(epoch)(state, x, y, jnp.asarray(3, jnp.int32)))
    (state_a, metrics_a), (state_b, metrics_b) = outcomes
    for a, b in zip(
        jax.tree.leaves((state_a.params, metrics_a)), jax.tree.leaves((state_b.params, metrics_b)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
