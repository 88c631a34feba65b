"""Epochs per compiled call (`train.epochs_per_call`: N, or 0 for the host's pace) never change a run: the same
run program runs every epoch, so the rows and states are equal bit for bit whatever the calls' sizes."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from conftest import TIMED, tiny_config

import jaxepochs
from jaxepochs.host import config as config_lib

TIMINGS = ("train_seconds", *TIMED)


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def _run(tmp_path, name: str, overrides: dict):
    workdir = tmp_path / name
    result = jaxepochs.train_and_evaluate(tiny_config(overrides), workdir, quiet=True)
    return result, _rows(workdir), json.loads((workdir / "summary.json").read_text())


def _record_calls(monkeypatch) -> list[tuple[int, int]]:
    """Records the (first epoch, epochs) of every call of the run program."""
    from jaxepochs.host.batch import RunBatch

    calls = []
    caller = RunBatch.caller

    def recording(self, *args, **kwargs):
        call = caller(self, *args, **kwargs)

        def run_epochs(carry, first_epoch, count):
            calls.append((first_epoch, count))
            return call(carry, first_epoch, count)

        return run_epochs

    monkeypatch.setattr(RunBatch, "caller", recording)
    return calls


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.xla_defaults  # bit-equality of programs of other shapes: XLA keeps it for its defaults
@pytest.mark.parametrize("per_call", ["3", "0"], ids=["three", "automatic"])
def test_many_epochs_per_call_equal_one_epoch_per_call(tmp_path, monkeypatch, per_call):
    common = {"train.epochs": "7", "train.log_test": "True", "train.test_every": "3"}
    one, one_rows, one_summary = _run(tmp_path, "one", {**common, "train.epochs_per_call": "1"})
    calls = _record_calls(monkeypatch)
    # Automatic: one epoch, then (measured) the rest in one call, as 6 epochs take far less than the interval
    # between the host's looks (60 s here, not the default 0.5 s: a busy machine made this test flaky).
    paced = {"train.host_interval_seconds": "60"} if per_call == "0" else {}
    many, many_rows, many_summary = _run(tmp_path, "many", {**common, "train.epochs_per_call": per_call, **paced})
    assert calls == ([(1, 3), (4, 3), (7, 1)] if per_call == "3" else [(1, 1), (2, 6)])
    assert len(many_rows) == 7
    assert _untimed(one_rows) == _untimed(many_rows)
    # The test split is evaluated on epochs 3 and 6 and after the last one only.
    assert [row["epoch"] for row in many_rows if "test_loss" in row] == [3, 6, 7]
    assert many_summary["best_epoch"] == one_summary["best_epoch"]
    _same(one.state, many.state)


@pytest.mark.xla_defaults  # bit-equality of programs of other shapes: XLA keeps it for its defaults
def test_fused_early_stopping_stops_at_the_same_epoch_and_restores_best(tmp_path):
    stop = {
        "train.epochs": "30",
        "early_stopping.enabled": "True",
        "early_stopping.patience": "2",
        "early_stopping.restore_best": "True",
        "model.hidden_sizes": "(64,)",
        "optimizer.learning_rate": "0.03",
    }
    one, one_rows, one_summary = _run(tmp_path, "one", {**stop, "train.epochs_per_call": "1"})
    fused, fused_rows, fused_summary = _run(tmp_path, "fused", {**stop, "train.epochs_per_call": "8"})
    assert one_summary["stop_reason"] == fused_summary["stop_reason"] == "patience"
    assert fused_summary["stopped_epoch"] == one_summary["stopped_epoch"] < 30
    assert len(fused_rows) == len(one_rows) == one_summary["stopped_epoch"]  # nothing past the stop is logged
    assert _untimed(fused_rows) == _untimed(one_rows)
    assert fused_summary["best_epoch"] == one_summary["best_epoch"]
    assert fused_summary["val_loss"] == one_summary["val_loss"]  # the best epoch's
    assert fused_summary["val_loss"] == pytest.approx(fused_rows[fused_summary["best_epoch"] - 1]["val_loss"], 1e-6)
    _same(one.state, fused.state)


def test_fused_non_finite_loss_keeps_the_last_good_epoch(tmp_path):
    config = tiny_config(
        {"optimizer.name": "sgd", "optimizer.learning_rate": "1e30", "train.epochs": "6", "train.epochs_per_call": "4"}
    )
    with pytest.raises(jaxepochs.NonFiniteLossError, match="non-finite"):
        jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = _rows(tmp_path)
    assert summary["stop_reason"] == "non_finite_loss" and summary["stopped_epoch"] == len(rows) + 1
    assert all(math.isfinite(row["train_loss"]) for row in rows)
    assert math.isfinite(summary["test_loss"])  # the kept parameters are the last good ones


def test_fused_run_compiles_once(tmp_path, compile_counter):
    counts = []
    for epochs in (2, 9):  # one call, then three calls (4, 4, 1 epochs) of the same program
        with compile_counter() as counter:
            config = tiny_config({"train.epochs": str(epochs), "train.epochs_per_call": "4"})
            jaxepochs.train_and_evaluate(config, tmp_path / f"e{epochs}", quiet=True)
        counts.append(counter.count)
    assert counts[0] == counts[1]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("train.epochs_per_call", "-1", r"train\.epochs_per_call.*whole number >= 0"),
        ("train.host_interval_seconds", "0", r"train\.host_interval_seconds.*positive"),
        ("train.test_every", "0", r"train\.test_every.*1 or more"),
    ],
)
def test_bad_fused_settings(key, value, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        tiny_config({key: value})


@pytest.mark.xla_defaults  # bit-equality of programs of other shapes: XLA keeps it for its defaults
def test_reduce_on_plateau_decides_inside_the_program_at_any_pace(tmp_path):
    """The plateau's update is part of the run program: calls of 4 epochs give the rows of calls of 1."""
    plateau = {
        "train.epochs": "9",
        "optimizer.learning_rate": "0.05",
        "optimizer.schedule.name": "reduce_on_plateau",
        "optimizer.schedule.patience": "1",
        "optimizer.schedule.factor": "0.5",
    }
    one, one_rows, _ = _run(tmp_path, "one", {**plateau, "train.epochs_per_call": "1"})
    four, four_rows, _ = _run(tmp_path, "four", {**plateau, "train.epochs_per_call": "4"})
    rates = [row["learning_rate"] for row in one_rows]
    assert rates[0] == pytest.approx(0.05) and min(rates) < 0.05  # the plateau reduced the rate
    assert _untimed(four_rows) == _untimed(one_rows)
    _same(one.state, four.state)


def test_fused_resume_at_any_epoch_is_bit_exact(tmp_path):
    """Stopped after epoch 3 and resumed with calls of 4 (epochs 4-7, 8) ends where calls 1-4, 5-8 end."""
    fused = {"train.epochs_per_call": "4"}
    whole = jaxepochs.train_and_evaluate(tiny_config({**fused, "train.epochs": "8"}), tmp_path / "whole", quiet=True)
    jaxepochs.train_and_evaluate(tiny_config({**fused, "train.epochs": "3"}), tmp_path / "resumed", quiet=True)
    resumed = jaxepochs.train_and_evaluate(
        tiny_config({**fused, "train.epochs": "8"}), tmp_path / "resumed", quiet=True
    )
    assert _untimed(resumed.history) == _untimed(whole.history)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
