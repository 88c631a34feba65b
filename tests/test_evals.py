"""Further evaluation sets: get_data's other splits and data.eval_splits, each evaluated inside the run program at
its own cadence, as <name>_<metric> rows, a monitor for early stopping, in streamed runs and sweeps alike."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import TIMED, tiny_config

import jaxepochs
from jaxepochs.data.splits import DataError
from jaxepochs.host.config import ConfigError
from jaxepochs.sweep import grid as grid_lib

untimed = lambda rows: [{k: v for k, v in row.items() if k not in TIMED} for row in rows]
# The test split again, as an evaluation set of its own: its rows must be the test split's.
WHOLE = {"data.eval_splits": "('whole=test', 'again=test')", "train.log_test": "True"}


def test_an_evaluation_set_is_evaluated_as_the_test_split_is_and_at_its_own_cadence(tmp_path):
    config = tiny_config({**WHOLE, "train.epochs": "3", "train.eval_every": "('again=2',)"})
    result = jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True)
    for row in result.history:
        assert row["whole_loss"] == pytest.approx(row["test_loss"], rel=1e-6)
        assert row["whole_accuracy"] == pytest.approx(row["test_accuracy"], rel=1e-6)
    assert [("again_loss" in row) for row in result.history] == [False, True, True]  # every 2 epochs, and the last
    assert result.history[1]["again_loss"] == pytest.approx(result.history[1]["test_loss"], rel=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["whole_loss"] == pytest.approx(summary["test_loss"], rel=1e-6) and "again_accuracy" in summary
    assert "whole_loss" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    # Streamed: the same rows; swept: each member's.
    streamed = jaxepochs.train_and_evaluate(
        jaxepochs.apply_overrides(config, {"data.stream": "True", "train.steps_per_call": "8"}),
        tmp_path / "streamed",
        quiet=True,
    )
    swept = jaxepochs.sweep(config, grid_lib.expand(config, {"seed": "0,1"}), tmp_path / "sweep", quiet=True)
    close = lambda k, v: pytest.approx(v, abs=2e-3) if k.endswith("accuracy") else pytest.approx(v, rel=1e-4)
    for other in (untimed(streamed.history), untimed(swept.histories["r0"])):  # (an example of 1,000 may flip)
        for a, b in zip(untimed(result.history), other, strict=True):
            assert {k: close(k, v) for k, v in a.items()} == {k: b[k] for k in a}
    assert "whole_accuracy" in swept.summaries["r1"]


def test_a_cross_validated_sweep_evaluates_the_whole_set_for_every_fold(tmp_path):
    """The folds are cut from the training split (their validation splits); an evaluation set is shared by them."""
    config = tiny_config({**WHOLE, "train.epochs": "2"})
    result = jaxepochs.sweep(config, grid_lib.expand(config, {"seed": "0"}), tmp_path, cv=2, quiet=True)
    assert len(result.histories) == 2  # one configuration, two folds
    for history in result.histories.values():
        for row in history:
            assert row["whole_loss"] == pytest.approx(row["test_loss"], rel=1e-6)
    first, second = (history[-1]["whole_loss"] for history in result.histories.values())
    assert first != second  # each fold's model


def test_early_stopping_may_watch_an_evaluation_set(tmp_path):
    stop = {
        "data.eval_splits": "('whole=test',)",
        "train.epochs": "30",
        "early_stopping.enabled": "True",
        "early_stopping.monitor": "whole_loss",
        "early_stopping.patience": "2",
        "optimizer.learning_rate": "0.05",
    }
    result = jaxepochs.train_and_evaluate(tiny_config(stop), tmp_path, quiet=True)
    summary = result.summary
    assert summary["best_epoch_metric"] == "whole_loss" and summary["stop_reason"] == "patience"
    best = min(row["whole_loss"] for row in result.history)
    assert summary["best_value"] == pytest.approx(best, rel=1e-6)
    assert jaxepochs.load(tmp_path, "best").step > 0  # run.json names the sets: its tracker is rebuilt with them


GET_DATA = """
import numpy as np
from jaxepochs import base_config


def get_config():
    config = base_config()
    config.train.epochs = 2
    config.model.hidden_sizes = (8,)
    config.logging.curves = False
    return config


def get_data(config):
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    return {"train": {"x": x[:200], "y": y[:200]}, "test": {"x": x[200:], "y": y[200:]},
            "SETS": {"x": x[200:] + 2.0, "y": y[200:]}}
"""


def test_get_data_may_return_more_evaluation_sets_and_bad_names_are_refused(tmp_path):
    module = tmp_path / "sets.py"
    module.write_text(textwrap.dedent(GET_DATA.replace("SETS", "shifted")))
    result = jaxepochs.train_and_evaluate(jaxepochs.load_config_file(module), tmp_path / "run", quiet=True)
    assert {"shifted_loss", "shifted_accuracy"} <= set(result.history[-1]) <= set(result.history[0])
    assert result.history[-1]["shifted_loss"] != result.history[-1]["val_loss"]
    for bad, match in [
        *((bad, rf'evaluation set "{bad}" needs a name of lowercase letters') for bad in ("Shifted", "shifted_far")),
        ("val", r'evaluation set "val" needs a name'),
        ("valid", r'the split "valid" reads as a misspelt "validation"'),
    ]:
        module.write_text(textwrap.dedent(GET_DATA.replace("SETS", bad)))
        with pytest.raises(DataError, match=match):
            jaxepochs.train_and_evaluate(jaxepochs.load_config_file(module), tmp_path / bad, quiet=True)
        assert not (tmp_path / bad).exists()


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"data.eval_splits": "('odd=validation',)"}, DataError, r"has no split 'validation'; its splits are"),
        ({"data.eval_splits": "('a=test', 'a=train')"}, DataError, r"names an evaluation set twice"),
        ({"train.eval_every": "('whole',)"}, ConfigError, r'train\.eval_every.*"name=N"'),
        ({"train.eval_every": "('other=2',)"}, ConfigError, r"names no evaluation set; the sets are \['whole'\]"),
        ({"early_stopping.enabled": "True", "early_stopping.monitor": "other_loss"}, ConfigError, r"other_loss"),
        (
            {
                "early_stopping.enabled": "True",
                "early_stopping.monitor": "whole_loss",
                "early_stopping.rule": "up",
                "early_stopping.k": "3",
                "train.eval_every": "('whole=2',)",
            },
            ConfigError,
            r"early_stopping\.k = 3 .*the set whole's cadence \(2 epochs\).*multiples of 2",
        ),  # fmt: skip
    ],
)
def test_bad_evaluation_settings_name_the_fix_before_anything_is_written(tmp_path, overrides, error, match):
    config = {"data.eval_splits": "('whole=test',)", **overrides}
    with pytest.raises(error, match=match):
        jaxepochs.train_and_evaluate(tiny_config(config), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
