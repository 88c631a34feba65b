"""Watching a run (issue 20): what the terminal says while the first program compiles, curves.png's marks of the
best and stopping epochs, metrics.csv, TensorBoard (read back with tensorboard's EventAccumulator) and MLflow (a
temporary local store)."""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import shutil
import sys
import time

import numpy as np
import pytest
from conftest import TIMED, _events, assert_writers_hold_the_rows, read_jsonl, tiny_config

import jaxepochs
from jaxepochs.host import report


def _wait(seconds: float, stream) -> object:
    progress = report.Progress(3, quiet=False, stream=stream)  # a StringIO is not a terminal: lines, no bar
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return progress.wait_compiling(pool.submit(lambda: time.sleep(seconds) or "programs"), time.monotonic())


def test_a_compile_of_more_than_a_second_is_announced_with_its_seconds_and_a_quick_one_is_not():
    slow, quick = io.StringIO(), io.StringIO()
    assert _wait(1.6, slow) == "programs" and _wait(0.05, quick) == "programs"
    lines = slow.getvalue().splitlines()
    assert lines[0] == "Compiling the run program..." and lines[1].startswith("Compiled the run program in 1.")
    assert quick.getvalue() == ""


def test_curves_mark_the_best_and_the_stopping_epoch(tmp_path):
    # A rate that overfits fast on 16 hidden units: validation loss turns up, patience 1 stops the run.
    overrides = {"train.epochs": "30", "early_stopping.enabled": "True", "early_stopping.patience": "1",
                 "optimizer.learning_rate": "0.05", "logging.curves": "True"}  # fmt: skip
    result = jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path, quiet=True)
    best, stopped = result.summary["best_epoch"], result.summary["stopped_epoch"]
    assert 0 < best < stopped < 30
    labels = report.plot_curves(result.history, tmp_path / "marked.png", "tiny", result.summary)
    assert labels == [f"best val_loss: epoch {best}", f"stopped: epoch {stopped}"]
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    completed = {**result.summary, "stopped_epoch": 0}
    assert report.plot_curves(result.history, tmp_path / "plain.png", "tiny", completed) == [labels[0]]


def test_tensorboard_and_metrics_csv_hold_what_metrics_jsonl_holds(tmp_path):
    overrides = {"train.epochs": "4", "train.validate_every": "2", "train.log_test": "True", "train.test_every": "3",
                 "finetune.unfreeze_epochs": "(2, 1)"}  # fmt: skip
    result = jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path, quiet=True)
    assert_writers_hold_the_rows(tmp_path)
    # The final metrics (summary.json's) as final_<name> at the last epoch, as a sweep's members have them.
    events = _events(tmp_path / "tensorboard")
    for name in ("test_loss", "test_accuracy", "val_loss"):
        assert events[f"final_{name}"] == [(4, np.float32(result.summary[name]))]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert "val_loss" not in rows[0] and "val_loss" in rows[1] and "test_loss" in rows[2]
    assert [row["learning_rate/Dense_0"] for row in rows[:2]] == [0.0, rows[1]["learning_rate"]]  # from epoch 2
    # Throughput: the epoch's training examples over its seconds; no peak memory on CPU (its backend has none).
    assert all(row["examples_per_second"] * row["seconds"] == pytest.approx(3600) for row in rows)
    assert "peak_memory_bytes" not in rows[0]
    off = {**overrides, "logging.csv": "False", "logging.tensorboard": "False", "logging.curves": "False"}
    jaxepochs.train_and_evaluate(tiny_config(off), tmp_path / "off", quiet=True)
    assert not (tmp_path / "off" / "metrics.csv").exists() and not (tmp_path / "off" / "tensorboard").exists()
    assert not (tmp_path / "off" / "curves.png").exists() and (tmp_path / "off" / "summary.json").exists()


def test_a_sweep_writes_a_tensorboard_directory_per_run_with_its_hyperparameters(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from jaxepochs.sweep import grid as grid_lib

    base = tiny_config({"train.epochs": "2"})
    grid = grid_lib.expand(base, {"optimizer.learning_rate": "1e-3,1e-2"})
    result = jaxepochs.sweep(base, grid, tmp_path, quiet=True)
    for run, values in zip(sorted(result.histories), grid, strict=True):
        events = EventAccumulator(str(tmp_path / "tensorboard" / run))
        events.Reload()
        start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
        assert hparams["optimizer.learning_rate"].number_value == pytest.approx(
            float(values["optimizer.learning_rate"])
        )
        content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
        assert [info.name for info in experiment.hparam_infos] == ["optimizer.learning_rate"]
        assert {"best_val_loss", "final_test_accuracy"} <= {info.name.tag for info in experiment.metric_infos}
        losses = [e.value for e in events.Scalars("val_loss")]
        assert losses == [np.float32(row["val_loss"]) for row in result.histories[run]]
    with (tmp_path / "metrics.csv").open() as f:  # every member's rows, the run first
        table = list(csv.DictReader(f))
    assert list(table[0])[:2] == ["run", "epoch"] and len(table) == 4 and table[2]["run"] == "r1"


def test_mlflow_logs_params_epochs_and_outputs_and_a_resumed_run_goes_on_in_the_same_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    overrides = {"logging.mlflow": "True", "logging.mlflow_tracking_uri": uri, "checkpoint.every_epochs": "1",
                 "logging.curves": "True"}  # fmt: skip
    jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path / "run", quiet=True)
    run_id = json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]
    longer = jaxepochs.train_and_evaluate(tiny_config({**overrides, "train.epochs": "3"}), tmp_path / "run", quiet=True)
    assert json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"] == run_id
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "64"
    history = client.get_metric_history(run_id, "val_loss")
    assert sorted((m.step, m.value) for m in history) == [(row["epoch"], row["val_loss"]) for row in longer.history]
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.json", "summary.json", "metrics.jsonl", "metrics.csv", "curves.png"} <= artifacts
    from jaxepochs.sweep import grid as grid_lib

    base = tiny_config({**overrides, "train.epochs": "1"})
    swept = jaxepochs.sweep(base, grid_lib.expand(base, {"seed": "0,1"}), tmp_path / "sweep", quiet=True)
    members = client.search_runs([run.info.experiment_id], "attributes.run_name LIKE 'sweep/%'")
    assert sorted(m.info.run_name for m in members) == ["sweep/r0", "sweep/r1"]
    for member in members:
        name = member.info.run_name.split("/")[1]
        assert member.data.metrics["val_loss"] == swept.histories[name][-1]["val_loss"]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    with pytest.raises(
        ValueError, match=r"mlflow is not installed. Install it with `pip install 'jaxepochs\[mlflow\]'`"
    ):
        jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path / "missing", quiet=True)
    assert not (tmp_path / "missing").exists()


def test_peak_memory_is_the_backend_s_peak_where_it_reports_one(monkeypatch):
    class Device:
        def __init__(self, stats):
            self.memory_stats = lambda: stats

    monkeypatch.setattr(report.jax, "local_devices", lambda: [Device({"peak_bytes_in_use": 123, "bytes_in_use": 7})])
    assert report.peak_memory() == {"peak_memory_bytes": 123}
    monkeypatch.setattr(report.jax, "local_devices", lambda: [Device(None)])
    assert report.peak_memory() == {}


def test_a_profiled_epoch_runs_alone_under_jax_profiler_and_changes_no_number(tmp_path):
    import gzip

    from jaxepochs.host.cadence import Pace, Periodic

    pace, never = Pace(10, 0.5, 100, boundaries={3, 4}), Periodic(0, 0.0, enabled=False)
    assert [pace.next(first, 12, never) for first in (1, 3, 4)] == [2, 1, 9]  # epoch 3 is a call of its own
    overrides = {"train.epochs": "3", "train.epochs_per_call": "3"}
    plain = jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path / "plain", quiet=True)
    profiled = jaxepochs.train_and_evaluate(
        tiny_config({**overrides, "train.profile_epochs": "(2,)"}), tmp_path / "profiled", quiet=True
    )
    untimed = lambda rows: [{k: v for k, v in row.items() if k not in TIMED} for row in rows]
    assert untimed(profiled.history) == untimed(plain.history)
    (trace,) = (tmp_path / "profiled" / "profile" / "plugins" / "profile").glob("*/perfetto_trace.json.gz")
    assert "jit(run_epochs)" in gzip.decompress(trace.read_bytes()).decode()
    assert list(trace.parent.glob("*.xplane.pb"))  # TensorBoard's profile plugin reads these
    # Profiling may be asked for when a run resumes: it changes no number.
    longer = {**overrides, "train.epochs": "4", "train.profile_epochs": "(4,)"}
    shutil.rmtree(tmp_path / "profiled" / "profile")
    jaxepochs.train_and_evaluate(tiny_config(longer), tmp_path / "profiled", quiet=True)
    assert list((tmp_path / "profiled" / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    with pytest.raises(ValueError, match=r"train.profile_epochs = \(4,\). Name epochs of the run, 1 to 3"):
        jaxepochs.train_and_evaluate(tiny_config({**overrides, "train.profile_epochs": "(4,)"}), tmp_path / "x")


def test_compare_overlays_runs_and_a_sweep_s_members_and_tabulates_them(tmp_path, capsys):
    from jaxepochs import cli
    from jaxepochs.sweep import grid as grid_lib

    stopping = {"train.epochs": "30", "early_stopping.enabled": "True", "early_stopping.patience": "1",
                "optimizer.learning_rate": "0.05"}  # fmt: skip
    stopped = jaxepochs.train_and_evaluate(tiny_config(stopping), tmp_path / "stopped", quiet=True)
    plain = jaxepochs.train_and_evaluate(tiny_config(), tmp_path / "plain", quiet=True)
    base = tiny_config()
    swept = jaxepochs.sweep(base, grid_lib.expand(base, {"seed": "0,1"}), tmp_path / "sweep", quiet=True)
    dirs = [str(tmp_path / name) for name in ("stopped", "plain", "sweep")]
    assert cli.main(["compare", *dirs, "--out", str(tmp_path / "out" / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| name | dataset | model | best_epoch | metric | best_value | stopped_epoch |" in out and "cmp.png" in out
    with (tmp_path / "out" / "cmp.csv").open() as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["stopped", "plain", "sweep seed=0", "sweep seed=1"]  # members by their swept values
    assert (rows["plain"]["dataset"], rows["plain"]["model"]) == ("mnist1d", "mlp")
    for name, summary in (("stopped", stopped.summary), ("plain", plain.summary)):
        assert int(rows[name]["best_epoch"]) == summary["best_epoch"]
        assert int(rows[name]["stopped_epoch"]) == summary["stopped_epoch"]
        assert float(rows[name]["test_accuracy"]) == summary["test_accuracy"]
    member = next(r for r in swept.results if r["run"] == "r1")
    assert float(rows["sweep seed=1"]["best_value"]) == pytest.approx(member["best_val_loss"])
    assert int(rows["stopped"]["stopped_epoch"]) > 0 and (tmp_path / "out" / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["compare", str(tmp_path / "out")]) == 2
    assert "holds no finished run" in capsys.readouterr().err
