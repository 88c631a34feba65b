"""Callbacks: the user's code with each epoch's row, on the host, after the call that trained it."""

from __future__ import annotations

import json
import textwrap

import jax
import numpy as np
import pytest
from conftest import TIMED, tiny_config

import jaxepochs
from jaxepochs import CallbackError

UNTIMED = lambda rows: [{k: v for k, v in row.items() if k not in TIMED} for row in rows]  # noqa: E731


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def test_a_callback_stops_the_run_at_the_epoch_it_chooses_and_a_rerun_finds_it_stopped(tmp_path):
    config = tiny_config({"train.epochs": "6", "train.epochs_per_call": "1"})
    seen = []
    stop_at_3 = lambda row: seen.append(row) or row["epoch"] == 3
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True, callbacks=[stop_at_3])
    assert [row["epoch"] for row in seen] == [1, 2, 3] and seen == _rows(tmp_path)  # each row as written
    summary = _summary(tmp_path)
    assert (summary["stop_reason"], summary["stopped_epoch"], summary["epochs_completed"]) == ("callback", 3, 3)
    assert len(result.history) == 3
    # The stop is in the checkpoint: the same command without the callback trains nothing more.
    again = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    assert len(again.history) == 3 and again.summary["stop_reason"] == "callback"
    for got, want in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_callbacks_run_after_each_call_in_order_and_see_its_parameters_when_they_ask(tmp_path):
    config = tiny_config({"train.epochs": "4", "train.epochs_per_call": "2"})
    calls, params = [], {}

    def first(row, run):
        calls.append(("first", row["epoch"], run.epoch))
        params[run.epoch] = run.params()

    def second(row):
        calls.append(("second", row["epoch"]))

    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True, callbacks=[first, second])
    assert calls == [("first", 1, 2), ("second", 1), ("first", 2, 2), ("second", 2),
                     ("first", 3, 4), ("second", 3), ("first", 4, 4), ("second", 4)]  # fmt: skip
    assert result.summary["stop_reason"] == "completed"
    for got, want in zip(jax.tree.leaves(params[4]), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # the last call's: the run's end
    assert not np.array_equal(jax.tree.leaves(params[2])[0], jax.tree.leaves(params[4])[0])


def test_a_callback_that_raises_saves_the_run_which_resumes_to_where_an_uninterrupted_run_ends(tmp_path):
    config = tiny_config({"train.epochs": "4", "train.epochs_per_call": "1"})
    whole = jaxepochs.train_and_evaluate(config, tmp_path / "whole", quiet=True)

    def broken(row):
        if row["epoch"] == 2:
            raise KeyError("val_los")

    with pytest.raises(CallbackError, match=r"broken raised at epoch 2: KeyError: 'val_los'.*run the same command"):
        jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True, callbacks=[broken])
    assert [row["epoch"] for row in _rows(tmp_path / "run")] == [1, 2]
    assert _summary(tmp_path / "run")["stop_reason"] == "interrupted"
    resumed = jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True)
    assert UNTIMED(resumed.history) == UNTIMED(whole.history) and resumed.summary["stop_reason"] == "completed"


def test_a_callback_answering_other_than_true_false_or_none_is_an_error_after_the_outputs(tmp_path):
    config = tiny_config({"train.epochs": "3", "train.epochs_per_call": "1"})
    with pytest.raises(CallbackError, match=r"'stop' \(str\); a callback returns True to stop the run"):
        jaxepochs.train_and_evaluate(config, tmp_path, quiet=True, callbacks=[lambda row: "stop"])
    assert len(_rows(tmp_path)) == 1 and (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    "callbacks, message",
    [
        (print, "is not a list of functions"),
        ([3], "is a int, not a function"),
        ([lambda a, b, c: None], r"cannot be called as <lambda>\(row\) or <lambda>\(row, run\)"),
    ],
)
def test_callbacks_of_the_wrong_shape_are_refused_before_anything_is_written(tmp_path, callbacks, message):
    with pytest.raises(ValueError, match=message):
        jaxepochs.train_and_evaluate(tiny_config(), tmp_path / "run", quiet=True, callbacks=callbacks)
    assert not (tmp_path / "run").exists()


MODULE = """
import json
import pathlib

import jaxepochs


def get_config():
    return jaxepochs.base_config()


def on_epoch_end(row, run):
    with open(pathlib.Path(__file__).with_name("seen.jsonl"), "a") as f:
        f.write(json.dumps({{"epoch": row["epoch"], "call": run.epoch}}) + "\\n")
    return row["epoch"] == {stop}
"""


def test_the_module_s_on_epoch_end_is_called_first_and_a_sweep_says_it_does_not_call_it(tmp_path):
    module = tmp_path / "exp.py"
    module.write_text(MODULE.format(stop=2))
    config = tiny_config({"experiment.module": str(module), "train.epochs": "3", "train.epochs_per_call": "1"})
    order = []
    hook_first = lambda row: order.append((tmp_path / "seen.jsonl").read_text().count("\n"))
    result = jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True, callbacks=[hook_first])
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert seen == [{"epoch": 1, "call": 1}, {"epoch": 2, "call": 2}] and order == [1, 2]
    assert result.summary["stop_reason"] == "callback" and result.summary["stopped_epoch"] == 2
    with pytest.warns(UserWarning, match="on_epoch_end is called by single runs"):
        jaxepochs.sweep(config, [{"seed": "0"}], tmp_path / "sweep", quiet=True)
    assert len((tmp_path / "seen.jsonl").read_text().splitlines()) == 2  # the sweep did not call it


def test_an_on_epoch_end_of_the_wrong_shape_is_named_before_anything_compiles(tmp_path):
    module = tmp_path / "exp.py"
    module.write_text(textwrap.dedent(MODULE.format(stop=2)).replace("(row, run)", "(row, run, extra)"))
    config = tiny_config({"experiment.module": str(module)})
    with pytest.raises(jaxepochs.ConfigError, match=r"on_epoch_end\(row, run, extra\) cannot be called"):
        jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_the_command_shows_the_hook_s_traceback_and_what_to_do_with_exit_1(tmp_path, capsys):
    from jaxepochs import cli

    module = tmp_path / "exp.py"
    module.write_text(MODULE.format(stop=2).replace('return row["epoch"] == 2', 'return row["val_los"]'))
    overrides = ["--config.train.epochs=2", "--config.model.hidden_sizes=(16,)", "--config.logging.curves=False"]
    code = cli.main(["run", "--config", str(module), "--workdir", str(tmp_path / "run"), "--quiet", *overrides])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "KeyError: 'val_los'" in err
    assert "jaxepochs: error: The callback on_epoch_end raised at epoch 1" in err
    assert (tmp_path / "run" / "summary.json").exists()


def test_a_streamed_run_calls_its_callbacks_and_stops_where_they_say(tmp_path):
    config = tiny_config({"train.epochs": "4", "data.stream": "True", "train.epochs_per_call": "1"})
    seen = []
    stop_at_2 = lambda row, run: seen.append((row["epoch"], run.epoch)) or row["epoch"] == 2
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True, callbacks=[stop_at_2])
    assert result.summary["streamed"] and seen == [(1, 1), (2, 2)]
    assert (result.summary["stop_reason"], result.summary["stopped_epoch"], len(result.history)) == ("callback", 2, 2)
    assert jaxepochs.train_and_evaluate(config, tmp_path, quiet=True).summary["stop_reason"] == "callback"
