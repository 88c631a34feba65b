"""Early stopping: Keras 3 semantics by hand and against Keras, jit/scan/vmap, Prechelt's rules, errors."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxepochs.core.early_stopping import (
    STOP_REASONS,
    TRAINER_METRICS,
    EarlyStopping,
    infer_mode,
    stop_reason_name,
    validate_monitor,
)

NAN, INF = math.nan, math.inf
# float32 numbers where value + min_delta < best and value < best - min_delta disagree (see CASES)
F32_0_3 = float(np.float32(0.3))
BELOW_1_7 = float(np.nextafter(np.float32(1.7), np.float32(0)))  # 1.6999999284744263


def loop(es: EarlyStopping, values, train_values=None, update=None):
    """Reference driver: a Python loop of `update`, one epoch at a time."""
    update = update or es.update
    state = es.init()
    for t, value in enumerate(values):
        state = update(state, value) if train_values is None else update(state, value, train_values[t])
    return state


def summary(state):
    return int(state.stop_epoch), int(state.best_epoch), int(state.wait)


def assert_states_equal(a, b):
    for name, x, y in zip(a._fields, a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


# (values, EarlyStopping kwargs, (stop_epoch, best_epoch, wait)); epochs 1-based, 0 = none. Derived by hand
# from Keras 3's on_epoch_end: wait += 1; improvement (the first monitored value always is) -> best, and
# wait = 0 if it also beats the baseline, return; else stop if wait >= patience.
CASES = [
    # patience 0 and 1 both stop at the first non-improving epoch: wait is incremented before the check.
    ([1.0, 0.9, 0.95, 0.8], dict(patience=0), (3, 2, 1)),
    ([1.0, 0.9, 0.95, 0.8, 0.85], dict(patience=1), (3, 2, 1)),
    ([1.0, 0.9, 0.95, 0.92, 0.85, 0.9, 0.9, 0.9, 0.7], dict(patience=3), (8, 5, 3)),
    # min_delta: improvement is value + min_delta < best (dyadic values, so the sums are exact).
    ([1.0, 0.9375, 0.8125, 0.75, 0.625, 0.5625, 0.5625], dict(patience=2, min_delta=0.125), (7, 5, 2)),
    ([1.0, 0.875], dict(min_delta=0.125), (2, 1, 1)),  # a tie at exactly min_delta is no improvement
    # Keras tests float32(value + min_delta) < best: here the sum rounds to 2.0, so no improvement (the
    # algebraically equal value < best - min_delta would call it one and not stop).
    ([2.0, BELOW_1_7], dict(min_delta=F32_0_3), (2, 1, 1)),
    # baseline: improving on the best but not on the baseline records the best yet lets wait keep growing.
    ([1.0, 0.9, 0.8, 0.7], dict(patience=1, baseline=0.5), (0, 4, 4)),
    ([1.0, 0.9, 0.95], dict(patience=1, baseline=0.5), (3, 2, 3)),
    ([1.0, 0.4, 0.45, 0.45, 0.3], dict(patience=2, baseline=0.5), (4, 2, 2)),
    ([0.4, 0.45], dict(baseline=0.5), (2, 1, 1)),
    # start_from_epoch: epochs 1..start_from_epoch are not monitored, however good.
    ([0.5, 0.4, 1.0, 0.9, 0.95], dict(start_from_epoch=2), (5, 4, 1)),
    ([0.5, 0.4, 1.0, 0.9, 0.8], dict(start_from_epoch=2), (0, 5, 0)),
    # mode max, from an accuracy name ("auto") or explicitly.
    ([0.5, 0.6, 0.55, 0.7], dict(monitor="val_accuracy", patience=1), (3, 2, 1)),
    ([0.5, 0.6, 0.65, 0.6, 0.7], dict(monitor="val_acc", patience=2), (0, 5, 0)),
    ([0.5, 0.625, 0.75], dict(monitor="score", mode="max", min_delta=0.125), (2, 1, 1)),
    # NaN never improves; a NaN first value becomes the best (Keras starts from None) and nothing beats it.
    ([1.0, NAN, 0.9], dict(patience=1), (2, 1, 1)),
    ([1.0, NAN, 0.9, NAN, NAN], dict(patience=2), (5, 3, 2)),
    ([NAN, 1.0, 0.5], dict(patience=1), (2, 1, 1)),
    # never stops
    ([1.0, 0.9, 0.8, 0.7], dict(), (0, 4, 0)),
]


@pytest.mark.parametrize("values, kwargs, expected", CASES)
def test_hand_derived_keras_semantics(values, kwargs, expected):
    state = loop(EarlyStopping(**kwargs), values)
    assert summary(state) == expected
    assert bool(state.should_stop) == (expected[0] > 0)
    assert stop_reason_name(state.stop_reason) == ("patience" if expected[0] else "none")


def test_jit_scan_vmap_agree_with_the_python_loop():
    # One compiled update and scan per direction; each case's hyperparameters go in as traced arrays.
    compiled = {}
    for direction in ("min", "max"):
        es = EarlyStopping(monitor="val_metric", mode=direction)
        compiled[direction] = (
            es,
            jax.jit(lambda s, v, h, es=es: es.update(s, v, hparams=h)),
            jax.jit(lambda v, h, es=es: es.run(v, hparams=h)),
        )
    for values, kwargs, expected in CASES:
        case = EarlyStopping(**kwargs)
        reference = loop(case, values)
        assert summary(reference) == expected
        es, update, run = compiled[case.direction]
        hp = case.hparams()
        assert_states_equal(loop(es, values, update=lambda s, v, u=update, hp=hp: u(s, v, hp)), reference)
        padded = np.full(10, 0.0, np.float32)  # trailing epochs past a stop leave the state as it was
        padded[: len(values)] = values
        final, per_epoch = run(padded, hp)
        assert per_epoch.epoch.shape == (10,)
        last = len(values) - 1
        assert_states_equal(jax.tree.map(lambda x, i=last: x[i], per_epoch), reference)
        if expected[0]:
            assert_states_equal(final, reference)
    final, _ = jax.jit(EarlyStopping(patience=3).run)(jnp.asarray(CASES[2][0]))  # hparams from the config
    assert summary(final) == CASES[2][2]

    # vmap over sequences, one config
    es = EarlyStopping(patience=1)
    batch_bt = np.array([[1.0, 0.9, 0.95, 0.8], [1.0, 0.9, 0.8, 0.7], [NAN, 1.0, 0.5, 0.4], [1, 1, 1, 1]], np.float32)
    finals = jax.jit(jax.vmap(lambda v: es.run(v)[0]))(batch_bt)
    for b, values in enumerate(batch_bt):
        assert_states_equal(jax.tree.map(lambda x, b=b: x[b], finals), loop(es, values))
    assert finals.stop_epoch.tolist() == [3, 0, 2, 2]

    # vmap over states, values and hyperparameters at once: patience as a traced [B] array
    patience_b = jnp.array([0, 1, 2, 3])
    hp = es.hparams()._replace(patience=patience_b)
    hp_b = jax.tree.map(lambda x: jnp.broadcast_to(x, patience_b.shape), hp)
    values_t = [1.0, 0.9, 0.95, 0.92, 0.93, 0.94]
    states = jax.tree.map(lambda x: jnp.stack([x] * 4), es.init())
    step = jax.jit(jax.vmap(lambda s, v, h: es.update(s, v, hparams=h), in_axes=(0, None, 0)))
    for value in values_t:
        states = step(states, value, hp_b)
    for b, patience in enumerate([0, 1, 2, 3]):
        expected = loop(EarlyStopping(patience=patience), values_t)
        assert_states_equal(jax.tree.map(lambda x, b=b: x[b], states), expected)
    assert states.stop_epoch.tolist() == [3, 3, 4, 5]


def test_stopped_state_is_frozen():
    es = EarlyStopping(patience=0)
    state = loop(es, [1.0, 1.5])
    assert int(state.stop_epoch) == 2
    later = loop(es, [1.0, 1.5, 0.1, NAN, 0.0])
    assert_states_equal(later, state)
    assert int(later.epoch) == 2


def test_restore_best_flag_and_init_shapes():
    assert EarlyStopping(restore_best=True).restore_best is True
    assert EarlyStopping().restore_best is False
    state = EarlyStopping(k=4).init()
    assert state.train_k.shape == (4,)
    assert all(x.shape == () for name, x in zip(state._fields, state, strict=True) if name != "train_k")
    assert (int(state.best_epoch), int(state.stop_epoch), bool(state.should_stop)) == (0, 0, False)


# ---- parity with Keras itself ------------------------------------------------------------------------------


def _random_configs(n: int, length: int, seed: int = 0):
    """Random runs: noisy downward (min) or upward (max) trends on a 1/32 grid (ties), some NaN and inf."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        mode = ["min", "max", "auto"][rng.integers(3)]
        sign = -1.0 if mode == "max" else 1.0
        trend = rng.uniform(0.0, 0.08)
        walk = 1.0 - trend * np.arange(length) + rng.normal(0, rng.uniform(0.01, 0.1), length).cumsum() * 0.5
        values = np.round(walk * 32) / 32 if rng.random() < 0.5 else walk
        values = np.where(rng.random(length) < 0.04, np.nan, values)
        values = np.where(rng.random(length) < 0.02, np.inf, values)
        values = (sign * values).astype(np.float32)
        finite = values[np.isfinite(values)]
        baseline = None
        if rng.random() < 0.4 and finite.size:
            baseline = float(np.float32(rng.choice(finite) + rng.normal(0, 0.05)))
        kwargs = dict(
            monitor="val_loss" if mode == "auto" else "val_metric",
            mode=mode,
            patience=int(rng.integers(0, 7)),
            min_delta=float(np.float32(rng.choice([0.0, 0.0, 1 / 32, 0.01, 0.05, 0.1]))),
            baseline=baseline,
            start_from_epoch=int(rng.integers(0, 5)) if rng.random() < 0.4 else 0,
        )
        yield values, kwargs


def _keras_run(keras, values, kwargs):
    class Model:
        stop_training = False

    cb = keras.callbacks.EarlyStopping(**kwargs)
    model = Model()
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, value in enumerate(values):
        cb.on_epoch_end(epoch, logs={kwargs["monitor"]: float(value)})
        if model.stop_training:
            break
    stop_epoch = cb.stopped_epoch + 1 if model.stop_training else 0
    best_epoch = 0 if cb.best is None else cb.best_epoch + 1
    best = NAN if cb.best is None else float(cb.best)
    return (stop_epoch, best_epoch, cb.wait), best


def test_parity_with_keras_on_random_sequences():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    length = 25
    configs = list(_random_configs(200, length))
    # Crafted: float32 rounding of value + min_delta, and ties with min_delta, in both directions.
    crafted = [2.0, BELOW_1_7, 1.5, 1.2 + F32_0_3, 1.2, 0.9 + F32_0_3, 0.9, NAN]
    for sign, mode in ((1.0, "min"), (-1.0, "max")):
        for patience in (0, 2):
            values = np.resize(np.float32(sign) * np.array(crafted, np.float32), length)
            configs.append((values, dict(monitor="val_metric", mode=mode, patience=patience, min_delta=F32_0_3)))
    values_bt = np.stack([values for values, _ in configs])

    # Ours: every run at once, per direction, with the hyperparameters batched under vmap.
    ours = [None] * len(configs)
    for direction in ("min", "max"):
        idx = [i for i, (_, kw) in enumerate(configs) if EarlyStopping(**kw).direction == direction]
        es = EarlyStopping(monitor="val_metric", mode=direction)
        hp_b = jax.tree.map(lambda *xs: jnp.stack(xs), *[EarlyStopping(**configs[i][1]).hparams() for i in idx])
        finals = jax.jit(jax.vmap(lambda v, h, es=es: es.run(v, hparams=h)[0]))(values_bt[idx], hp_b)
        for j, i in enumerate(idx):
            ours[i] = jax.tree.map(lambda x, j=j: np.asarray(x[j]), finals)

    stops = 0
    for (values, kwargs), state in zip(configs, ours, strict=True):
        expected, best = _keras_run(keras, values, kwargs)
        assert summary(state) == expected, (values.tolist(), kwargs)
        if expected[1]:
            np.testing.assert_array_equal(state.best_value, np.float32(best))
        stops += expected[0] > 0
    assert 50 < stops < 200  # the sample exercises both outcomes


def test_keras_auto_mode_directions():
    assert [infer_mode(m) for m in TRAINER_METRICS] == ["min", "max", "min", "max"]
    assert infer_mode("val_auc") == "max" and infer_mode("val_acc") == "max" and infer_mode("mse") == "min"
    with pytest.raises(ValueError, match='mode="min" or mode="max"'):
        EarlyStopping(monitor="val_widgets")
    assert EarlyStopping(monitor="val_widgets", mode="max").direction == "max"


# ---- Prechelt ----------------------------------------------------------------------------------------------

GL_VALUES = [1.0, 0.8, 0.7, 0.72, 0.75, 0.74]  # GL(4) = 2.86, GL(5) = 7.14


def test_gl_worked_example():
    state = loop(EarlyStopping(rule="gl", alpha=5.0), GL_VALUES)
    assert (int(state.stop_epoch), stop_reason_name(state.stop_reason), int(state.best_epoch)) == (5, "gl", 3)
    assert int(loop(EarlyStopping(rule="gl", alpha=2.0), GL_VALUES).stop_epoch) == 4
    assert int(loop(EarlyStopping(rule="gl", alpha=10.0), GL_VALUES).stop_epoch) == 0
    assert int(loop(EarlyStopping(rule="gl"), GL_VALUES).stop_epoch) == 5  # default alpha 5


def test_gl_does_not_use_the_training_error():
    es = EarlyStopping(rule="gl", alpha=5.0)
    without = loop(es, GL_VALUES)
    # Training errors that would move GL either way if GL divided by them (E_va / E_tr).
    for train in ([0.01] * 6, [100.0] * 6, [1.0, 0.5, 2.0, 0.1, 9.0, 0.3]):
        assert_states_equal(loop(es, GL_VALUES, train)._replace(train_k=without.train_k), without)
    assert int(without.stop_epoch) == 5


PQ_TRAIN = [1.2, 1.1, 1.0, 0.95, 0.9, 0.89, 0.885, 0.88, 0.88, 0.88]
PQ_VAL = [1.0, 0.9, 0.85, 0.87, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]


def test_pq_worked_example():
    state = loop(EarlyStopping(rule="pq", alpha=0.5, k=5), PQ_VAL, PQ_TRAIN)
    assert (int(state.stop_epoch), stop_reason_name(state.stop_reason)) == (10, "pq")  # GL/P_5 = 1.73 at 10
    assert int(loop(EarlyStopping(rule="pq", alpha=2.0, k=5), PQ_VAL, PQ_TRAIN).stop_epoch) == 0
    assert int(loop(EarlyStopping(rule="gl", alpha=5.0), PQ_VAL).stop_epoch) == 5  # GL_5 fires earlier
    # PQ only looks at strip ends: a flat strip (P_5 = 0, GL/P = inf) from epoch 6 still waits for epoch 10.
    flat = loop(EarlyStopping(rule="pq", alpha=0.5, k=5), PQ_VAL, PQ_TRAIN[:5] + [0.5] * 5)
    assert int(flat.stop_epoch) == 10
    final, _ = jax.jit(EarlyStopping(rule="pq", alpha=0.5, k=5).run)(jnp.array(PQ_VAL), jnp.array(PQ_TRAIN))
    assert int(final.stop_epoch) == 10
    with pytest.raises(ValueError, match="train_value"):
        EarlyStopping(rule="pq").update(EarlyStopping(rule="pq").init(), 1.0)


UP_VALUES = [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.9, 0.95]  # strip ends (k = 2): 0.9, 0.85, 0.87, 0.95


def test_up_worked_example():
    state = loop(EarlyStopping(rule="up", k=2, strips=1), UP_VALUES)
    assert (int(state.stop_epoch), stop_reason_name(state.stop_reason)) == (6, "up")
    assert int(loop(EarlyStopping(rule="up", k=2, strips=2), UP_VALUES).stop_epoch) == 8
    assert int(loop(EarlyStopping(rule="up", k=2, strips=3), UP_VALUES).stop_epoch) == 0
    # "in a row": rises separated by a fall do not add up
    assert int(loop(EarlyStopping(rule="up", k=1, strips=2), [1, 2, 1, 2, 1, 2]).stop_epoch) == 0
    assert int(loop(EarlyStopping(rule="up", k=1, strips=2), [1, 2, 1, 2, 3]).stop_epoch) == 5
    # max mode: a strip end lower than the previous one is worse
    acc = EarlyStopping(monitor="val_accuracy", rule="up", k=1, strips=2)
    assert int(loop(acc, [0.5, 0.6, 0.55, 0.5]).stop_epoch) == 4


# ---- divergence guard --------------------------------------------------------------------------------------


def test_divergence_guard():
    guard = EarlyStopping(patience=10, stop_on_nonfinite=True)
    for bad in (NAN, INF, -INF):
        state = loop(guard, [1.0, 0.9, bad, 0.5])
        assert (int(state.stop_epoch), stop_reason_name(state.stop_reason)) == (3, "divergence")
    assert int(loop(EarlyStopping(patience=10), [1.0, 0.9, NAN, INF]).stop_epoch) == 0  # off by default
    state = loop(EarlyStopping(patience=10, divergence_threshold=2.0), [1.0, 2.0, 3.0])
    assert (int(state.stop_epoch), stop_reason_name(state.stop_reason)) == (3, "divergence")
    acc = EarlyStopping(monitor="val_accuracy", patience=10, divergence_threshold=0.2)
    assert int(loop(acc, [0.5, 0.6, 0.1]).stop_epoch) == 3
    # on top of a Prechelt rule, and during the start_from_epoch warm-up
    assert int(loop(EarlyStopping(rule="gl", stop_on_nonfinite=True), [1.0, NAN]).stop_epoch) == 2
    warm = loop(EarlyStopping(start_from_epoch=5, stop_on_nonfinite=True), [1.0, NAN])
    assert (int(warm.stop_epoch), int(warm.best_epoch)) == (2, 0)


# ---- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="median"), "Valid modes: auto, min, max"),
        (dict(rule="plateau"), "Valid rules: patience, gl, pq, up"),
        (dict(patience=-1), "patience must be an integer >= 0"),
        (dict(patience=1.5), "patience must be an integer >= 0"),
        (dict(min_delta=-0.1), "min_delta must be a finite number >= 0"),
        (dict(start_from_epoch=-2), "start_from_epoch must be an integer >= 0"),
        (dict(rule="pq", k=0), "k must be an integer >= 1"),
        (dict(rule="up", strips=0), "strips must be an integer >= 1"),
        (dict(rule="gl", alpha=-1.0), "alpha must be a number >= 0"),
        (dict(monitor="val_accuracy", rule="gl"), 'Valid rules for mode "max": patience, up'),
        (dict(monitor="val_acc", known_monitors=TRAINER_METRICS), "train_loss, train_accuracy, val_loss"),
        (dict(monitor=""), "monitor must be a non-empty"),
    ],
)
def test_bad_arguments_raise_with_the_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**kwargs)


def test_validate_monitor_and_reason_names():
    assert validate_monitor("val_accuracy") == "val_accuracy"
    with pytest.raises(ValueError, match="Valid monitors: train_loss, train_accuracy, val_loss, val_accuracy"):
        validate_monitor("val_acc")
    with pytest.raises(ValueError, match="Valid monitors: loss, acc"):
        validate_monitor("val_loss", ["loss", "acc"])
    assert STOP_REASONS == ("none", "patience", "gl", "pq", "up", "divergence", "callback", "pruned")
    assert stop_reason_name(jnp.asarray(3)) == "pq"
