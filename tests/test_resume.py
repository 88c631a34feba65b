"""Checkpoints and exact resume: a run continued from a checkpoint (after finishing, SIGKILL, Ctrl-C, a corrupt
checkpoint or a non-finite loss) repeats an uninterrupted one bit for bit; load() and its errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import EXPERIMENT, REPO, assert_writers_hold_the_rows, tiny_config

import jaxepochs
from jaxepochs import cli, models
from jaxepochs.core import task as task_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import run as train
from jaxepochs.host import workdir as workdir_lib
from jaxepochs.host.checkpoint import CheckpointError

SUBPROCESS_WAIT = 120.0  # generous: a loaded 2-core machine starts jax slowly
CLI_EPOCHS = 100  # at ~0.15 s an epoch when checkpointing every epoch: still running when the test stops it
# With these overrides the experiment file gives tiny_config's config (base_config with the same values).
CLI_OVERRIDES = {
    "logging.curves": "False",
    "model.hidden_sizes": "(16,)",
    "model.residual": "False",
    "train.batch_size": "64",
    "train.epochs": str(CLI_EPOCHS),
    "checkpoint.every_epochs": "1",
    "mesh.data": "1",
    # A moving average of the parameters, kept (and so checkpointed and resumed) but not evaluated: the kills
    # below resume it bit for bit, and the rows stay the plain run's.
    "train.ema_decay": "0.9",
    "train.eval_weights": "trained",
}
# Resumes and references checkpoint only at the end (checkpoint.* may change on resume and never changes the
# numbers); saving each of 100 epochs would take 15 s.
CLI_RESUME = {**CLI_OVERRIDES, "checkpoint.every_epochs": "0"}


# --- helpers ------------------------------------------------------------------------------------------------


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in train.TIMING_KEYS} for row in rows]


def _summary(workdir) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def _saved_epochs(workdir) -> list[int]:
    """Finished checkpoints: orbax writes into a temporary directory and renames it to the bare epoch."""
    directory = workdir / checkpoint_lib.CHECKPOINT_DIR
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_bitwise_equal(actual, expected) -> None:
    actual, expected = _leaves(actual), _leaves(expected)
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), f"{name} differs"


def _assert_same_run(workdir, result, ref_workdir, ref_result) -> None:
    """Same final state (params, optimizer state, step, key), same newest checkpoint, same metrics."""
    _assert_bitwise_equal(result.state, ref_result.state)
    _assert_bitwise_equal(jaxepochs.load(workdir), jaxepochs.load(ref_workdir))
    assert _untimed(_rows(workdir)) == _untimed(_rows(ref_workdir))
    assert _untimed(result.history) == _untimed(ref_result.history)
    assert result.summary["test_loss"] == ref_result.summary["test_loss"]


def _assert_checkpoints_consistent(workdir, rows: list[dict]) -> None:
    """Each checkpoint's metadata holds its own epoch and exactly the rows up to it (which `rows` starts with)."""
    directory = (workdir / checkpoint_lib.CHECKPOINT_DIR).absolute()
    with ocp.CheckpointManager(directory, item_handlers={"meta": ocp.JsonCheckpointHandler()}) as manager:
        for epoch in _saved_epochs(workdir):
            meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            assert meta["epoch"] == epoch
            history = meta["histories"]["r0"]  # a run is a batch of one run, "r0"
            assert [row["epoch"] for row in history] == list(range(1, epoch + 1)), f"checkpoint {epoch}"
            assert history == rows[:epoch]


def _corrupt(checkpoint_dir) -> int:
    """Overwrites every file of the checkpoint's arrays with garbage; returns how many."""
    files = [p for p in (checkpoint_dir / "arrays").rglob("*") if p.is_file()]
    for path in files:
        path.write_bytes(b"not a checkpoint" * 8)
    return len(files)


def _cli_env(cache_dir) -> dict[str, str]:
    """conftest's settings (2 host devices, CPU, the session's TFDS dir and compilation cache) for a child."""
    return {
        **os.environ,  # XLA_FLAGS, JAX_PLATFORMS and TFDS_DATA_DIR, set by conftest
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _start_cli(workdir, stderr_path, cache_dir, quiet: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "jaxepochs.cli", "run", "--config", "experiments/mnist1d_mlp.py"]
    command += ["--workdir", str(workdir), *(["--quiet"] if quiet else [])]
    command += [f"--config.{key}={value}" for key, value in CLI_OVERRIDES.items()]
    with stderr_path.open("w") as stderr:  # a file, not a pipe: a full pipe would block the child
        return subprocess.Popen(command, cwd=REPO, env=_cli_env(cache_dir), stdout=subprocess.DEVNULL, stderr=stderr)


# --- references ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    """tiny_config, six epochs, a checkpoint every two, uninterrupted."""
    workdir = tmp_path_factory.mktemp("run6")
    config = tiny_config({"train.epochs": "6", "checkpoint.every_epochs": "2"})
    return config, workdir, jaxepochs.train_and_evaluate(config, workdir, quiet=True)


@pytest.fixture(scope="module")
def run_cli_uninterrupted(tmp_path_factory):
    """The CLI runs' config, uninterrupted, in-process."""
    workdir = tmp_path_factory.mktemp("cli_reference")
    return workdir, jaxepochs.train_and_evaluate(tiny_config(CLI_RESUME), workdir, quiet=True)


@pytest.fixture(scope="module")
def stopped_cli_runs(run_cli_uninterrupted, tmp_path_factory, jax_compilation_cache):
    """Two CLI runs of CLI_OVERRIDES, started together so that their start-ups overlap: "killed" gets SIGKILL
    once it has two checkpoints, "interrupted" (not quiet) SIGINT once it has one. {name: (workdir, returncode,
    stderr)}. The reference run has prepared the dataset, so the children do not race to."""
    root = tmp_path_factory.mktemp("cli")
    plans = {"killed": (signal.SIGKILL, 2, True), "interrupted": (signal.SIGINT, 1, False)}
    children = {}
    try:
        for name, (_, _, quiet) in plans.items():
            children[name] = _start_cli(root / name, root / f"{name}.stderr", jax_compilation_cache, quiet)
        pending, deadline = dict(plans), time.monotonic() + SUBPROCESS_WAIT
        while pending:
            for name, (signum, checkpoints, _) in list(pending.items()):
                if children[name].poll() is not None:
                    pytest.fail(f"{name}: the run ended (returncode {children[name].returncode}) before the signal")
                if len(_saved_epochs(root / name)) >= checkpoints:
                    children[name].send_signal(signum)
                    del pending[name]
            if time.monotonic() > deadline:
                pytest.fail(f"{sorted(pending)}: too few checkpoints after {SUBPROCESS_WAIT} s")
            time.sleep(0.01)
        returncodes = {name: child.wait(timeout=SUBPROCESS_WAIT) for name, child in children.items()}
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    return {name: (root / name, returncodes[name], (root / f"{name}.stderr").read_text()) for name in plans}


# --- exact resume -------------------------------------------------------------------------------------------


def test_extending_a_finished_run_repeats_the_longer_run(run6, tmp_path, capsys):
    config, ref_workdir, ref = run6
    assert _saved_epochs(ref_workdir) == [2, 4, 6]
    workdir = tmp_path / "extended"
    every_epoch = {"train.epochs": "3", "checkpoint.every_epochs": "1", "checkpoint.max_to_keep": "5"}
    short = jaxepochs.train_and_evaluate(tiny_config(every_epoch), workdir)  # checkpoint.* may change on resume
    assert len(short.history) == 3 and _saved_epochs(workdir) == [1, 2, 3]
    _assert_checkpoints_consistent(workdir, short.history)
    _assert_checkpoints_consistent(ref_workdir, ref.history)
    capsys.readouterr()

    result = jaxepochs.train_and_evaluate(config, workdir)
    assert f"Resuming {workdir} from the checkpoint of epoch 3." in capsys.readouterr().err
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.history[:3] == short.history  # the first three rows come from the checkpoint, timings too
    assert _saved_epochs(workdir) == [3, 4, 6]  # max_to_keep is 3 now
    _assert_checkpoints_consistent(workdir, result.history)
    _assert_same_run(workdir, result, ref_workdir, ref)
    _assert_bitwise_equal(jaxepochs.load(workdir, 4), jaxepochs.load(ref_workdir, 4))
    assert json.loads((workdir / "config.json").read_text())["train"]["epochs"] == 6
    assert _untimed(_rows(workdir)) == _untimed(json.loads(json.dumps(result.history)))


def test_sigkill_mid_run_then_resume_is_exact(run_cli_uninterrupted, stopped_cli_runs, capsys):
    ref_workdir, ref = run_cli_uninterrupted
    workdir, returncode, err = stopped_cli_runs["killed"]
    assert returncode == -signal.SIGKILL, err[-3000:]
    lines = (workdir / "metrics.jsonl").read_text().split("\n")[:-1]  # the last line may be cut off
    finished_rows = len(lines)
    assert finished_rows < CLI_EPOCHS
    assert not (workdir / "summary.json").exists()  # it never finished
    saved = _saved_epochs(workdir)
    assert len(saved) >= 2 and saved[-1] <= finished_rows
    _assert_checkpoints_consistent(workdir, [json.loads(line) for line in lines])

    result = jaxepochs.train_and_evaluate(tiny_config(CLI_RESUME), workdir)  # it refuses another config
    err = capsys.readouterr().err
    resumed_from = int(re.search(r"from the checkpoint of epoch (\d+)\.", err).group(1))
    assert resumed_from == saved[-1]
    assert result.history[:resumed_from] == [json.loads(line) for line in lines[:resumed_from]]
    assert len(result.history) == CLI_EPOCHS
    _assert_same_run(workdir, result, ref_workdir, ref)
    assert_writers_hold_the_rows(workdir)  # metrics.csv and TensorBoard: every epoch once, none missing


def test_ctrl_c_saves_says_how_to_resume_and_resumes_exactly(run_cli_uninterrupted, stopped_cli_runs):
    ref_workdir, ref = run_cli_uninterrupted
    workdir, returncode, err = stopped_cli_runs["interrupted"]
    assert returncode == 130, err[-3000:]
    assert "Ctrl-C: stopping after the epochs in flight" in err
    assert "Run the same command again to resume." in err
    interrupted_after = int(re.search(r"Interrupted after epoch (\d+); checkpoint and outputs saved", err).group(1))
    rows = _rows(workdir)
    assert 1 <= interrupted_after == len(rows) < CLI_EPOCHS
    assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1))
    assert _saved_epochs(workdir)[-1] == len(rows)  # the epoch it stopped after was checkpointed
    _assert_checkpoints_consistent(workdir, rows)
    summary = json.loads((workdir / "summary.json").read_text())  # the outputs of the epochs it trained
    assert summary["stop_reason"] == "interrupted" and summary["epochs_completed"] == len(rows)
    assert int(jaxepochs.load(workdir).step) == rows[-1]["steps"] == len(rows) * ref.summary["steps_per_epoch"]

    result = jaxepochs.train_and_evaluate(tiny_config(CLI_RESUME), workdir, quiet=True)
    assert result.history[: len(rows)] == rows  # restored from the checkpoint, timings too
    _assert_same_run(workdir, result, ref_workdir, ref)


# --- a non-finite loss ----------------------------------------------------------------------------------------

# SGD at 3.0 diverges after a few finite epochs: the loss is NaN in epoch 5 on CPU (4 to 6 for seeds 0-3).
NAN_OVERRIDES = {
    "optimizer.name": "sgd",
    "optimizer.learning_rate": "3.0",
    "train.epochs": "10",
    "checkpoint.every_seconds": "3600",  # never by time, even on a slow machine: only the stop saves
}


def test_non_finite_loss_keeps_the_last_good_epoch(tmp_path, capsys):
    workdir = tmp_path / "nan"
    with pytest.raises(jaxepochs.NonFiniteLossError, match=r"non-finite in epoch (\d+)") as raised:
        jaxepochs.train_and_evaluate(tiny_config(NAN_OVERRIDES), workdir, quiet=True)
    rows = _rows(workdir)
    good = len(rows)
    assert 1 <= good < 10, "pick another learning rate: the run must train at least one finite epoch"
    assert f"in epoch {good + 1}" in str(raised.value)
    assert all(math.isfinite(row["train_loss"]) for row in rows)
    summary = _summary(workdir)
    assert summary["stop_reason"] == "non_finite_loss"
    assert summary["non_finite_epoch"] == summary["stopped_epoch"] == good + 1
    assert summary["epochs_completed"] == good
    assert _saved_epochs(workdir) == [good]  # saved before the NaN

    state = jaxepochs.load(workdir)
    assert all(np.isfinite(leaf).all() for leaf in _leaves(state.params).values())
    assert int(state.step) == good * summary["steps_per_epoch"]

    # Rerunning the command resumes from the last good epoch and fails the same way: exit status 2.
    capsys.readouterr()
    argv = ["run", "--config", str(EXPERIMENT), "--workdir", str(workdir), "--quiet"]
    argv += [f"--config.{k}={v}" for k, v in {**NAN_OVERRIDES, "model.hidden_sizes": "(16,)"}.items()]
    argv += ["--config.train.batch_size=64", "--config.model.residual=False"]
    assert cli.main(argv) == 2
    assert f"jaxepochs: error: Training loss became non-finite in epoch {good + 1}" in capsys.readouterr().err
    assert _rows(workdir) == rows  # restored from the checkpoint, timings too
    assert _summary(workdir)["non_finite_epoch"] == good + 1
    _assert_bitwise_equal(jaxepochs.load(workdir), state)


# --- corrupt checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_past_corrupt(run6, tmp_path_factory):
    """run6's workdir with its newest checkpoint (epoch 6 of 2, 4, 6) corrupted, then the same run again."""
    config, ref_workdir, _ = run6
    workdir = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(ref_workdir, workdir)
    corrupted = _corrupt(workdir / "checkpoints" / "6")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = jaxepochs.train_and_evaluate(config, workdir)
    return workdir, result, corrupted, err.getvalue()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(run6, resumed_past_corrupt):
    _, ref_workdir, ref = run6
    workdir, result, corrupted, err = resumed_past_corrupt
    assert corrupted > 0
    newest = (workdir / "checkpoints" / "6").absolute()
    assert re.search(rf"checkpoint {re.escape(str(newest))} is \w+.*falling back to the previous checkpoint", err)
    assert f"Resuming {workdir} from the checkpoint of epoch 4." in err
    _assert_bitwise_equal(result.state, ref.state)  # epochs 5 and 6 recomputed exactly
    assert _untimed(_rows(workdir)) == _untimed(_rows(ref_workdir))
    assert result.history[:4] == ref.history[:4]  # restored from the checkpoint of epoch 4, timings too
    assert result.summary["test_loss"] == ref.summary["test_loss"]
    _assert_bitwise_equal(jaxepochs.load(workdir, 4), jaxepochs.load(ref_workdir, 4))


def test_the_recomputed_epoch_replaces_the_corrupt_checkpoint(run6, resumed_past_corrupt):
    _, _, ref = run6
    _assert_bitwise_equal(jaxepochs.load(resumed_past_corrupt[0]), ref.state)


def test_every_checkpoint_corrupt_is_an_error_naming_them(run6, tmp_path):
    config, ref_workdir, _ = run6
    workdir = tmp_path / "all_corrupt"
    shutil.copytree(ref_workdir, workdir)
    for epoch in (2, 4, 6):
        assert _corrupt(workdir / "checkpoints" / str(epoch)) > 0
    with pytest.raises(CheckpointError, match=r"no checkpoint in the workdir can be restored.*--restart") as raised:
        jaxepochs.train_and_evaluate(config, workdir, quiet=True)
    for epoch in (2, 4, 6):
        assert f"checkpoint {(workdir / 'checkpoints' / str(epoch)).absolute()} is" in str(raised.value)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {(workdir / 'checkpoints' / '6').absolute()}")):
        jaxepochs.load(workdir)


# --- load() and the workdir's config --------------------------------------------------------------------------


def test_load_with_another_model_names_the_mismatched_parameter(run6, tmp_path):
    _, ref_workdir, _ = run6
    workdir = tmp_path / "other_model"
    shutil.copytree(ref_workdir, workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["hidden_sizes"] = [32]
    (workdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match the model") as raised:
        jaxepochs.load(workdir)
    message = str(raised.value)
    assert re.search(
        r"params\.Dense_0\.(bias: checkpoint has shape \(16,\), the model needs \(32,\)"
        r"|kernel: checkpoint has shape \(40, 16\), the model needs \(40, 32\))",
        message,
    )
    assert str((workdir / "checkpoints" / "6").absolute()) in message


def test_load_of_a_missing_epoch_lists_the_saved_ones(run6):
    _, ref_workdir, _ = run6
    with pytest.raises(jaxepochs.WorkdirError, match=r"no checkpoint of epoch 5; it has epochs \[2, 4, 6\]"):
        jaxepochs.load(ref_workdir, 5)


@pytest.mark.parametrize(
    "override, shown",
    [
        ({"seed": "1"}, "seed: 0 -> 1"),
        ({"model.hidden_sizes": "(32,)"}, "model.hidden_sizes: [16] -> [32]"),
        ({"optimizer.learning_rate": "0.02"}, "optimizer.learning_rate: 0.01 -> 0.02"),
        ({"train.batch_size": "32"}, "train.batch_size: 64 -> 32"),
        ({"data.validation_fraction": "0.2"}, "data.validation_fraction: 0.1 -> 0.2"),
    ],
)
def test_another_config_in_the_workdir_is_refused_naming_the_key(run6, tmp_path, override, shown):
    config, ref_workdir, _ = run6
    workdir = tmp_path / "used"
    shutil.copytree(ref_workdir, workdir)
    before = (workdir / "config.json").read_text()
    with pytest.raises(jaxepochs.WorkdirError, match=re.escape(f"another config ({shown})")):
        workdir_lib.prepare_workdir(workdir, jaxepochs.apply_overrides(config, override), restart=False)
    assert (workdir / "config.json").read_text() == before


@pytest.mark.parametrize(
    "override",
    [
        {"train.epochs": "9"},
        {"checkpoint.every_epochs": "5", "checkpoint.max_to_keep": "1", "checkpoint.every_seconds": "1.0"},
        {"data.data_dir": "/elsewhere"},
    ],
)
def test_epochs_and_checkpoint_settings_may_change_on_resume(run6, tmp_path, override):
    config, ref_workdir, _ = run6
    workdir = tmp_path / "used"
    shutil.copytree(ref_workdir, workdir)
    config = jaxepochs.apply_overrides(config, override)
    assert workdir_lib.prepare_workdir(workdir, config, restart=False) is True
    assert json.loads((workdir / "config.json").read_text()) == json.loads(config.to_json_best_effort())


# --- the best epoch -----------------------------------------------------------------------------------------


def test_restore_best_ends_with_the_best_checkpointed_params(tmp_path):
    config = tiny_config(
        {
            "train.epochs": "30",
            "early_stopping.enabled": "True",
            "early_stopping.patience": "1",
            "early_stopping.restore_best": "True",
        }
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    summary = result.summary
    assert summary["restored_best"] is True and summary["stop_reason"] == "patience"
    best = summary["best_epoch"]
    assert 1 <= best < summary["epochs_completed"] < 30
    best_state, last_state = jaxepochs.load(tmp_path, "best"), jaxepochs.load(tmp_path)
    _assert_bitwise_equal(result.state.params, best_state.params)
    _assert_bitwise_equal(best_state.opt_state, last_state.opt_state)  # "best" only swaps the parameters
    assert not np.array_equal(best_state.params["Dense_0"]["kernel"], last_state.params["Dense_0"]["kernel"])
    # The final validation pass ran on the best epoch's parameters: the same numbers as that epoch's row.
    assert summary["val_loss"] == result.history[best - 1]["val_loss"]


def test_load_best_without_early_stopping_is_the_lowest_val_loss_epoch(run_cli_uninterrupted):
    workdir, result = run_cli_uninterrupted  # 100 epochs: it overfits, val_loss rises after its minimum
    config = tiny_config(CLI_RESUME)
    rows = _rows(workdir)
    best = min(rows, key=lambda row: row["val_loss"])["epoch"]
    assert result.summary["best_epoch"] == best < len(rows), "pick a config whose last epoch is not the best"
    assert result.summary["restored_best"] is False
    best_state = jaxepochs.load(workdir, "best")
    _assert_bitwise_equal(result.state.params, jaxepochs.load(workdir).params)  # the last epoch's
    assert not np.array_equal(best_state.params["Dense_0"]["kernel"], result.state.params["Dense_0"]["kernel"])

    dataset = data_lib.load_dataset(config, quiet=True)
    model = models.make_model(config.model, dataset.num_classes)
    x_val, y_val = dataset.val.x, dataset.val.y
    task = task_lib.make_task(task_lib.linen_apply(model))
    size = min(config.train.eval_batch_size, x_val.shape[0])
    evaluate = jax.jit(
        lambda params, x, y: jaxepochs.eval_epoch(params, None, {"x": x, "y": y}, task=task, batch_size=size)
    )
    val = jax.device_get(evaluate(best_state.params, x_val, y_val)).means("val")
    assert val["val_loss"] == pytest.approx(rows[best - 1]["val_loss"], rel=1e-6)
    assert val["val_accuracy"] == pytest.approx(rows[best - 1]["val_accuracy"], abs=1e-9)
