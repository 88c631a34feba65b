"""`train.validate_every = n`: the validation split every n epochs and after the last. Early stopping's patience
stays counted in epochs, its rules fire only on validated epochs, and rows of the other epochs have no val_ fields."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TIMED, tiny_config

import jaxepochs
from jaxepochs.core.early_stopping import EarlyStopping
from jaxepochs.host import config as config_lib

NAN = math.nan
TIMINGS = ("train_seconds", *TIMED)


def _feed(es: EarlyStopping, values, observed=None, train_values=None):
    """Every epoch's state, a Python loop of `update`; `observed` None calls it without the argument."""
    state, states = es.init(), []
    for t, value in enumerate(values):
        train = None if train_values is None else train_values[t]
        if observed is None:
            state = es.update(state, value, train)
        else:
            state = es.update(state, value, train, observed=observed[t])
        states.append(state)
    return states


def _assert_same(a, b):
    for name, x, y in zip(a._fields, a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_patience_counts_epochs_not_validations():
    """Validation every 5 epochs, patience 10: a best at epoch 5 and nothing better at 10 and 15 stops at 15."""
    es = EarlyStopping(monitor="val_loss", patience=10, stop_on_nonfinite=True)
    epochs = range(1, 21)
    by_epoch = {5: 1.0, 10: 1.1, 15: 1.2, 20: 0.5}
    values = [by_epoch.get(e, NAN) for e in epochs]  # NaN where not observed: ignored, the guard does not fire
    states = _feed(es, values, [e in by_epoch for e in epochs])
    at = {e: s for e, s in zip(epochs, states, strict=True)}
    assert int(at[4].best_epoch) == 0 and int(at[4].wait) == 0  # no best yet: nothing to wait for
    assert int(at[10].wait) == 5 and not bool(at[10].should_stop)
    assert int(at[14].wait) == 9 and not bool(at[14].should_stop)
    final = states[-1]
    assert bool(final.should_stop) and int(final.stop_epoch) == 15 and int(final.best_epoch) == 5
    assert int(final.wait) == 10 and int(final.stop_reason) == 1  # patience
    assert float(final.best_value) == 1.0


@pytest.mark.parametrize(
    "es",
    [
        EarlyStopping(patience=2, min_delta=0.05),
        EarlyStopping(patience=1, baseline=0.95, start_from_epoch=2),
        EarlyStopping(rule="gl", alpha=3.0, stop_on_nonfinite=True),
        EarlyStopping(rule="pq", k=3),
        EarlyStopping(rule="up", k=2, strips=2, divergence_threshold=5.0),
        EarlyStopping(monitor="val_accuracy", patience=3),
    ],
    ids=["patience", "baseline", "gl", "pq", "up", "max"],
)
def test_observed_every_epoch_is_the_old_update(es):
    values = [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.9, 0.95, NAN, 0.7, 6.0, 0.6]
    train = [1.2, 1.1, 1.0, 0.95, 0.9, 0.89, 0.885, 0.88, 0.88, 0.88, 0.87, 0.86]
    old = _feed(es, values, None, train)
    new = _feed(es, values, [True] * len(values), train)
    traced = _feed(es, values, [jnp.asarray(True)] * len(values), train)
    for a, b, c in zip(old, new, traced, strict=True):
        _assert_same(a, b)
        _assert_same(a, c)


def test_rules_and_the_guard_fire_only_on_observed_epochs():
    gl = EarlyStopping(rule="gl", alpha=1.0, stop_on_nonfinite=True, divergence_threshold=10.0)
    values = [1.0, 50.0, NAN, 1.5, 1.0]  # epochs 2 and 3 unobserved: a GL of 4900 and a NaN, both unseen
    states = _feed(gl, values, [True, False, False, True, True])
    assert [int(s.stop_epoch) for s in states] == [0, 0, 0, 4, 4] and int(states[-1].stop_reason) == 2  # gl
    # UP_1 with strips of 2 validated at their ends: Prechelt's example, the values between strip ends unseen.
    up = EarlyStopping(rule="up", k=2, strips=1)
    every = [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.9, 0.95]
    sparse = [v if e % 2 == 0 else 123.0 for e, v in enumerate(every, 1)]
    full = _feed(up, every)[-1]
    even = _feed(up, sparse, [e % 2 == 0 for e in range(1, 9)])[-1]
    assert int(full.stop_epoch) == int(even.stop_epoch) == 6
    assert float(even.strip_value) == float(full.strip_value)


def test_observed_may_be_traced_under_jit_and_vmap():
    es = EarlyStopping(patience=10)
    every = jnp.asarray([1.0, 1.1, 1.2, 0.5]).repeat(5)  # epochs 1-5: 1.0, 6-10: 1.1, ...
    observed = jnp.arange(1, 21) % 5 == 0

    @jax.jit
    def run(values, observed):
        def body(state, x):
            return es.update(state, x[0], None, None, x[1]), None

        return jax.lax.scan(body, es.init(), (values, observed))[0]

    sparse = jnp.where(observed, every, jnp.nan)
    batched = jax.vmap(run)(jnp.stack([sparse, every]), jnp.stack([observed, jnp.ones(20, bool)]))
    assert batched.stop_epoch.tolist() == [15, 11]  # validated every 5 epochs / every epoch: best 5 / best 1
    assert batched.best_epoch.tolist() == [5, 1]


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


@pytest.mark.xla_defaults  # bit-equality of programs of other shapes: XLA keeps it for its defaults
def test_rows_of_epochs_without_validation_have_no_val_fields(tmp_path):
    common = {"train.epochs": "7", "train.epochs_per_call": "2"}
    every = jaxepochs.train_and_evaluate(tiny_config(common), tmp_path / "every", quiet=True)
    sparse = jaxepochs.train_and_evaluate(
        tiny_config({**common, "train.validate_every": "3", "logging.curves": "True"}), tmp_path / "sparse", quiet=True
    )
    rows = _rows(tmp_path / "sparse")
    assert _untimed(rows) == _untimed(sparse.history)
    assert [row["epoch"] for row in rows] == list(range(1, 8))
    assert [row["epoch"] for row in rows if "val_loss" in row] == [3, 6, 7]
    assert all(not any(k.startswith("val_") for k in row) for row in rows if row["epoch"] not in (3, 6, 7))
    assert all("val_loss" in row for row in every.history)
    # Validation does not change training: the same training losses, exactly.
    assert [row["train_loss"] for row in rows] == [row["train_loss"] for row in _rows(tmp_path / "every")]
    for row in rows:
        if "val_loss" in row:
            assert row["val_loss"] == every.history[row["epoch"] - 1]["val_loss"]
    summary = json.loads((tmp_path / "sparse" / "summary.json").read_text())
    assert summary["best_epoch"] in (3, 6, 7) and summary["best_epoch_metric"] == "val_loss"
    best_row = next(r for r in rows if r["epoch"] == summary["best_epoch"])
    assert summary["best_value"] == pytest.approx(best_row["val_loss"], rel=1e-6)  # float32 on the device
    assert (tmp_path / "sparse" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_early_stopping_with_validation_every_two_epochs(tmp_path):
    stop = {
        "train.epochs": "40",
        "train.validate_every": "2",
        "early_stopping.enabled": "True",
        "early_stopping.patience": "3",
        "model.hidden_sizes": "(64,)",
        "optimizer.learning_rate": "0.03",
    }
    jaxepochs.train_and_evaluate(tiny_config(stop), tmp_path, quiet=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = _rows(tmp_path)
    assert summary["stop_reason"] == "patience", summary
    stopped, best = summary["stopped_epoch"], summary["best_epoch"]
    assert stopped % 2 == 0 and best % 2 == 0 and len(rows) == stopped
    assert stopped - best >= 3  # patience in epochs: here 4, the first validation with 3 epochs waited
    assert "val_loss" in rows[-1] and "val_loss" not in rows[-2]


def test_reduce_on_plateau_decides_on_validated_epochs_only(tmp_path):
    plateau = {
        "train.epochs": "9",
        "train.validate_every": "2",
        "optimizer.learning_rate": "0.05",
        "optimizer.schedule.name": "reduce_on_plateau",
        "optimizer.schedule.patience": "1",
        "optimizer.schedule.factor": "0.5",
    }
    result = jaxepochs.train_and_evaluate(tiny_config(plateau), tmp_path, quiet=True)
    rates = [row["learning_rate"] for row in result.history]
    changed = [e for e in range(1, len(rates)) if rates[e] != rates[e - 1]]  # decided at the end of epoch e
    assert changed and all(e % 2 == 0 for e in changed), rates  # the plateau reduced the rate, after validations


def test_a_cross_validated_sweep_with_validation_every_two_epochs(tmp_path):
    base = tiny_config({"train.epochs": "5", "train.validate_every": "2"})
    grid = [{"optimizer.learning_rate": "0.01"}]
    result = jaxepochs.sweep(base, grid, tmp_path, cv=2, quiet=True)
    for history in result.histories.values():
        assert [row["epoch"] for row in history if "val_loss" in row] == [2, 4, 5]
    (row,) = result.cv
    assert row["val_epochs"] == [2, 4, 5] and row["recommended_epochs"] in (2, 4, 5)
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train.validate_every": "0"}, r"train\.validate_every = 0 is not a positive integer\. Use 1 or more"),
        (
            {
                "train.validate_every": "2",
                "early_stopping.enabled": "True",
                "early_stopping.rule": "up",
                "early_stopping.k": "3",
            },
            r"early_stopping\.k = 3 .*train\.validate_every = 2.*multiples of 2",
        ),
    ],
    ids=["zero", "strips"],
)
def test_bad_validate_every(overrides, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        tiny_config(overrides)
