"""`jaxepochs compare DIR [DIR ...]`: runs and sweeps side by side, read from their workdirs.

Each DIR is a run's workdir (metrics.jsonl, summary.json) or a sweep's (sweep.jsonl, results.csv): a sweep adds
each of its members, named "DIR/run". One PNG overlays their monitored validation curves (the metric their best
epoch is chosen by: val_loss unless the run says otherwise), each curve's best epoch marked with a dot and its
early-stopping epoch with a cross (a pruned sweep's pruned runs dotted, cut at their rung); a table on the
terminal and in a CSV gives each one's best epoch and value, its stopping epoch and reason, its test metrics and
its time.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import NamedTuple

COLUMNS = (
    "name", "dataset", "model", "best_epoch", "metric", "best_value", "stopped_epoch", "stop_reason", "epochs_run"
)  # fmt: skip


class CompareError(ValueError):
    """A DIR that holds neither a run nor a sweep."""


class Curve(NamedTuple):
    name: str
    history: list[dict]  # metrics.jsonl's rows
    fields: dict  # the table's columns: best and stopping epochs, test metrics, seconds


def _rows(path: pathlib.Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(
            f"{path} is damaged ({e}): it ends in a cut row or holds something else. Run the command that wrote it "
            "again (it resumes from its checkpoint and rewrites the file)."
        ) from None


def _run(directory: pathlib.Path, name: str) -> Curve:
    try:
        summary = json.loads((directory / "summary.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(
            f"{directory / 'summary.json'} is damaged ({e}); run the command that wrote it again."
        ) from None
    history = _rows(directory / "metrics.jsonl")
    completed = summary.get("epochs_completed")
    epochs = [row.get("epoch") for row in history]
    if completed is not None and len(history) != completed:
        raise CompareError(
            f"{directory / 'metrics.jsonl'} holds {len(history)} rows (epochs {_span(epochs)}) but "
            f"{directory / 'summary.json'} says the run completed {completed} epochs: the log was cut short (a "
            "kill while it was rewritten, or an edit). Run the same `jaxepochs run` again to rewrite it from the "
            "run's checkpoint, or leave this workdir out."
        )
    fields = {
        "dataset": summary.get("dataset"),  # an own module's get_data and model class, as summary.json names them
        "model": summary.get("model"),
        "best_epoch": summary.get("best_epoch"),
        "metric": summary.get("best_epoch_metric", "val_loss"),
        "best_value": summary.get("best_value"),
        "stopped_epoch": summary.get("stopped_epoch"),
        "stop_reason": summary.get("stop_reason"),
        "epochs_run": len(history),
        **{k: v for k, v in summary.items() if k.startswith("test_")},
        "train_seconds": summary.get("train_seconds"),
        "total_seconds": summary.get("total_seconds"),
    }
    return Curve(name, history, fields)


def _span(epochs: list) -> str:
    return "none" if not epochs else f"{epochs[0]}..{epochs[-1]}"


def _sweep(directory: pathlib.Path, name: str) -> list[Curve]:
    histories: dict[str, list[dict]] = {}
    for row in _rows(directory / "sweep.jsonl"):
        histories.setdefault(row["run"], []).append(row)
    with (directory / "results.csv").open() as f:
        results = {row["run"]: row for row in csv.DictReader(f)}
    if set(histories) != set(results):
        missing = sorted(set(histories) ^ set(results))
        raise CompareError(
            f"{directory / 'sweep.jsonl'} and {directory / 'results.csv'} disagree on the sweep's runs (runs "
            f"{', '.join(missing[:5])} are in one only): the sweep's outputs are incomplete. Run the same "
            "`jaxepochs sweep` again to rewrite them, or leave this workdir out."
        )
    curves, labels = [], _member_labels(directory, name, results)
    for run, history in histories.items():
        result = results[run]
        metric = next((k.removeprefix("best_") for k in result if k.startswith("best_") and k != "best_epoch"), "")
        fields = {
            "best_epoch": int(result["best_epoch"]),
            "metric": metric,
            "best_value": float(result[f"best_{metric}"]) if metric else None,
            "stopped_epoch": int(result["stopped_epoch"]),
            "stop_reason": result["stop_reason"],
            "epochs_run": len(history),
            **{k.removeprefix("final_"): float(v) for k, v in result.items() if k.startswith("final_test_")},
            "train_seconds": sum(row.get("seconds", 0.0) for row in history),
        }
        curves.append(Curve(labels[run], history, fields))
    return curves


def _member_labels(directory: pathlib.Path, name: str, results: dict[str, dict]) -> dict[str, str]:
    """Each member's label: the sweep's name and the member's swept values ("sweep learning_rate=0.01 seed=1"),
    each key by its last part where that is unique; "sweep/r3" where the values do not tell members apart (a CV
    sweep's folds) or sweep.json is gone."""
    try:
        keys = list(dict.fromkeys(k for values in json.loads((directory / "sweep.json").read_text())["grid"]
                                  for k in values))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        keys = []
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(short):
        short = {k: k for k in keys}
    labels = {
        run: f"{name} " + " ".join(f"{short[k]}={result.get(k, '')}" for k in keys) if keys else f"{name}/{run}"
        for run, result in results.items()
    }
    if len(set(labels.values())) < len(labels):
        return {run: f"{name}/{run}" for run in results}
    return labels


def read(directories: list[str | pathlib.Path]) -> list[Curve]:
    """Every run of the DIRs, in order; CompareError naming a DIR that holds neither a run nor a sweep."""
    curves = []
    for directory in map(pathlib.Path, directories):
        if (directory / "sweep.jsonl").exists() and (directory / "results.csv").exists():
            curves += _sweep(directory, directory.name)
        elif (directory / "summary.json").exists() and (directory / "metrics.jsonl").exists():
            curves.append(_run(directory, directory.name))
        else:
            raise CompareError(
                f"{directory} holds no finished run (summary.json and metrics.jsonl) and no finished sweep "
                "(sweep.jsonl and results.csv). Give the workdir of a `jaxepochs run` or `jaxepochs sweep` that "
                "has finished."
            )
    return curves


def table(curves: list[Curve]) -> list[dict]:
    """One row per curve: COLUMNS, then the test metrics and the seconds any of them has."""
    extra = list(dict.fromkeys(k for c in curves for k in c.fields if k not in COLUMNS))
    return [{"name": c.name, **{k: c.fields.get(k) for k in (*COLUMNS[1:], *extra)}} for c in curves]


def markdown(rows: list[dict]) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines)


def plot(curves: list[Curve], path: pathlib.Path) -> None:
    """Each curve's monitored metric against epochs; its best epoch a dot, its stopping epoch a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    metrics = sorted({c.fields["metric"] or "val_loss" for c in curves})
    for i, curve in enumerate(curves):
        metric = curve.fields["metric"] or "val_loss"
        points = {row["epoch"]: row[metric] for row in curve.history if metric in row}
        if not points:
            continue
        color = f"C{i % 10}"
        pruned = curve.fields.get("stop_reason") == "pruned"  # a pruned sweep's: cut at its rung, dotted
        ax.plot(list(points), list(points.values()), color=color, lw=1.2, ls=":" if pruned else "-",
                label=f"{curve.name} ({metric}{', pruned' if pruned else ''})")  # fmt: skip
        for key, marker in (("best_epoch", "o"), ("stopped_epoch", "x")):
            epoch = curve.fields.get(key)
            if epoch and epoch in points and not math.isnan(points[epoch]):
                ax.scatter([epoch], [points[epoch]], color=color, marker=marker, s=45, zorder=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel(", ".join(metrics))
    ax.set_title("best epoch: dot; early stopping: cross; pruned: dotted, cut at its rung")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=1 if len(curves) <= 12 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(directories: list[str | pathlib.Path], out: str | pathlib.Path = "compare") -> list[dict]:
    """Reads the DIRs, writes OUT.png and OUT.csv, returns the table's rows."""
    curves = read(directories)
    rows = table(curves)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, out.with_suffix(".png"))
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows
