"""`train.epochs_per_call` > 1: many epochs per compiled call give the same run as one epoch per call."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from conftest import tiny_config

import jaxepochs
from jaxepochs.host import config as config_lib

TIMINGS = ("train_seconds", "seconds")


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def _run(tmp_path, name: str, overrides: dict):
    workdir = tmp_path / name
    result = jaxepochs.train_and_evaluate(tiny_config(overrides), workdir, quiet=True)
    return result, _rows(workdir), json.loads((workdir / "summary.json").read_text())


def test_fused_epochs_match_one_epoch_per_call(tmp_path):
    common = {"train.epochs": "7", "train.log_test": "True", "train.test_every": "3"}
    one, one_rows, one_summary = _run(tmp_path, "one", common)
    fused, fused_rows, fused_summary = _run(tmp_path, "fused", {**common, "train.epochs_per_call": "3"})
    assert len(fused_rows) == 7  # calls of 3, 3 and 1 epochs
    for a, b in zip(_untimed(one_rows), _untimed(fused_rows), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # The test split is evaluated on epochs 3 and 6 and after the last one only.
    assert [row["epoch"] for row in fused_rows if "test_loss" in row] == [3, 6, 7]
    assert fused_summary["best_epoch"] == one_summary["best_epoch"]
    for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(fused.state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_early_stopping_stops_at_the_same_epoch_and_restores_best(tmp_path):
    stop = {
        "train.epochs": "30",
        "early_stopping.enabled": "True",
        "early_stopping.patience": "2",
        "early_stopping.restore_best": "True",
        "model.hidden_sizes": "(64,)",
        "optimizer.learning_rate": "0.03",
    }
    one, one_rows, one_summary = _run(tmp_path, "one", stop)
    fused, fused_rows, fused_summary = _run(tmp_path, "fused", {**stop, "train.epochs_per_call": "8"})
    assert one_summary["stop_reason"] == fused_summary["stop_reason"] == "patience"
    assert fused_summary["stopped_epoch"] == one_summary["stopped_epoch"] < 30
    assert len(fused_rows) == len(one_rows) == one_summary["stopped_epoch"]  # nothing past the stop is logged
    assert fused_summary["best_epoch"] == one_summary["best_epoch"]
    assert fused_summary["val_loss"] == pytest.approx(one_summary["val_loss"], rel=1e-5)  # the best epoch's
    assert fused_summary["val_loss"] == pytest.approx(fused_rows[fused_summary["best_epoch"] - 1]["val_loss"], 1e-5)


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
        ("train.epochs_per_call", "0", r"train\.epochs_per_call.*1 or more"),
        ("train.test_every", "0", r"train\.test_every.*1 or more"),
    ],
)
def test_bad_fused_settings(key, value, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        tiny_config({key: value})


def test_fused_epochs_refuse_reduce_on_plateau():
    with pytest.raises(config_lib.ConfigError, match=r"reduce_on_plateau.*epochs_per_call=1"):
        tiny_config({"train.epochs_per_call": "5", "optimizer.schedule.name": "reduce_on_plateau"})


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
