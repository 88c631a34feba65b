"""Issue #28: user-facing faults (a kill while a log is rewritten, writers' contract, workdir kinds, hooks' dtypes,
MLflow paths, split shapes, lr-find's lock, false warnings, overrides of experiment.*, messages, a full disk in
TensorBoard). Each test fails before anything compiles where it can."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import EXPERIMENT, _events
from test_hooks import _module

from jaxepochs.host import report, tensorboard, writers
from jaxepochs.host.specs import specs_of
from jaxepochs.studies import compare


class Killed(BaseException):
    """A SIGKILL's stand-in: nothing after it runs."""


def _rows(n: int) -> list[dict]:
    return [{"epoch": e, "steps": 10 * e, "train_loss": 1.0 / e, "learning_rate": 0.1} for e in range(1, n + 1)]


def _kill_after(monkeypatch, module, name: str, calls: int) -> None:
    """`module.name` raises Killed at its `calls`-th call."""
    real, count = getattr(module, name), [0]

    def patched(*args, **kwargs):
        count[0] += 1
        if count[0] >= calls:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


def test_a_kill_while_metrics_jsonl_is_rebuilt_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = report.MetricsLog(path, _rows(3))
    log.close()
    before = path.read_bytes()
    _kill_after(monkeypatch, report, "_jsonable", 6)  # inside the second restored row
    with pytest.raises(Killed):
        report.MetricsLog(path, _rows(2))
    assert path.read_bytes() == before
    monkeypatch.undo()
    log = report.MetricsLog(path, _rows(2))  # the rebuild itself: a temporary file renamed over the old one
    log.write_rows(_rows(3)[2:])
    log.close()
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_a_kill_while_tensorboard_is_rebuilt_leaves_the_old_event_file(tmp_path, monkeypatch):
    directory = tmp_path / "tensorboard"
    writers.TensorBoardLog(directory, _rows(3)).close()
    (old,) = directory.iterdir()
    before = old.read_bytes()
    _kill_after(monkeypatch, tensorboard, "scalars", 2)  # the event file's module (writers re-exports it)
    with pytest.raises(Killed):
        writers.TensorBoardLog(directory, _rows(2))
    assert [p.name for p in directory.iterdir() if not p.name.endswith(".tmp")] == [old.name]
    assert old.read_bytes() == before
    monkeypatch.undo()
    board = writers.TensorBoardLog(directory, _rows(2))
    board.write(_rows(4)[3])
    board.close()
    assert [p.name for p in directory.iterdir()] == [old.name]
    assert [step for step, _ in _events(directory)["train_loss"]] == [1, 2, 4]


def test_compare_refuses_a_run_whose_metrics_jsonl_was_cut_short(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    report.write_json(run / "summary.json", {"epochs_completed": 3, "best_epoch": 3, "stop_reason": "completed"})
    (run / "metrics.jsonl").write_text(json.dumps(_rows(1)[0]) + "\n")
    with pytest.raises(compare.CompareError, match=r"run/metrics.jsonl holds 1 rows .* completed 3 epochs"):
        compare.read([run])
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _rows(3))[:-20])
    with pytest.raises(compare.CompareError, match=r"run/metrics.jsonl is damaged"):
        compare.read([run])


def test_every_writer_implements_the_metric_writer_protocol(tmp_path):

    protocol = writers.MetricWriter
    assert protocol is report.MetricWriter
    for cls in (writers.CsvLog, writers.TensorBoardLog, writers.MlflowLog, writers.Logs, writers.NullWriter):
        assert issubclass(cls, protocol) and protocol in cls.__mro__, cls  # explicitly, not by habit
    assert protocol in report.MetricsLog.__mro__
    made = [
        report.MetricsLog(tmp_path / "metrics.jsonl", _rows(1)),
        writers.CsvLog(tmp_path / "metrics.csv", _rows(1)),
        writers.TensorBoardLog(tmp_path / "tensorboard", _rows(1)),
        writers.NullWriter(),
    ]
    made.append(writers.Logs(made[0], {"metrics.csv": made[1], "tensorboard": made[2]}))
    for writer in made:
        assert isinstance(writer, protocol), writer
        writer.write_rows(_rows(2)[1:])
    for writer in reversed(made):
        writer.close()
    assert [row["epoch"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [1, 2, 2]
    assert not isinstance(object(), protocol)

    class Incomplete(protocol):
        def close(self) -> None:
            pass

    with pytest.raises(TypeError):
        Incomplete()  # a writer that forgets write_rows fails when made, not when the first rows come


def _tree(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("restart", [False, True])
def test_a_run_into_a_sweep_s_workdir_is_refused_before_anything_is_written(tmp_path, restart):
    from conftest import tiny_config

    from jaxepochs import cli
    from jaxepochs.host import workdir as workdir_lib

    sweep = tmp_path / "sweep"
    (sweep / "tensorboard" / "r0").mkdir(parents=True)
    (sweep / "tensorboard" / "r0" / "events.out.tfevents.1.h.jaxepochs").write_bytes(b"events")
    (sweep / "sweep.json").write_text("{}\n")
    (sweep / "metrics.csv").write_text("run,epoch,train_loss\nr0,1,0.5\n")
    before = _tree(sweep)
    with pytest.raises(workdir_lib.WorkdirError, match=r"holds a sweep \(`jaxepochs sweep`\), not a run .* --workdir"):
        workdir_lib.prepare_workdir(sweep, tiny_config(), restart=restart)
    assert _tree(sweep) == before
    # lr-find's constant_rates/ is a sweep's workdir; lr-find's own, a study's and a run's refuse the others too.
    run = tmp_path / "run"
    workdir_lib.prepare_workdir(run, tiny_config(), restart=False)
    assert workdir_lib.kind_of(run) == "run" and json.loads((run / "jaxepochs.json").read_text()) == {"kind": "run"}
    with pytest.raises(workdir_lib.WorkdirError, match=r"holds a run \(`jaxepochs run`\), not a sweep"):
        workdir_lib.check_kind(run, "sweep")
    workdir_lib.claim(tmp_path / "lr", "lr-find")
    for kind in ("run", "sweep", "study"):
        with pytest.raises(workdir_lib.WorkdirError, match="holds a learning-rate range test"):
            workdir_lib.claim(tmp_path / "lr", kind)
    # The command line says it in one line, exit 2, before the data is read.
    code = cli.main(["run", "--config", str(EXPERIMENT), "--workdir", str(sweep), "--config.train.epochs=1"])
    assert code == 2 and _tree(sweep) == before


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            "def loss_fn(outputs, batch):\n    return (outputs[:, 0] > 0).astype(jnp.int32)\n",
            r"loss_fn in .*exp\.py returned a loss of dtype int32; it must be floating point .* Return float "
            "per-example values",
        ),
        (
            "def metrics_fn(outputs, batch):\n    return {'hit': outputs[:, 0] > 0}\n",
            r'metrics_fn in .*exp\.py returned a metric "hit" of dtype bool; .* Return float per-example values',
        ),
    ],
)
def test_a_loss_or_metric_of_integers_is_refused_before_compiling(tmp_path, extra, match):
    import jaxepochs
    from jaxepochs.host.config import ConfigError

    path = _module(tmp_path, extra="import jax.numpy as jnp\n" + extra)
    with pytest.raises(ConfigError, match=match):
        jaxepochs.train_and_evaluate(jaxepochs.load_config_file(path), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("relative", [True, False])
def test_mlflow_takes_a_plain_path_as_the_file_store_it_names(tmp_path, monkeypatch, relative):
    from conftest import tiny_config
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after: tracking_uri sets it
    store = tmp_path / "mlruns2"
    given = "./mlruns2" if relative else str(store)
    config = tiny_config({"logging.mlflow": "True", "logging.mlflow_tracking_uri": given})
    assert writers.tracking_uri(config.logging.mlflow_tracking_uri) == store.as_uri()
    for named in ("databricks", "http://localhost:5000", "sqlite:///x.db", "file:///tmp/x"):
        assert writers.tracking_uri(named) == named
    (tmp_path / "run").mkdir()
    log = writers.MlflowLog(tmp_path / "run", specs_of(config).logging, _rows(2))
    client = MlflowClient(store.as_uri())
    assert [(m.step, m.value) for m in client.get_metric_history(log.run_id, "train_loss")] == [(1, 1.0), (2, 0.5)]
    assert json.loads((tmp_path / "run" / "mlflow.json").read_text())["tracking_uri"] == store.as_uri()


def _split(n: int, x) -> dict:
    return {"x": x, "y": np.arange(n) % 2}


@pytest.mark.parametrize(
    ("test_x", "train_x", "match"),
    [
        (
            np.zeros((4, 5), np.float32),
            np.zeros((8, 8), np.float32),
            r'get_data in exp.py: split "test" has x of per-example shape \(5,\) \(float32\), but split "train" '
            r"has \(8,\) \(float32\); .* same per-example shape and dtype",
        ),
        (
            {"a": np.zeros((4, 3)), "b": np.zeros((4, 2, 2), np.int32)},
            {"a": np.zeros((8, 3)), "b": np.zeros((8, 2), np.int32)},
            r"split \"test\" has x\['b'\] of per-example shape \(2, 2\) \(int32\), but split \"train\" has \(2,\)",
        ),
        (
            {"a": np.zeros((4, 3))},
            {"a": np.zeros((8, 3)), "b": np.zeros((8, 2))},
            r"split \"test\" has inputs \[\"x\['a'\]\", 'y'\] but split \"train\" has",
        ),
        (
            np.zeros((4, 8), np.int32),
            np.zeros((8, 8), np.float32),
            r"split \"test\" has x of per-example shape \(8,\) \(int32\), but split \"train\" has \(8,\) \(float32\)",
        ),
    ],
)
def test_splits_whose_inputs_differ_from_the_training_split_s_are_refused(test_x, train_x, match):
    from conftest import tiny_config

    from jaxepochs.data import loading

    splits = {"train": _split(8, train_x), "test": _split(4, test_x)}
    with pytest.raises(loading.DataError, match=match):
        loading.from_arrays(tiny_config({"data.validation_fraction": "0.0"}), splits, "get_data in exp.py")
    splits = {"train": _split(8, train_x), "test": _split(4, train_x), "validation": _split(2, test_x)}
    with pytest.raises(loading.DataError, match=match.replace("test", "validation")):
        loading.from_arrays(tiny_config(), splits, "get_data in exp.py")


def test_lr_find_takes_the_workdir_lock_before_anything_else(tmp_path, monkeypatch):
    from conftest import tiny_config

    from jaxepochs.data import lock
    from jaxepochs.studies import lr_find

    def compiled(*args, **kwargs):
        with pytest.raises(lock.LockedError):  # lr-find holds it while it works
            lock.check_free(tmp_path / "w", "workdir")
        raise AssertionError("the range test ran")

    monkeypatch.setattr(lr_find, "range_test", compiled)
    for holder in ("workdir", "sweep workdir"):  # a live run's workdir, a second lr-find's
        with lock.hold(tmp_path / "w", holder):
            with pytest.raises(lock.LockedError, match=r"the workdir .*/w is in use by pid \d+"):
                lr_find.lr_find(tiny_config(), tmp_path / "w", quiet=True)
    with pytest.raises(AssertionError, match="range test ran"):  # free: it goes on, holding the lock
        lr_find.lr_find(tiny_config(), tmp_path / "w", quiet=True)


def test_data_stream_with_get_data_is_not_said_to_be_unused(tmp_path):
    import warnings

    import jaxepochs
    from jaxepochs.host import hooks

    config = jaxepochs.load_config_file(_module(tmp_path, config="config.data.stream = True"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooks.load_hooks(config)
        hooks.load_hooks(
            jaxepochs.load_config_file(_module(tmp_path, config="config.data.device_memory_bytes = 10**9"))
        )
        hooks.load_hooks(jaxepochs.load_config_file(_module(tmp_path, config="config.data.label_noise = 0.1")))
    assert not [w for w in caught if "is not used" in str(w.message)], [str(w.message) for w in caught]
    with pytest.warns(UserWarning, match=r"config.data.name is not used"):  # what get_data does replace
        hooks.load_hooks(jaxepochs.load_config_file(_module(tmp_path, config="config.data.name = 'digits'")))


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--config", "{module}", "--workdir", "{w}", "--config.experiment.module={other}"],
        ["run", "--config", "{module}", "--workdir", "{w}", "--config.experiment.source_sha256", "0"],
        ["sweep", "--config", "{module}", "--workdir", "{w}", "--config.experiment.module={other}", "--sweep.seed=0,1"],
        ["sweep", "--config", "{module}", "--workdir", "{w}", "--sweep.experiment.module={other},{module}"],
        ["lr-find", "--config", "{module}", "--workdir", "{w}", "--config.experiment.module={other}"],
    ],
)
def test_experiment_keys_cannot_be_overridden_on_the_command_line(tmp_path, capsys, argv):
    from jaxepochs import cli

    names = {"module": str(EXPERIMENT), "other": str(tmp_path / "other.py"), "w": str(tmp_path / "w")}
    assert cli.main([arg.format(**names) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--(config|sweep)\.experiment\.\w+: experiment\.\* records the experiment module .* cannot be "
                     r"overridden\. Pass the module itself as --config PATH", err), err  # fmt: skip
    assert not (tmp_path / "w").exists()


def test_a_get_data_dataset_is_named_after_its_module_not_a_split():
    from conftest import tiny_config

    from jaxepochs.data import loading

    splits = {"train": _split(8, np.zeros((8, 3))), "test": _split(4, np.zeros((4, 3)))}
    dataset = loading.from_arrays(tiny_config(), splits, "get_data in exp.py", "exp.get_data")
    assert dataset.name == "exp.get_data"
    assert loading.from_arrays(tiny_config(), splits, "get_data in exp.py").name == "get_data in exp.py"


@pytest.mark.parametrize("command", ["run", "sweep", "lr-find"])
def test_a_config_that_is_not_a_python_file_says_what_a_config_is(tmp_path, capsys, command):
    from jaxepochs import cli

    for name in ("README.md", "config.txt"):
        (tmp_path / name).write_text("# not a module\n")
        argv = [command, "--config", str(tmp_path / name), "--workdir", str(tmp_path / "w")]
        assert cli.main(argv + (["--sweep.seed=0,1"] if command == "sweep" else [])) == 2
        err = capsys.readouterr().err
        assert f"--config {tmp_path / name} is not a Python file" in err and "defines get_config()" in err, err
        assert "AttributeError" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("split", "x", "y", "match"),
    [
        ("train", np.array([["a", "b"]] * 8), np.arange(8) % 2, r'split "train" has x of dtype <U1, which is not'),
        ("test", {"ids": np.zeros((4, 2)), "text": np.array(["t"] * 4, dtype=object)}, np.arange(4) % 2,
         r"split \"test\" has x\['text'\] of dtype object, which is not numeric"),
        ("test", np.zeros((4, 2)), np.array(["cat", "dog"] * 2), r'split "test" has y of dtype <U3, which is not'),
    ],
)  # fmt: skip
def test_non_numeric_get_data_arrays_are_refused_naming_the_split_and_key(split, x, y, match):
    from conftest import tiny_config

    from jaxepochs.data import loading

    splits = {"train": _split(8, np.zeros((8, 2))), "test": _split(4, np.zeros((4, 2)))}
    splits[split] = {"x": x, "y": y}
    with pytest.raises(loading.DataError, match=match + r".* Convert it in get_data"):
        loading.from_arrays(tiny_config(), splits, "get_data in exp.py")


def test_a_non_finite_loss_from_a_module_s_loss_fn_names_the_loss_fn(tmp_path):
    import jaxepochs
    from jaxepochs.host import run

    extra = "import jax.numpy as jnp\ndef loss_fn(outputs, batch):\n    return jnp.sum(outputs, -1) * jnp.nan\n"
    path = _module(tmp_path, config="config.train.epochs = 1", extra=extra)
    with pytest.raises(run.NonFiniteLossError, match=r"learning_rate .*; or check loss_fn in .*exp\.py, which may"):
        jaxepochs.train_and_evaluate(jaxepochs.load_config_file(path), tmp_path / "run", quiet=True)


def test_a_full_disk_under_tensorboard_is_the_run_s_oserror_and_leaves_whole_records(tmp_path, monkeypatch):
    import errno
    import os

    directory = tmp_path / "tensorboard"
    board = writers.TensorBoardLog(directory, _rows(2))
    (path,) = directory.iterdir()
    size = path.stat().st_size
    real = os.write

    def full(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.os, "write", full)
    with pytest.raises(OSError, match="No space left") as raised:
        board.write_rows(_rows(3)[2:])
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert path.stat().st_size == size  # the half record was cut off again
    # Through Logs: the workdir's writers' disk errors are the run's (it saves and stops), not a dropped writer.
    logs = writers.Logs(writers.NullWriter(), {"tensorboard": board})
    with pytest.raises(OSError, match="No space left") as raised:
        logs.write_rows(_rows(3)[2:])
    assert raised.value.filename == str(path)
    monkeypatch.undo()
    logs.write_rows(_rows(3)[2:])  # the disk has room again: whole records follow the whole ones
    logs.close()
    assert [step for step, _ in _events(directory)["train_loss"]] == [1, 2, 3]


def test_a_fine_tuning_sweep_resumes_once_its_source_is_gone(tmp_path):
    import shutil

    from conftest import tiny_config

    import jaxepochs

    source = tmp_path / "source"
    jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "1"}), source, quiet=True)
    config = tiny_config({"init.from_workdir": str(source), "train.epochs": "1"})
    grid = [{"seed": "0"}, {"seed": "1"}]
    first = jaxepochs.sweep(config, grid, tmp_path / "sweep", quiet=True)
    shutil.rmtree(source)  # only a fresh start reads it: the rerun restores the sweep's own checkpoints
    again = jaxepochs.sweep(config, grid, tmp_path / "sweep", quiet=True)
    assert again.histories == first.histories


def test_a_resumed_fine_tuning_run_keeps_what_identifies_its_source(tmp_path):
    import hashlib
    import shutil

    from conftest import tiny_config

    import jaxepochs

    source = tmp_path / "source"
    jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "1"}), source, quiet=True)
    expected = {
        "workdir": str(source),
        "epoch": "last",
        "config_sha256": hashlib.sha256((source / "config.json").read_bytes()).hexdigest(),
        "epoch_loaded": 1,
    }
    config = tiny_config({"init.from_workdir": str(source), "train.epochs": "1"})
    first = jaxepochs.train_and_evaluate(config, tmp_path / "tuned", quiet=True).summary["initialised_from"]
    assert {k: first[k] for k in expected} == expected
    shutil.rmtree(source)  # the resumed run never reads it again, and still says where it started
    config.train.epochs = 2
    jaxepochs.train_and_evaluate(config, tmp_path / "tuned", quiet=True)
    assert json.loads((tmp_path / "tuned" / "summary.json").read_text())["initialised_from"] == first


def test_a_run_resumed_on_another_mesh_says_so_and_records_each_mesh(tmp_path, capsys):
    from conftest import tiny_config

    import jaxepochs

    workdir = tmp_path / "run"
    jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "1", "mesh.data": "2"}), workdir, quiet=True)
    capsys.readouterr()
    jaxepochs.train_and_evaluate(tiny_config({"mesh.data": "1"}), workdir, plot=False)
    said = "".join(capsys.readouterr())
    assert re.search(r"Resuming on 1 device .*; the checkpoint was written on 2 .*: the last digits may differ", said)
    meshes = json.loads((workdir / "summary.json").read_text())["meshes"]
    assert [(m["epochs"], m["devices"], m["mesh"]["data"]) for m in meshes] == [([1, 1], 2, 2), ([2, 2], 1, 1)]


def test_a_streamed_run_resumed_device_resident_says_its_position_inside_the_epoch_is_dropped(
    tmp_path, monkeypatch, capsys
):
    from conftest import tiny_config

    import jaxepochs
    from jaxepochs.data import loading
    from jaxepochs.data import rows as rows_lib

    stream = {"data.stream": "True", "train.steps_per_call": "4", "train.epochs": "1"}
    real, reads = rows_lib.Rows.__getitem__, [0]

    def failing(self, idx):
        reads[0] += 1
        if reads[0] == 10:  # inside epoch 1: the position there is saved
            raise OSError(5, "Input/output error", "x.npy")
        return real(self, idx)

    monkeypatch.setattr(rows_lib.Rows, "__getitem__", failing)
    with pytest.raises(loading.DataError):
        jaxepochs.train_and_evaluate(tiny_config(stream), tmp_path / "w", quiet=True)
    monkeypatch.undo()
    capsys.readouterr()
    result = jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "1"}), tmp_path / "w", plot=False)
    said = "".join(capsys.readouterr())
    dropped = (
        r"holds a streamed run's position inside epoch 1 \(step \d+ of 57\); with data.stream = False epochs start "
        r"whole, so the run resumes from its initialisation and epoch 1 trains again"
    )
    assert re.search(dropped, said), said
    assert not result.summary["streamed"] and len(result.history) == 1


def test_tensorboard_through_a_symlink_keeps_what_it_points_to_and_a_dangling_workdir_link_is_named(tmp_path):
    import os

    from conftest import tiny_config

    import jaxepochs
    from jaxepochs.host import workdir as workdir_lib

    target, run = tmp_path / "elsewhere", tmp_path / "run"
    (target / "notes").mkdir(parents=True)
    (target / "notes" / "keep.txt").write_text("mine\n")
    (target / "keep.txt").write_text("mine\n")
    run.mkdir()
    os.symlink(target, run / "tensorboard")
    writers.TensorBoardLog(run / "tensorboard", _rows(2)).close()
    writers.TensorBoardLog(run / "tensorboard", _rows(3)).close()  # a resume rebuilds its own file only
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith("events.")) == ["keep.txt", "notes"]
    assert [step for step, _ in _events(run / "tensorboard")["train_loss"]] == [1, 2, 3]
    workdir_lib._discard(run)  # --restart: the link and what it holds are kept, its event files go
    assert (run / "tensorboard").is_symlink() and (target / "notes" / "keep.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "notes"]
    os.symlink(tmp_path / "gone", tmp_path / "board")  # a dangling link: its target is made
    writers.TensorBoardLog(tmp_path / "board", _rows(1)).close()
    assert len(list((tmp_path / "gone").iterdir())) == 1
    os.symlink(tmp_path / "missing", tmp_path / "link")
    with pytest.raises(workdir_lib.WorkdirError, match=r"--workdir .*/link is a symbolic link to .*/missing, which"):
        jaxepochs.train_and_evaluate(tiny_config(), tmp_path / "link", quiet=True)


# --- 12. Ctrl-C in the first seconds -------------------------------------------------------------------------------


def test_a_ctrl_c_during_the_imports_stops_the_command_before_it_writes_anything(tmp_path, jax_compilation_cache):
    """SIGINT a second after start lands in the imports of JAX or in reading the data: it was swallowed by JAX's
    gc callback (the run then trained to the end, exit 0) or a raw traceback through an import. Now: noted from
    the command's first line, exit 130 before the workdir is touched, one line and no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    workdir = tmp_path / "w"
    command = [sys.executable, "-m", "jaxepochs.cli", "run", "--config", str(EXPERIMENT), "--workdir", str(workdir)]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(jax_compilation_cache)}
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the command listens from its first line (~0.1 s); its imports alone take seconds
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130, err[-2000:]
    assert "Ctrl-C: stopping before the run starts" in err and "nothing was written" in err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert not workdir.exists()


def test_a_ctrl_c_while_the_program_compiles_writes_no_outputs_of_an_untrained_run(tmp_path, monkeypatch):
    """SIGINT while the first compile runs: the run waited for it, then evaluated the untrained model and wrote
    summary.json and curves.png as if it had trained. Now: KeyboardInterrupt after the compile, no rows, no
    summary, and the next run of the command starts afresh and trains."""
    import os
    import signal

    from conftest import tiny_config

    import jaxepochs
    from jaxepochs.host import batch as batch_lib

    real = batch_lib.RunBatch.prepare

    def prepare_then_ctrl_c(self, *args, **kwargs):
        prepared = real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # as if pressed while it compiled: the run's handler notes it
        return prepared

    monkeypatch.setattr(batch_lib.RunBatch, "prepare", prepare_then_ctrl_c)
    config = tiny_config({"train.epochs": "1", "logging.curves": "True"})
    with pytest.raises(KeyboardInterrupt):
        jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True)
    assert not (tmp_path / "w" / "summary.json").exists() and not (tmp_path / "w" / "curves.png").exists()
    assert not (tmp_path / "w" / "metrics.jsonl").exists() or not (tmp_path / "w" / "metrics.jsonl").read_text()
    monkeypatch.setattr(batch_lib.RunBatch, "prepare", real)
    result = jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True)
    assert [row["epoch"] for row in result.history] == [1]


def test_a_container_s_memory_limit_bounds_the_free_memory_on_cpu(tmp_path):
    """Open question of issue 28: in a 2 GiB container MemAvailable still says the host's memory, so a sweep's
    automatic chunk was sized for the host and the kernel killed it. The cgroup's limit minus its usage now bounds
    the figure (v2, then v1); no limit ("max", v1's 2^63) leaves the host's."""
    from jaxepochs.host import devices

    host, _ = devices.free_bytes(str(tmp_path / "none"))
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "memory.max").write_text(f"{512 << 20}\n")
    (tmp_path / "v2" / "memory.current").write_text(f"{256 << 20}\n")
    assert devices.free_bytes(str(tmp_path / "v2")) == (256 << 20, "memory left under the container's limit (cgroup)")
    (tmp_path / "v2" / "memory.max").write_text("max\n")
    assert (
        devices.free_bytes(str(tmp_path / "v2"))[0] == host
        or abs(devices.free_bytes(str(tmp_path / "v2"))[0] - host) < 256 << 20
    )
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{(1 << 63) - 4096}\n")
    (v1 / "memory.usage_in_bytes").write_text("1000\n")
    assert "host memory" in devices.free_bytes(str(tmp_path / "v1"))[1]
    (v1 / "memory.limit_in_bytes").write_text(f"{300 << 20}\n")
    assert devices.free_bytes(str(tmp_path / "v1"))[0] == (300 << 20) - 1000
