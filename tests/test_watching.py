"""Watching a run (issue 20): what the terminal says while the first program compiles, and curves.png's marks of
the best and stopping epochs."""

from __future__ import annotations

import concurrent.futures
import io
import time

from conftest import tiny_config

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
                 "optimizer.learning_rate": "0.05"}  # fmt: skip
    result = jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path, quiet=True)
    best, stopped = result.summary["best_epoch"], result.summary["stopped_epoch"]
    assert 0 < best < stopped < 30
    labels = report.plot_curves(result.history, tmp_path / "marked.png", "tiny", result.summary)
    assert labels == [f"best val_loss: epoch {best}", f"stopped: epoch {stopped}"]
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    completed = {**result.summary, "stopped_epoch": 0}
    assert report.plot_curves(result.history, tmp_path / "plain.png", "tiny", completed) == [labels[0]]
