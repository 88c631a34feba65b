"""What a run leaves for its user: progress on the terminal, metrics.jsonl, summary.json and curves.png."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

PLOTTED = (("loss", "train_loss", "val_loss"), ("accuracy", "train_accuracy", "val_accuracy"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_json(path: pathlib.Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({k: _jsonable(v) for k, v in obj.items()}, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


class MetricsLog:
    """Appends one JSON object per epoch to metrics.jsonl, flushed so a crash keeps every finished epoch."""

    def __init__(self, path: pathlib.Path):
        self._file = path.open("w")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def metrics_row(epoch: int, steps: int, train, val, test, lr) -> dict:
    """One metrics.jsonl row from an epoch's metric sums (val/test None, or count 0, when not evaluated)."""
    row = {"epoch": epoch, "steps": steps, **train.means("train")}
    for totals, prefix in ((val, "val"), (test, "test")):
        if totals is not None and float(totals.count) > 0:
            row.update(totals.means(prefix))
    row["learning_rate"] = float(lr)
    return row


def format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"lr {row['learning_rate']:.3g}")
    parts.append(f"{row['seconds'] * 1e3:.1f} ms")
    return "  ".join(parts)


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
        shown = {k: f"{row[k]:.4f}" for k in ("train_loss", "val_loss", "val_accuracy") if k in row}
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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot_curves(history: list[dict], path: pathlib.Path, title: str) -> None:
    """Loss and accuracy against epochs, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    for ax, (name, train_key, val_key) in zip(axes, PLOTTED, strict=True):
        for key, label in ((train_key, "train"), (val_key, "validation")):
            values = [row.get(key) for row in history]
            if values and all(v is not None for v in values):
                ax.plot(epochs, values, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
