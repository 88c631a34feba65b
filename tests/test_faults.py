"""Nothing lost at the edges (issue 16): a second process in a live workdir, bit rot in a checkpoint, Ctrl-C after
the last epoch, a full disk, and failures that used to leave a workdir its corrected rerun refused. Real
subprocesses where timing is the point (the lock, Ctrl-C, SIGKILL); a small tmpfs for the full disk where this
machine lets the test mount one, and an injected failing write everywhere."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, tiny_config

import jaxepochs
from jaxepochs import cli
from jaxepochs.data import lock
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import report
from jaxepochs.host.checkpoint import CheckpointError

WAIT = 120.0  # generous: a loaded 2-core machine starts jax slowly
SMALL = {"model.hidden_sizes": "(16,)", "model.residual": "False", "train.batch_size": "64", "logging.curves": "False"}


def _command(workdir, overrides: dict, quiet: bool = True) -> list[str]:
    command = [sys.executable, "-m", "jaxepochs.cli", "run", "--config", "experiments/mnist1d_mlp.py"]
    command += ["--workdir", str(workdir), *(["--quiet"] if quiet else [])]
    return command + [f"--config.{key}={value}" for key, value in {**SMALL, **overrides}.items()]


def _env(cache_dir) -> dict[str, str]:
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}


def _start(workdir, overrides: dict, stderr_path, cache_dir, quiet: bool = True) -> subprocess.Popen:
    with stderr_path.open("w") as stderr:  # a file, not a pipe: a full pipe would block the child
        return subprocess.Popen(
            _command(workdir, overrides, quiet), cwd=REPO, env=_env(cache_dir), stdout=subprocess.DEVNULL, stderr=stderr
        )


def _wait_for(condition, child: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if child.poll() is not None:
            pytest.fail(f"the run ended (returncode {child.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {WAIT} s")
        time.sleep(0.01)


def _saved(workdir) -> list[int]:
    directory = workdir / checkpoint_lib.CHECKPOINT_DIR
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _rows_whole(workdir) -> list[dict]:
    text = (workdir / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n"), "metrics.jsonl ends in part of a row"
    return [json.loads(line) for line in text.splitlines()]


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("jaxepochs: error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


# --- 1. a second process in a live workdir ---------------------------------------------------------------------


def test_a_second_run_in_a_live_workdir_is_refused_naming_the_holder_and_load_still_reads(
    tmp_path, jax_compilation_cache
):
    workdir = tmp_path / "live"
    first = _start(workdir, {"train.epochs": "100000", "checkpoint.every_epochs": "1"}, tmp_path / "1.err",
                   jax_compilation_cache)  # fmt: skip
    try:
        _wait_for(lambda: _saved(workdir), first, "checkpoint")
        second = subprocess.run(
            _command(workdir, {"train.epochs": "100000", "checkpoint.every_epochs": "1"}),
            cwd=REPO, env=_env(jax_compilation_cache), capture_output=True, text=True, timeout=WAIT,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        line = _one_line_error(second.stderr)
        assert f"in use by pid {first.pid} on host" in line and "since" in line
        assert int(jaxepochs.load(workdir).step) > 0  # reading does not take the lock
    finally:
        first.kill()  # SIGKILL: the kernel releases the lock with the process
        first.wait()
    _rows_whole(workdir)  # only the first process wrote, whole rows
    with lock.hold(workdir, "workdir"):  # no stale lock
        pass


def test_two_processes_preparing_one_dataset_take_turns(tmp_path, jax_compilation_cache):
    data_dir = tmp_path / "data"  # nothing prepared: both would build mnist1d (a small variant) at once
    overrides = {"train.epochs": "1", "data.data_dir": str(data_dir), "data.args.num_samples": "400"}
    children = [_start(tmp_path / f"w{i}", overrides, tmp_path / f"{i}.err", jax_compilation_cache) for i in (0, 1)]
    codes = [child.wait(timeout=WAIT) for child in children]
    errs = [(tmp_path / f"{i}.err").read_text() for i in (0, 1)]
    assert codes == [0, 0], errs
    assert all((tmp_path / f"w{i}" / "summary.json").exists() for i in (0, 1))


# --- 2. bit rot in a checkpoint ----------------------------------------------------------------------------------


def _flip_bytes(checkpoint_dir) -> None:
    """Eight bytes inverted at a tenth, two, three and four tenths of the checkpoint's largest data file (ocdbt's
    d/): it still parses. Not in its second half alone: what lies there is not always read (tensorstore writes the
    chunks in no fixed order, and a flip at the middle went unread in one of some twenty runs)."""
    files = [p for p in (checkpoint_dir / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"]
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    for tenths in (1, 2, 3, 4):
        at = len(data) * tenths // 10
        data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_caught_by_load_and_skipped_by_resume(tmp_path, capsys):
    config = tiny_config({"train.epochs": "4", "checkpoint.every_epochs": "2"})
    workdir = tmp_path / "rot"
    ref = jaxepochs.train_and_evaluate(config, workdir, quiet=True)
    _flip_bytes(workdir / "checkpoints" / "4")
    with pytest.raises(CheckpointError, match=r"checkpoints/4 is corrupt: .* fails its checksum.*epochs \[2\]"):
        jaxepochs.load(workdir)
    assert int(jaxepochs.load(workdir, 2).step) == 2 * ref.summary["steps_per_epoch"]
    capsys.readouterr()
    result = jaxepochs.train_and_evaluate(config, workdir)
    err = capsys.readouterr().err
    assert re.search(r"checkpoints/4 is corrupt: \S+ fails its checksum .*; falling back to the previous", err)
    assert "from the checkpoint of epoch 2." in err
    for got, want in zip(jax_leaves(result.state), jax_leaves(ref.state), strict=True):
        assert np.array_equal(got, want)  # epochs 3 and 4 trained again, bit for bit
    assert int(jaxepochs.load(workdir).step) == 4 * ref.summary["steps_per_epoch"]


def jax_leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


# --- 3. Ctrl-C after the last epoch --------------------------------------------------------------------------------


def test_one_ctrl_c_just_after_the_last_epoch_still_ends_with_the_checkpoint_and_outputs(
    tmp_path, jax_compilation_cache
):
    """SIGINT 0, 100 and 300 ms after the last row: the final checkpoint, summary.json and curves.png are
    written and the run exits 130 (or 0, had it finished first), with no traceback."""
    epochs = 4  # the signal lands after the last; fewer epochs before it only save time
    interrupted = 0
    for delay in (0.0, 0.1, 0.3):
        workdir, err_path = tmp_path / f"d{delay}", tmp_path / f"d{delay}.err"
        overrides = {"train.epochs": str(epochs), "train.epochs_per_call": "1", "logging.curves": "True"}
        child = _start(workdir, overrides, err_path, jax_compilation_cache, quiet=False)
        try:
            _wait_for(lambda err_path=err_path: f"epoch {epochs} " in err_path.read_text(), child, "last row")
            time.sleep(delay)
            child.send_signal(signal.SIGINT)
            code = child.wait(timeout=WAIT)
        finally:
            if child.poll() is None:
                child.kill()
        err = err_path.read_text()
        assert code in (0, 130) and "Traceback" not in err, (delay, code, err[-3000:])
        interrupted += code == 130
        assert _saved(workdir)[-1] == epochs, delay
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["stop_reason"] == "completed" and summary["epochs_completed"] == epochs
        assert (workdir / "curves.png").exists() and len(_rows_whole(workdir)) == epochs
    assert interrupted >= 2  # the signal came while the run was still finishing, not only after it


# --- 4. a full disk ------------------------------------------------------------------------------------------------


def _failing_write_after(rows: int):
    """os.write that writes half of metrics.jsonl's row `rows + 1` and then fails as a full disk does."""
    real, seen = os.write, [0]

    def write(fd, data):
        if data.startswith(b'{"epoch": '):
            seen[0] += 1
            if seen[0] > rows:
                real(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    return write


def test_a_write_that_fails_keeps_whole_rows_saves_the_epochs_and_resumes_exactly(tmp_path, monkeypatch):
    config = tiny_config({"train.epochs": "6", "train.epochs_per_call": "1", "checkpoint.every_epochs": "2"})
    ref = jaxepochs.train_and_evaluate(config, tmp_path / "ref", quiet=True)
    workdir = tmp_path / "full"
    with monkeypatch.context() as patch:
        patch.setattr(report.os, "write", _failing_write_after(3))
        with pytest.raises(OSError, match="No space left") as raised:
            jaxepochs.train_and_evaluate(config, workdir, quiet=True)
    assert raised.value.filename == str(workdir / "metrics.jsonl")
    assert len(_rows_whole(workdir)) == 3  # the half-written fourth row was cut off again
    assert _saved(workdir)[-1] == 4  # the epochs trained when the write failed were still checkpointed
    result = jaxepochs.train_and_evaluate(config, workdir, quiet=True)
    assert [row["epoch"] for row in _rows_whole(workdir)] == list(range(1, 7))
    for got, want in zip(jax_leaves(result.state), jax_leaves(ref.state), strict=True):
        assert np.array_equal(got, want)


@contextlib.contextmanager
def _small_tmpfs(path, free_bytes: int):
    """A tmpfs at `path` with about `free_bytes` left, or a skip where this machine cannot mount one."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected failing write covers the full disk")
    try:
        (path / "filler").write_bytes(b"0" * (shutil.disk_usage(path).free - free_bytes))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_one_line_and_exit_1_with_whole_rows(tmp_path, jax_compilation_cache):
    # 40 KB: a tmpfs takes a 4 KB page per file, and the run writes seven (config.json, metrics.csv, TensorBoard...)
    with _small_tmpfs(tmp_path / "disk", 40 * 1024) as disk:
        done = subprocess.run(
            _command(disk / "w", {"train.epochs": "300", "train.epochs_per_call": "1"}),
            cwd=REPO, env=_env(jax_compilation_cache), capture_output=True, text=True, timeout=WAIT,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr[-3000:]
        line = _one_line_error(done.stderr)
        assert "No space left" in line and str(disk / "w") in line and "free space" in line
        assert 0 < len(_rows_whole(disk / "w")) < 300


# --- 5. failures that used to poison the workdir -----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        ({"seed": "-1"}, r"config\.seed = -1 is out of range"),
        ({"model.name": "cnn", "model.kernel_sizes": "(45, 3, 3)"}, r"convolution 0 has kernel size 45, longer"),
        ({"model.name": "transformer"}, r"model\.name=transformer takes integer token sequences"),
    ],
)
def test_errors_that_config_and_tracing_can_find_come_before_the_workdir_is_touched(tmp_path, capsys, override, words):
    workdir = tmp_path / "w"
    assert cli.main(_command(workdir, {"train.epochs": "1", **override})[3:]) == 2
    assert re.search(words, _one_line_error(capsys.readouterr().err))
    assert not workdir.exists()


def test_a_rerun_after_a_kill_before_the_first_epoch_proceeds(tmp_path, jax_compilation_cache, capsys):
    workdir = tmp_path / "early"
    child = _start(workdir, {"train.epochs": "3"}, tmp_path / "err", jax_compilation_cache)
    _wait_for(lambda: (workdir / "run.json").exists(), child, "run.json")
    child.kill()
    child.wait()
    assert not _saved(workdir)
    other = tiny_config({"train.epochs": "2", "model.hidden_sizes": "(8,)"})  # even another config
    result = jaxepochs.train_and_evaluate(other, workdir)
    assert "holds no finished epoch of an earlier run; starting afresh." in capsys.readouterr().err
    assert len(result.history) == 2


# --- smaller ones ----------------------------------------------------------------------------------------------------


def test_paths_that_cannot_be_workdirs_or_data_dirs_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (a_file, {}, "is a file, not a directory"),
        (a_file / "w", {}, f"cannot be created: {a_file} is a file"),
        (tmp_path / "w", {"data.data_dir": str(a_file / "data")}, "data.data_dir .* cannot be created"),
    ]
    for workdir, overrides, words in cases:
        assert cli.main(_command(workdir, {"train.epochs": "1", **overrides})[3:]) == 2
        assert re.search(words, _one_line_error(capsys.readouterr().err))


def test_a_read_only_workdir_is_one_line(tmp_path, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(read_only)]).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert cli.main(_command(read_only / "w", {"train.epochs": "1"})[3:]) == 2
        assert "is not writable (permission denied, or a read-only file system)" in _one_line_error(
            capsys.readouterr().err
        )
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)


def test_os_errors_name_the_path_and_what_to_do():
    message = cli.os_error_message(PermissionError(errno.EACCES, "Permission denied", "/w/metrics.jsonl"))
    assert message == "Permission denied (/w/metrics.jsonl): give a path you may write to."
    assert "free space" in cli.os_error_message(OSError(errno.ENOSPC, "No space left on device", "/w"))


def test_damaged_dataset_files_say_to_prepare_them_again(tmp_path, tfds_data_dir, capsys):
    jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "0"}), tmp_path / "w0", quiet=True)  # prepared
    data_dir = tmp_path / "data"
    shutil.copytree(tfds_data_dir / "mnist1d", data_dir / "mnist1d")
    for record in data_dir.rglob("mnist1d-train.array_record*"):  # every builder config other tests prepared
        data = bytearray(record.read_bytes())
        data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
        record.write_bytes(bytes(data))
    config = tiny_config({"train.epochs": "1", "data.data_dir": str(data_dir)})
    with pytest.raises(
        jaxepochs.DataError, match=r"cannot be read .* its files \(.*\) are damaged\. Delete .* prepare it again"
    ):
        jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True)


def test_damaged_config_json_and_fewer_epochs_than_trained_are_refused(tmp_path):
    workdir = tmp_path / "w"
    jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "2"}), workdir, quiet=True)
    with pytest.raises(jaxepochs.WorkdirError, match=r"trained to epoch 2, past train\.epochs=1.*2 or more"):
        jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "1"}), workdir, quiet=True)
    (workdir / "config.json").write_text("{garbage")
    with pytest.raises(jaxepochs.WorkdirError, match=r"config\.json is damaged"):
        jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "2"}), workdir, quiet=True)
    with pytest.raises(jaxepochs.WorkdirError, match=r"config\.json is damaged"):
        jaxepochs.load(workdir)


def test_config_types_are_checked_and_a_plain_dict_is_a_config(tmp_path):
    from jaxepochs.host.config import ConfigError, validate

    for section, words in [
        ({"train": {"epochs": True}}, r"config\.train\.epochs = True is not a whole number"),
        ({"train": {"epochs": 2.5}}, r"config\.train\.epochs = 2\.5 is not a whole number"),
        ({"model": {"hidden_sizes": ("a",)}}, r"config\.model\.hidden_sizes = \('a',\) holds 'a'"),
    ]:
        with pytest.raises(ConfigError, match=words):
            validate(section)
    assert validate({"train": {"epochs": 3}}).train.epochs == 3
    with pytest.raises(TypeError, match="pass the run's directory as a str or pathlib.Path"):
        jaxepochs.train_and_evaluate(tiny_config(), None)
    with pytest.raises(TypeError, match="pass an ml_collections.ConfigDict"):
        jaxepochs.train_and_evaluate(None, tmp_path)


def test_a_diverging_loss_is_warned_once_and_recorded(tmp_path, capsys):
    config = tiny_config({"optimizer.name": "adam", "optimizer.learning_rate": "1e6", "train.epochs": "3"})
    result = jaxepochs.train_and_evaluate(config, tmp_path / "w")
    err = capsys.readouterr().err
    assert err.count("warning: the training loss is diverging") == 1, err
    assert "more than 1000 times a uniform guess's 2.303" in err  # epoch 1's loss is already far above it
    assert result.summary["diverged_epoch"] == 1


def test_sweep_arguments_are_checked_before_the_workdir_and_a_resume_keeps_its_chunking(tmp_path, capsys):
    from jaxepochs.sweep import grid as grid_lib

    base = tiny_config({"train.epochs": "2"})
    grid = grid_lib.expand(base, {"seed": "0,1"})
    with pytest.raises(grid_lib.SweepError, match=r"--cv 100000.*training examples"):
        jaxepochs.sweep(base, grid, tmp_path / "cv", cv=100000, quiet=True)
    assert not (tmp_path / "cv").exists()
    first = jaxepochs.sweep(base, grid, tmp_path / "s", chunk=1, quiet=True)
    again = jaxepochs.sweep(base, grid, tmp_path / "s", chunk=2, quiet=False)  # accepted, in chunks of 1
    assert "Resuming group 0 in chunks of 1 runs, as it started (not 2)." in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "s" / "chunks").iterdir()) == ["group0_chunk0", "group0_chunk1"]
    assert _untimed(again.histories) == _untimed(first.histories)


def _untimed(histories: dict) -> dict:
    return {
        run: [{k: v for k, v in row.items() if "seconds" not in k} for row in rows] for run, rows in histories.items()
    }


def test_load_reads_the_checkpoint_before_a_newest_one_that_is_not_all_there(tmp_path):
    """A live run's newest checkpoint may be half written, or removed by max_to_keep after load listed it (seen:
    `load` of a training run's workdir raised "checkpoints/34 ... does not exist"). load() of the newest reads the
    one before, with a warning; asked for that epoch by number, it is an error naming the others."""
    import shutil

    config = tiny_config({"train.epochs": "2", "checkpoint.every_epochs": "1"})
    ref = jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True, plot=False)
    first_epoch = jaxepochs.load(tmp_path / "w", 1)
    shutil.rmtree(tmp_path / "w" / "checkpoints" / "2" / "arrays")
    with pytest.warns(
        UserWarning, match=r"checkpoints/2 is (unreadable|corrupt or truncated) .*reading the checkpoint before it"
    ):
        state = jaxepochs.load(tmp_path / "w")
    assert int(state.step) == ref.summary["steps_per_epoch"]
    for got, want in zip(jax_leaves(state), jax_leaves(first_epoch), strict=True):
        assert np.array_equal(got, want)
    with pytest.raises(
        CheckpointError, match=r"checkpoints/2 is (unreadable|corrupt).*Its other checkpoints: epochs \[1\]"
    ):
        jaxepochs.load(tmp_path / "w", 2)
