"""End to end through `train_and_evaluate` on the built-in datasets: outputs, compilation, determinism."""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO, TIMED, tiny_config

import jaxepochs
from jaxepochs.host import config as config_lib

ROW_KEYS = {
    "epoch",
    "steps",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "seconds",
    "examples_per_second",
}
SUMMARY_KEYS = {
    "num_train_examples",
    "steps_per_epoch",
    "best_epoch",
    "stopped_epoch",
    "test_loss",
    "test_accuracy",
    "compile_seconds",
    "total_seconds",
}
TIMINGS = ("train_seconds", *TIMED)
EPOCHS = 3


def _rows(workdir) -> list[dict]:
    text = (workdir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _summary(workdir) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def _losses(history: list[dict]) -> list[tuple]:
    return [tuple(v for k, v in sorted(row.items()) if k not in TIMINGS) for row in history]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """mnist1d, MLP 40-16-10, batch 64 (57 steps, the last one padded), seed 0, three epochs."""
    workdir = tmp_path_factory.mktemp("base_run")
    config = tiny_config({"train.epochs": str(EPOCHS), "logging.curves": "True"})
    return config, workdir, jaxepochs.train_and_evaluate(config, workdir, quiet=True)


def test_run_writes_its_outputs(base_run):
    config, workdir, result = base_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (workdir / name).is_file(), name
    png = (workdir / "curves.png").read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG")
    assert json.loads((workdir / "config.json").read_text())["train"]["epochs"] == EPOCHS


def test_metrics_rows(base_run):
    config, workdir, result = base_run
    rows = _rows(workdir)
    assert len(rows) == EPOCHS
    steps_per_epoch = math.ceil(3600 / 64)
    for i, row in enumerate(rows, start=1):
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["epoch"] == i
        assert row["steps"] == i * steps_per_epoch
        assert row["learning_rate"] == pytest.approx(config.optimizer.learning_rate)
        assert 0.0 <= row["train_accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
        assert all(math.isfinite(row[k]) for k in ("train_loss", "val_loss"))
    assert rows == json.loads(json.dumps(result.history))  # the returned history is what was written
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns


def test_summary(base_run):
    config, workdir, result = base_run
    summary = _summary(workdir)
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["num_train_examples"] == 3600
    assert summary["steps_per_epoch"] == math.ceil(3600 / config.train.batch_size) == 57
    rows = _rows(workdir)
    assert summary["best_epoch"] == min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert summary["stopped_epoch"] == 0
    assert summary["stop_reason"] == "completed"
    assert summary["epochs_completed"] == EPOCHS
    assert math.isfinite(summary["test_loss"])
    assert 0.1 < summary["test_accuracy"] <= 1.0
    for key in ("compile_seconds", "total_seconds"):
        assert isinstance(summary[key], float) and summary[key] >= 0.0
    assert summary["num_parameters"] == (40 * 16 + 16) + (16 * 10 + 10)


def test_validation_fraction_splits_4000_into_3600_and_400(base_run):
    config, workdir, result = base_run
    assert config.data.validation_fraction == 0.1
    summary = _summary(workdir)
    assert (summary["num_train_examples"], summary["num_val_examples"]) == (3600, 400)
    assert summary["num_test_examples"] == 1000


def test_later_epochs_compile_nothing(tmp_path, compile_counter):
    counts = {}
    for epochs in (1, 4):
        jax.clear_caches()  # both runs start from the same (empty) in-memory caches
        with compile_counter() as counter:
            result = jaxepochs.train_and_evaluate(
                tiny_config({"train.epochs": str(epochs)}), tmp_path / f"epochs{epochs}", quiet=True
            )
        assert len(result.history) == epochs
        counts[epochs] = counter.count
    assert counts[1] >= 1
    assert counts[4] == counts[1]


def test_zero_epochs_evaluates_only(tmp_path):
    result = jaxepochs.train_and_evaluate(
        tiny_config({"train.epochs": "0", "logging.curves": "True"}), tmp_path, quiet=True
    )
    assert result.history == []
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    summary = _summary(tmp_path)
    assert summary["epochs_completed"] == 0
    assert summary["stop_reason"] == "completed"
    assert math.isfinite(summary["test_loss"]) and 0.0 <= summary["test_accuracy"] <= 1.0
    assert math.isfinite(summary["val_loss"])
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_same_seed_same_run_other_seed_other_run(base_run, tmp_path):
    config, workdir, result = base_run
    again = jaxepochs.train_and_evaluate(config, tmp_path / "again", quiet=True)
    assert _losses(again.history) == _losses(result.history)
    assert again.summary["test_loss"] == result.summary["test_loss"]

    other_seed = tiny_config({"train.epochs": str(EPOCHS), "seed": "1"})
    other = jaxepochs.train_and_evaluate(other_seed, tmp_path / "other", quiet=True)
    assert [r["train_loss"] for r in other.history] != [r["train_loss"] for r in result.history]
    assert other.summary["num_val_examples"] == result.summary["num_val_examples"]  # split_seed: same split


def test_cnn_trains_on_mnist1d(tmp_path):
    config = tiny_config(
        {
            "model.name": "cnn",
            "model.channels": "(4, 4)",
            "model.kernel_sizes": "(5, 3)",
            "model.strides": "(2, 2)",
            "train.epochs": "1",
        }
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    assert len(result.history) == 1
    assert result.summary["model"] == "cnn"
    # Length 40 -> (40 + 2 - 5) // 2 + 1 = 19 -> (19 + 2 - 3) // 2 + 1 = 10 positions of 4 channels.
    assert result.summary["num_parameters"] == (5 * 1 * 4 + 4) + (3 * 4 * 4 + 4) + (10 * 4 * 10 + 10)
    assert math.isfinite(result.history[0]["train_loss"])
    assert result.summary["test_loss"] < math.log(10)  # better than uniform guessing


def test_logistic_regression_on_digits(tmp_path):
    config = tiny_config({"data.name": "digits", "model.hidden_sizes": "()", "train.epochs": "2"})
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    summary = result.summary
    assert summary["dataset"] == "digits"
    assert summary["num_parameters"] == 64 * 10 + 10
    assert summary["num_train_examples"] + summary["num_val_examples"] == 1437
    assert summary["num_test_examples"] == 360
    assert summary["test_accuracy"] > 0.7  # chance is 0.1; 0.84 here after two epochs
    assert len(_rows(tmp_path)) == 2
    # load() reads the run back (it refused every non-MNIST-1D run: config.json's lists are not the tuples of
    # data.args, so validation took them for MNIST-1D settings on another dataset).
    loaded = jaxepochs.load(tmp_path)
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "experiment", sorted(p.name for p in (REPO / "experiments").glob("*.py") if p.stem != "__init__")
)
def test_config_json_reads_back_as_the_config_that_wrote_it(experiment):
    config = jaxepochs.load_config_file(REPO / "experiments" / experiment)
    again = config_lib.from_json(config.to_json_best_effort())
    assert again.to_dict() == config.to_dict()


def test_used_workdir_resumes_or_needs_restart(base_run, tmp_path):
    config, base_workdir, base_result = base_run
    workdir = tmp_path / "used"
    shutil.copytree(base_workdir, workdir)
    # Another config (not just train.epochs): refused, naming the differing key, and nothing is touched.
    with pytest.raises(jaxepochs.WorkdirError, match=r"another config \(seed: 0 -> 1\).*--restart"):
        jaxepochs.train_and_evaluate(tiny_config({"train.epochs": str(EPOCHS), "seed": "1"}), workdir, quiet=True)
    assert len(_rows(workdir)) == EPOCHS

    # The same config: the finished run resumes at its end and trains nothing more.
    result = jaxepochs.train_and_evaluate(config, workdir, quiet=True)
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in base_result.history]
    assert result.summary["test_loss"] == base_result.summary["test_loss"]

    # A run written before a config key existed resumes with that key at its default, but not at another value.
    saved = json.loads((workdir / "config.json").read_text())
    del saved["model"]["conv"]
    (workdir / "config.json").write_text(json.dumps(saved))
    assert jaxepochs.train_and_evaluate(config, workdir, quiet=True).summary["epochs_completed"] == EPOCHS
    with pytest.raises(jaxepochs.WorkdirError, match=r"model.conv: .* -> 'native'"):
        jaxepochs.train_and_evaluate(jaxepochs.apply_overrides(config, {"model.conv": "native"}), workdir, quiet=True)

    # --restart discards it.
    result = jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "0"}), workdir, quiet=True, restart=True)
    assert result.summary["epochs_completed"] == 0
    assert _rows(workdir) == []
    assert _summary(workdir)["epochs_completed"] == 0


def test_non_finite_loss_stops_and_keeps_outputs(tmp_path):
    config = tiny_config({"optimizer.name": "sgd", "optimizer.learning_rate": "1e30"})
    with pytest.raises(jaxepochs.NonFiniteLossError, match="non-finite"):
        jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    assert (tmp_path / "metrics.jsonl").is_file()
    summary = _summary(tmp_path)
    assert summary["stop_reason"] == "non_finite_loss"
    rows = _rows(tmp_path)
    assert summary["epochs_completed"] == len(rows) < config.train.epochs
    assert summary["stopped_epoch"] == len(rows) + 1
    assert all(math.isfinite(row["train_loss"]) for row in rows)  # only good epochs are logged
    # The kept state is the last good epoch's (here: the initial one), so it evaluates to finite numbers.
    assert math.isfinite(summary["test_loss"])


def test_compilation_cache_is_written_by_a_run_and_read_by_the_next(tmp_path):
    """A fresh process with train.compilation_cache_dir writes its programs to the cache; the next process with
    the same programs finds every one there and adds none (by the cache's entries: no timing, which a busy
    machine makes noise of; the time saved is `make bench`'s to show)."""
    import os
    import subprocess
    import sys

    from conftest import EXPERIMENT

    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}

    def entries_after(name: str, seed: str) -> set[str]:
        command = [sys.executable, "-m", "jaxepochs.cli", "run", "--config", str(EXPERIMENT)]
        command += ["--workdir", str(tmp_path / name), "--quiet", "--config.train.epochs=1", f"--config.seed={seed}"]
        command += ["--config.model.hidden_sizes=(16,)", f"--config.train.compilation_cache_dir={cache}"]
        subprocess.run(command, check=True, env=env, timeout=600)
        return {p.name for p in cache.iterdir()}

    first = entries_after("first", "0")
    assert len(first) >= 2  # the run program and the model's init at least
    assert entries_after("second", "1") == first  # another seed, the same programs: all read from the cache


def test_unwritable_compilation_cache_dir_warns_and_runs_without(tmp_path, capsys):
    import jax

    from jaxepochs.host import run as train

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # as in a fresh process
    try:
        train.use_compilation_cache(str(blocker / "xla"))
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
    assert "cannot be created" in capsys.readouterr().err


def test_every_epoch_is_dispatched_then_logged_in_order(tmp_path, monkeypatch):
    from jaxepochs.host import run as train
    from jaxepochs.host.batch import RunBatch

    events = []
    caller = RunBatch.caller

    def recording_caller(self, *args, **kwargs):
        call = caller(self, *args, **kwargs)

        def run_epochs(carry, first_epoch, count):
            events.append(("dispatch", first_epoch))
            return call(carry, first_epoch, count)

        return run_epochs

    write = train.report.MetricsLog.write
    monkeypatch.setattr(RunBatch, "caller", recording_caller)
    monkeypatch.setattr(
        train.report.MetricsLog, "write", lambda log, row: (events.append(("log", row["epoch"])), write(log, row))
    )
    config = tiny_config({"train.epochs": "3", "train.epochs_per_call": "1"})
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    # One call per epoch; whether the next is dispatched before the last is logged depends on the backend
    # (tests/test_cadence.py: on this CPU a call runs in the dispatching thread, so they come in turn).
    assert [e for e in events if e[0] == "log"] == [("log", 1), ("log", 2), ("log", 3)]
    assert sorted(e for e in events if e[0] == "dispatch") == [("dispatch", 1), ("dispatch", 2), ("dispatch", 3)]
    assert all(events.index(("dispatch", e)) < events.index(("log", e)) for e in (1, 2, 3))
    assert 0 <= result.summary["host_seconds_per_epoch"] < max(row["seconds"] for row in result.history)
