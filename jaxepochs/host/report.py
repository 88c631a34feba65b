"""What a run leaves for its user: progress on the terminal, metrics.jsonl, summary.json and curves.png."""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import json
import math
import os
import pathlib
import sys
import time
import typing
from typing import Any

import jax
import numpy as np

from jaxepochs.core import early_stopping as early_stopping_lib


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def replace_file(path: pathlib.Path, data: bytes) -> None:
    """Writes `path` whole or not at all: `data` goes to a temporary file beside it, is flushed to the disk
    (fsync), and is renamed over `path` (os.replace, atomic), so a reader, a rerun after a full disk or a kill at
    any moment finds either the old file or the new one, never a part of either."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        e.filename = e.filename or str(path)
        raise
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def append_whole(fd: int, data: bytes, size: int, path: pathlib.Path) -> None:
    """Appends `data` to the file open at `fd` (`size` bytes long before it) whole: a write the disk does not take
    (ENOSPC) is cut back to `size`, so the file never ends in part of a row or record, and the OSError is raised
    naming `path`."""
    try:
        written = 0
        while written < len(data):  # os.write may take part of it
            written += os.write(fd, data[written:])
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
            os.lseek(fd, size, os.SEEK_SET)
        e.filename = e.filename or str(path)
        raise


def _fsync_directory(directory: pathlib.Path) -> None:
    """The rename itself on the disk (where the file system lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: pathlib.Path, text: str) -> None:
    """Writes `path` whole or not at all (`replace_file`)."""
    replace_file(path, text.encode())


def write_json(path: pathlib.Path, obj: dict) -> None:
    write_text(path, json.dumps({k: _jsonable(v) for k, v in obj.items()}, indent=2) + "\n")


@typing.runtime_checkable
class MetricWriter(typing.Protocol):
    """Where a run's rows go: metrics.jsonl (MetricsLog), metrics.csv, TensorBoard, MLflow (host/writers.py), or
    nowhere (writers.NullWriter: a process that is not process 0).

    A row is one epoch's dict as metrics.jsonl logs it: "epoch" (the step every value is plotted at), "steps",
    the metrics (train_loss, val_accuracy, ...), "learning_rate", timings. A writer is made from the rows a
    resumed run restored (it rebuilds its output from them, or skips those it already holds), then takes each
    host call's new rows; the same interface as CLU's `metric_writers.MetricWriter`, with rows for its
    write_scalars(step, scalars). A writer's errors are raised to its caller (host/writers.Logs decides whether
    the run stops)."""

    @abc.abstractmethod
    def write_rows(self, rows: list[dict]) -> None:
        """Writes `rows` (one host call's epochs, in order; possibly none). Written rows are whole: a failure (a
        full disk) leaves the output ending at the last whole row and raises the OSError."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases the output (a file, a connection). Nothing is written after it."""


def _jsonl_line(row: dict) -> bytes:
    return (json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n").encode()


class MetricsLog(MetricWriter):
    """metrics.jsonl: the rows so far (`rows`, a resumed run's: any partial last line of the file is gone), then
    one JSON object per epoch, appended whole. A row the disk does not take is cut off again, so the file never
    ends in half a row; the OSError is raised to the caller."""

    def __init__(self, path: pathlib.Path, rows: list[dict]):
        self._path = path
        # The restored rows replace the file whole (a temporary file renamed over it): a kill while they are
        # written leaves the old file, never a few rows beside a complete summary.json.
        data = b"".join(_jsonl_line(row) for row in rows)
        replace_file(path, data)
        self._fd = os.open(path, os.O_WRONLY)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)

    def write_rows(self, rows: list[dict]) -> None:
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        line = _jsonl_line(row)
        append_whole(self._fd, line, self._size, self._path)
        self._size += len(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


DIVERGENCE_FACTOR = 1e3  # a training loss this many times its reference is reported as diverging


def chance_loss(task: str, num_classes: int, own_loss: bool) -> float | None:
    """The loss of a uniform guess where the task fixes it (cross-entropy: ln C; binary: ln 2), else None: a
    reference for divergence that a run already diverging in its first epoch cannot inflate."""
    if own_loss:
        return None
    return {"classification": math.log(max(num_classes, 2)), "binary": math.log(2.0)}.get(task)


def _reference(history: list[dict], chance: float | None) -> tuple[float, str] | None:
    first = history[0].get("train_loss") if history else None
    candidates = [(first, "epoch 1's")] if first and math.isfinite(first) and first > 0 else []
    candidates += [(chance, "a uniform guess's")] if chance else []
    return min(candidates) if candidates else None


def diverged_epoch(history: list[dict], chance: float | None = None) -> int | None:
    """The first epoch whose training loss exceeds DIVERGENCE_FACTOR times the reference (epoch 1's, or the
    chance loss where it is lower), or None."""
    reference = _reference(history, chance)
    if reference is None:
        return None
    limit = DIVERGENCE_FACTOR * reference[0]
    return next((row["epoch"] for row in history if row["train_loss"] > limit), None)


def divergence_fields(history: list[dict], chance: float | None = None) -> dict:
    """summary.json's record of a diverging training loss: {"diverged_epoch": N}, or nothing."""
    epoch = diverged_epoch(history, chance)
    return {"diverged_epoch": epoch} if epoch else {}


def divergence_warning(history: list[dict], epoch: int, chance: float | None = None) -> str:
    value, name = _reference(history, chance)
    loss = next(row["train_loss"] for row in history if row["epoch"] == epoch)
    return (
        f"warning: the training loss is diverging: {loss:.4g} in epoch {epoch}, more than {DIVERGENCE_FACTOR:g} "
        f"times {name} {value:.4g}. Training goes on; lower optimizer.learning_rate, set optimizer.clip_norm, "
        "or set early_stopping.divergence_threshold to stop such runs."
    )


def peak_memory() -> dict:
    """{"peak_memory_bytes": N}: the most memory the first local device has held, where its backend reports it
    (GPU, TPU: memory_stats()'s peak_bytes_in_use); {} on CPU, whose backend reports none."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"peak_memory_bytes": int(stats["peak_bytes_in_use"])} if "peak_bytes_in_use" in stats else {}


def metrics_row(epoch: int, steps: int, train, val, test, lr, evals=None) -> dict:
    """One metrics.jsonl row from an epoch's metric sums (val/test None, or count 0, when not evaluated: no split,
    or not due that epoch; `evals`: the further evaluation sets' by name); a split not evaluated has no fields in
    the row."""
    row = {"epoch": epoch, "steps": steps, **train.means("train")}
    for totals, prefix in ((val, "val"), (test, "test"), *(((m, name) for name, m in (evals or {}).items()))):
        if totals is not None and float(totals.count) > 0:
            row.update(totals.means(prefix))
    row["learning_rate"] = float(lr)
    return row


def run_rows(rows, first_epoch: int, steps_per_epoch: int, run: int = 0) -> tuple[list[dict], int | None]:
    """The metrics.jsonl rows of run `run` in a call's EpochRows (fetched to the host): the epochs it trained, and
    the epoch whose training loss was not finite (its state was discarded; not among the rows), or None."""
    out = []
    for i in range(int(rows.ran)):
        if not rows.trained[run, i]:
            break
        pick = lambda metrics, i=i: jax.tree.map(lambda a: np.asarray(a)[run, i], metrics)
        epoch = first_epoch + i
        row = metrics_row(
            epoch,
            epoch * steps_per_epoch,
            pick(rows.train),
            pick(rows.val),
            pick(rows.test),
            rows.learning_rate[run, i],
            pick(rows.evals),
        )
        if not math.isfinite(row["train_loss"]):
            return out, epoch
        out.append(row)
    return out, None


def stop_reason(es_state, may_stop: bool, non_finite_epoch: int | None, interrupted: bool) -> str:
    """Why a run ended, from its carry's early-stopping state (so a rerun of a stopped run says the same)."""
    if non_finite_epoch:
        return "non_finite_loss"
    by_host = int(es_state.stop_reason) in early_stopping_lib.HOST_STOPS  # with or without early stopping
    if (may_stop or by_host) and bool(es_state.should_stop):
        return early_stopping_lib.stop_reason_name(int(es_state.stop_reason))
    return "interrupted" if interrupted else "completed"


def stopping_fields(es_state, monitor: str, reason: str, non_finite_epoch: int | None) -> dict:
    """summary.json's fields on the best epoch and the stop, of a run or of a sweep's member."""
    best_epoch = int(es_state.best_epoch)
    stopped = int(es_state.stop_epoch) if reason not in ("completed", "non_finite_loss", "interrupted") else 0
    fields = {
        "best_epoch": best_epoch,
        "best_epoch_metric": monitor,
        "best_value": float(es_state.best_value) if best_epoch else None,
        "stopped_epoch": non_finite_epoch or stopped,
        "stop_reason": reason,
    }
    if non_finite_epoch:
        fields["non_finite_epoch"] = non_finite_epoch
    return fields


def metric_keys(row: dict, splits=("train", "val")) -> list[str]:
    """The row's metrics of `splits`, loss first, in the order they were logged (train_loss, train_accuracy, ...)."""
    return [key for key in row if key.split("_", 1)[0] in splits]


def format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}"]
    parts += [f"{key} {row[key]:.4f}" for key in metric_keys(row)]
    parts.append(f"lr {row['learning_rate']:.3g}")
    parts.append(f"{row['seconds'] * 1e3:.1f} ms")
    return "  ".join(parts)


COMPILING_AFTER = 1.0  # seconds of compiling before the progress says so


class Progress:
    """A tqdm bar over epochs on a terminal; one line per epoch otherwise; nothing when quiet."""

    def __init__(self, epochs: int, quiet: bool, stream=None):
        self._stream = stream or sys.stderr
        self._quiet = quiet
        self._bar = None
        if not quiet and epochs > 0 and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=epochs, unit="epoch", file=self._stream, dynamic_ncols=True)

    def update(self, row: dict) -> None:
        if self._quiet:
            return
        if self._bar is None:
            print(format_row(row), file=self._stream, flush=True)
            return
        shown = {k: f"{row[k]:.4f}" for k in metric_keys(row) if k != "train_loss" or "val_loss" not in row}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def advance(self, epoch: int, status: str) -> None:
        """Moves the bar to `epoch` with `status` beside it (a sweep's calls); a line per call off a terminal."""
        if self._quiet:
            return
        if self._bar is None:
            print(f"epoch {epoch}: {status}", file=self._stream, flush=True)
            return
        self._bar.set_postfix_str(status, refresh=False)
        self._bar.update(max(0, epoch - self._bar.n))

    def skip(self, epochs: int) -> None:
        """Counts epochs done before a resume."""
        if self._bar is not None and epochs:
            self._bar.update(epochs)

    def message(self, text: str) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def wait_compiling(self, future: concurrent.futures.Future, started: float, what: str = "the run program"):
        """`future`'s result (a compile in another thread, begun at time.monotonic() `started`), saying what it
        waits for once it has taken a second: a first compile takes seconds, and a silent terminal looks hung.
        On a terminal the bar counts the seconds; otherwise one line before and one after."""
        said = False
        while True:
            try:
                result = future.result(timeout=0.5)
                break
            except concurrent.futures.TimeoutError:
                elapsed = time.monotonic() - started
                if self._quiet or elapsed < COMPILING_AFTER:
                    continue
                if self._bar is not None:
                    self._bar.set_description_str(f"compiling {what} {elapsed:.0f} s")
                elif not said:
                    print(f"Compiling {what}...", file=self._stream, flush=True)
                said = True
        if said and self._bar is not None:
            self._bar.set_description_str("")
        elif said:
            print(f"Compiled {what} in {time.monotonic() - started:.1f} s.", file=self._stream, flush=True)
        return result

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def curve_marks(summary: dict) -> list[tuple[int, str, dict]]:
    """The epochs curves.png marks: the best (by summary.json's best_epoch_metric) and where early stopping
    stopped; (epoch, label, line style)."""
    marks = []
    if summary.get("best_epoch"):
        label = f"best {summary.get('best_epoch_metric', 'val_loss')}: epoch {summary['best_epoch']}"
        marks.append((summary["best_epoch"], label, {"color": "C2", "linestyle": "--"}))
    if summary.get("stopped_epoch"):
        marks.append(
            (summary["stopped_epoch"], f"stopped: epoch {summary['stopped_epoch']}", {"color": "C3", "linestyle": ":"})
        )
    return marks


def plot_curves(history: list[dict], path: pathlib.Path, title: str, summary: dict | None = None) -> list[str]:
    """Every logged metric against epochs, a panel each: train and validation (test where logged), with the
    best and stopping epochs of `summary` marked. Returns the marks' labels."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, nothing to close

    names = [k.split("_", 1)[1] for k in metric_keys(history[0] if history else {}, ("train",))] or ["loss"]
    marks = curve_marks(summary or {})
    fig = Figure(figsize=(5 * len(names), 4))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for split, label in (("train", "train"), ("val", "validation"), ("test", "test")):
            # Only the epochs that evaluated the split (train.validate_every, train.test_every): marked when sparse.
            points = [(row["epoch"], row[f"{split}_{name}"]) for row in history if f"{split}_{name}" in row]
            if points and (split != "test" or len(points) > 1):
                marker = "." if len(points) < len(history) else None
                ax.plot(*zip(*points, strict=True), label=label, marker=marker)
        for epoch, label, style in marks:
            ax.axvline(epoch, label=label, lw=1, **style)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    # Fixed margins rather than tight_layout, which draws the figure once more only to measure it (0.2 s a run).
    fig.subplots_adjust(left=0.8 / fig.get_figwidth(), right=0.98, bottom=0.13, top=0.88, wspace=0.3)
    fig.savefig(path, dpi=100)
    return [label for _, label, _ in marks]
