"""Early stopping and epoch schedules inside the trainer: what the epoch loop does with them."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config

import jaxepochs
from jaxepochs import cli
from jaxepochs.core import optim as schedules
from jaxepochs.host.config import ConfigError


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_stops_restores_best_and_records_it(tmp_path):
    config = tiny_config(
        {
            "train.epochs": "40",
            "model.hidden_sizes": "(64,)",
            "early_stopping.enabled": "True",
            "early_stopping.patience": "2",
            "early_stopping.restore_best": "True",
        }
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    summary, rows = result.summary, _rows(tmp_path)
    assert summary["stop_reason"] == "patience"
    assert 0 < summary["stopped_epoch"] == len(rows) < 40
    losses = [row["val_loss"] for row in rows]
    best = int(np.argmin(losses)) + 1
    assert summary["best_epoch"] == best and summary["best_value"] == pytest.approx(losses[best - 1], rel=1e-6)
    # Keras semantics with patience 2: the stop comes 2 epochs after the last improvement.
    assert summary["stopped_epoch"] == best + 2
    # restore_best: the run ends with the best epoch's parameters, so its final val_loss is the best one.
    assert summary["restored_best"] is True
    assert summary["val_loss"] == pytest.approx(losses[best - 1], rel=1e-5)
    best_params = jaxepochs.load(tmp_path, "best").params
    for got, want in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(best_params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rerunning_a_stopped_run_keeps_its_stop_in_the_summary(tmp_path):
    """The same command again in the workdir of a run that stopped early resumes it, finds it stopped, and
    writes the same summary (it rewrote it as stop_reason "completed", stopped_epoch 0)."""
    config = tiny_config(
        {
            "train.epochs": "30",
            "model.hidden_sizes": "(64,)",
            "optimizer.learning_rate": "0.03",
            "early_stopping.enabled": "True",
            "early_stopping.patience": "1",
        }
    )
    first = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True).summary
    assert first["stop_reason"] == "patience" and 0 < first["stopped_epoch"] < 30
    again = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    assert len(again.history) == first["epochs_completed"]
    for key in ("stop_reason", "stopped_epoch", "best_epoch", "best_value", "epochs_completed", "val_loss"):
        assert again.summary[key] == first[key], key


def test_restore_best_without_a_monitored_epoch_keeps_the_last_parameters(tmp_path):
    """start_from_epoch beyond the run: no epoch was monitored, so there is no best epoch to restore (the best
    parameters are still the initial ones)."""
    config = tiny_config(
        {
            "train.epochs": "2",
            "early_stopping.enabled": "True",
            "early_stopping.start_from_epoch": "5",
            "early_stopping.restore_best": "True",
        }
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    assert result.summary["best_epoch"] == 0 and result.summary["restored_best"] is False
    assert result.summary["val_loss"] == pytest.approx(result.history[-1]["val_loss"], rel=1e-6)
    best = jaxepochs.load(tmp_path, "best").params
    for got, want in zip(jax.tree.leaves(best), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_early_stopping_on_accuracy_uses_max_mode(tmp_path):
    config = tiny_config(
        {
            "train.epochs": "30",
            "early_stopping.enabled": "True",
            "early_stopping.monitor": "val_accuracy",
            "early_stopping.patience": "3",
        }
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    accuracies = [row["val_accuracy"] for row in result.history]
    assert result.summary["best_value"] == pytest.approx(max(accuracies), rel=1e-6)
    assert accuracies[result.summary["best_epoch"] - 1] == max(accuracies)


def test_disabled_early_stopping_never_stops_but_tracks_the_best_epoch(tmp_path):
    result = jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "12"}), tmp_path, quiet=True)
    assert result.summary["stop_reason"] == "completed" and result.summary["stopped_epoch"] == 0
    assert len(result.history) == 12
    losses = [row["val_loss"] for row in result.history]
    assert result.summary["best_epoch"] == int(np.argmin(losses)) + 1


def test_gl_rule_stops_on_generalisation_loss(tmp_path):
    config = tiny_config(
        {
            "train.epochs": "40",
            "model.hidden_sizes": "(64,)",
            "early_stopping.enabled": "True",
            "early_stopping.rule": "gl",
            "early_stopping.alpha": "5.0",
        }
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    losses = np.array([row["val_loss"] for row in result.history], np.float32)
    gl = 100 * (losses / np.minimum.accumulate(losses) - 1)
    assert result.summary["stop_reason"] == "gl"
    assert result.summary["stopped_epoch"] == int(np.argmax(gl > 5.0)) + 1 == len(result.history)


def test_warmup_cosine_learning_rate_is_logged_at_each_epochs_last_step(tmp_path):
    config = tiny_config(
        {
            "train.epochs": "4",
            "optimizer.schedule.name": "warmup_cosine",
            "optimizer.schedule.warmup_epochs": "1.5",
        }
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    steps = result.summary["steps_per_epoch"]
    schedule = schedules.make_schedule(config.optimizer.schedule, config.optimizer.learning_rate, steps, 4)
    logged = [row["learning_rate"] for row in result.history]
    expected = [float(schedule(epoch * steps - 1)) for epoch in range(1, 5)]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)
    assert logged[0] < logged[1] > logged[2] > logged[3]  # rising in warmup, then cosine decay


def test_reduce_on_plateau_lowers_the_rate_when_validation_stalls(tmp_path):
    config = tiny_config(
        {
            "train.epochs": "25",
            "model.hidden_sizes": "(64,)",
            "optimizer.schedule.name": "reduce_on_plateau",
            "optimizer.schedule.patience": "2",
            "optimizer.schedule.factor": "0.5",
        }
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    rates = [row["learning_rate"] for row in result.history]
    assert rates[0] == pytest.approx(config.optimizer.learning_rate)
    assert min(rates) < rates[0]  # the validation loss of this overfitting MLP stalls: the rate is halved
    ratios = {round(later / earlier, 6) for earlier, later in zip(rates, rates[1:], strict=False) if later != earlier}
    assert ratios <= {0.5}


def test_cli_overrides_early_stopping(tmp_path, capsys):
    argv = [
        "run",
        "--config",
        "experiments/mnist1d_mlp.py",
        "--workdir",
        str(tmp_path / "run"),
        "--config.model.hidden_sizes=(16,)",
        "--config.train.batch_size=64",
        "--config.train.epochs=30",
        "--config.early_stopping.enabled=true",
        "--config.early_stopping.patience=1",
    ]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "patience" and summary["stopped_epoch"] < 30
    assert "Stopped early at epoch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ({"early_stopping.monitor": "val_los"}, "Valid monitors: train_loss, train_accuracy, val_loss, val_accuracy"),
        ({"early_stopping.mode": "maximum"}, "Valid modes: auto, min, max"),
        ({"early_stopping.patience": "-1"}, "patience"),
        ({"early_stopping.min_delta": "-0.1"}, "min_delta"),
        ({"early_stopping.rule": "prechelt"}, "patience, gl, pq, up"),
    ],
)
def test_bad_early_stopping_settings_list_the_valid_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config({"early_stopping.enabled": "True", **override})


def test_validation_monitor_without_a_validation_split_is_refused():
    with pytest.raises(ConfigError, match="Valid monitors: train_loss, train_accuracy"):
        tiny_config({"early_stopping.enabled": "True", "data.validation_fraction": "0.0"})
