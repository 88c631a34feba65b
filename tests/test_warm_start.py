"""Starting a run from another run's parameters (init.from_workdir): what is taken, what is initialised afresh,
and the errors, all before the new run's workdir is touched."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import tiny_config

import jaxepochs


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A pretrained run: tiny_config, 2 epochs."""
    workdir = tmp_path_factory.mktemp("source")
    return workdir, jaxepochs.train_and_evaluate(tiny_config(), workdir, quiet=True)


def _start(tmp_path, source_dir, name: str, overrides: dict):
    config = tiny_config({"init.from_workdir": str(source_dir), "train.epochs": "0", **overrides})
    return jaxepochs.train_and_evaluate(config, tmp_path / name, quiet=True)


def _equal(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def test_a_run_starts_from_another_runs_parameters_and_records_it(tmp_path, source):
    source_dir, pretrained = source
    started = _start(tmp_path, source_dir, "from_last", {"optimizer.learning_rate": "0.001"})  # another rate
    for name in ("Dense_0", "Dense_1"):
        for leaf in ("kernel", "bias"):
            assert _equal(started.state.params[name][leaf], pretrained.state.params[name][leaf])
    assert started.summary["initialised_from"]["parameters_taken"] == 4
    assert started.summary["test_loss"] == pytest.approx(pretrained.summary["test_loss"], rel=1e-6)
    recorded = json.loads((tmp_path / "from_last" / "config.json").read_text())
    assert recorded["init"]["from_workdir"] == str(source_dir)
    # It trains on from there, and a rerun resumes its own checkpoint without reading the source again.
    more = tiny_config({"init.from_workdir": str(source_dir), "train.epochs": "2"})
    moved = tmp_path / "moved_source"
    shutil.copytree(source_dir, moved)
    more.init.from_workdir = str(moved)
    trained = jaxepochs.train_and_evaluate(more, tmp_path / "trained", quiet=True)
    assert trained.history[0]["train_loss"] < pretrained.history[0]["train_loss"]  # a pretrained start
    shutil.rmtree(moved)
    more.train.epochs = 3
    assert len(jaxepochs.train_and_evaluate(more, tmp_path / "trained", quiet=True).history) == 3


def test_a_new_head_is_reinitialised_only_where_named(tmp_path, source):
    source_dir, pretrained = source
    head = {"model.num_classes": "12"}  # Dense_1 is now [16, 12]
    with pytest.raises(ValueError, match=r"Dense_1/bias has shape \(10,\) in the run in .*, and \(12,\) in this"):
        _start(tmp_path, source_dir, "refused", head)
    assert not (tmp_path / "refused").exists()
    started = _start(tmp_path, source_dir, "new_head", {**head, "init.reinit": "('Dense_1/*',)"})
    fresh = jaxepochs.train_and_evaluate(tiny_config({**head, "train.epochs": "0"}), tmp_path / "fresh", quiet=True)
    assert _equal(started.state.params["Dense_0"]["kernel"], pretrained.state.params["Dense_0"]["kernel"])
    assert _equal(started.state.params["Dense_1"]["kernel"], fresh.state.params["Dense_1"]["kernel"])  # its init
    assert started.summary["initialised_from"]["reinitialised"] == ["Dense_1/bias", "Dense_1/kernel"]
    excluded = _start(tmp_path, source_dir, "excluded", {"init.exclude": "('Dense_0/*',)"})
    assert _equal(excluded.state.params["Dense_1"]["bias"], pretrained.state.params["Dense_1"]["bias"])
    assert not _equal(excluded.state.params["Dense_0"]["kernel"], pretrained.state.params["Dense_0"]["kernel"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"init.from_workdir": "/nonexistent/run"}, "holds no jaxepochs run"),
        ({"model.hidden_sizes": "(32,)"}, r"Dense_0/bias has shape \(16,\) in the run"),
        (
            {"init.include": "('Conv_0/*',)"},
            "pattern 'Conv_0/\\*' matches no parameter of the model. Its groups: Dense_0, Dense_1",
        ),  # fmt: skip
        ({"init.epoch": "7"}, "has no checkpoint of epoch 7"),
        ({"init.epoch": "first"}, 'Use "last", "best" or the number'),
        ({"init.from_workdir": "", "init.reinit": "('Dense_1/*',)"}, "init.from_workdir"),
    ],
)
def test_a_source_that_does_not_fit_is_refused_before_the_workdir(tmp_path, source, overrides, message):
    with pytest.raises(ValueError, match=message):  # from the config's validation, or from reading the source
        config = tiny_config({"init.from_workdir": str(source[0]), **overrides})
        jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_sweep_starts_every_run_from_the_source(tmp_path, source):
    source_dir, pretrained = source
    config = tiny_config({"init.from_workdir": str(source_dir), "train.epochs": "1"})
    result = jaxepochs.sweep(config, [{"seed": "0"}, {"seed": "1"}], tmp_path / "sweep", quiet=True)
    first = [result.histories[run][0]["train_loss"] for run in ("r0", "r1")]
    assert all(loss < pretrained.history[0]["train_loss"] for loss in first)  # both start pretrained
