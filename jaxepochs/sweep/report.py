"""A sweep's outputs: sweep.jsonl, results.csv (ranked), cv.csv, the printed table and sweep.png."""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib

import numpy as np

from jaxepochs.host import config as config_lib
from jaxepochs.host import report as report_lib


def _minimize(monitor: str) -> bool:
    return "loss" in monitor


def typed_values(run) -> dict:
    """The run's swept values as the config holds them (numbers as numbers, tuples as lists), not as typed on the
    command line: sweep.jsonl and results.csv read back into numeric columns."""
    flat = config_lib.flatten(run.config)
    return {key: flat[key] for key in run.values}


def results(runs, histories: dict, summaries: dict) -> list[dict]:
    """One row per run, ranked best first by its best monitored value (NaN last); `summaries` holds each run's
    stopping fields and final test metrics (sweep.run's summaries, as in a run's summary.json)."""
    rows = []
    for run in runs:
        summary = summaries[run.name]
        row = {"run": run.name, **typed_values(run)}
        if run.fold >= 0:
            row["fold"] = run.fold
        best = summary["best_value"]
        row.update(
            {
                "epochs_run": len(histories[run.name]),
                "best_epoch": summary["best_epoch"],
                "stopped_epoch": summary["stopped_epoch"],
                "stop_reason": summary["stop_reason"],
                **{k: summary[k] for k in ("bracket", "rung") if k in summary},  # a pruned sweep's
                f"best_{summary['best_epoch_metric']}": float("nan") if best is None else best,
                **{f"final_{k}": v for k, v in summary.items() if k.startswith("test_")},
            }
        )
        rows.append(row)
    if not rows:
        return rows
    monitor = summaries[runs[0].name]["best_epoch_metric"]
    key = f"best_{monitor}"
    sign = 1.0 if _minimize(monitor) else -1.0
    # A pruned run's best is of fewer epochs than a survivor's: the survivors first, then the later-pruned.
    pruned = lambda r: r["stop_reason"] == "pruned"
    return sorted(rows, key=lambda r: (pruned(r), -r["rung"] if pruned(r) else 0, not math.isfinite(r[key]),
                                       sign * r[key] if math.isfinite(r[key]) else 0))  # fmt: skip


def cross_validation(runs, histories: dict, cv: int) -> list[dict]:
    """Per configuration: the validation curve's mean and spread over its K folds at each epoch that every fold
    validated (`val_epochs`: all of them, or every train.validate_every-th), and the epoch count it recommends
    (the best mean val_loss)."""
    by_config: dict[str, list] = {}
    for run in runs:
        by_config.setdefault(run.name.rsplit("_fold", 1)[0], []).append(run)
    out = []
    for name, folds in by_config.items():
        curves = [{row["epoch"]: row["val_loss"] for row in histories[f.name] if "val_loss" in row} for f in folds]
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        if not epochs:
            continue
        loss_ke = np.array([[c[e] for e in epochs] for c in curves])
        mean_e, std_e = loss_ke.mean(0), loss_ke.std(0)
        best = int(np.nanargmin(mean_e))
        out.append(
            {
                "config": name,
                "values": typed_values(folds[0]),
                "folds": cv,
                "val_epochs": epochs,
                "mean_val_loss": mean_e.tolist(),
                "std_val_loss": std_e.tolist(),
                "recommended_epochs": epochs[best],
                "best_mean_val_loss": float(mean_e[best]),
                "best_std_val_loss": float(std_e[best]),
            }
        )
    return out


def table(results_rows: list[dict], cv_rows: list[dict], top: int = 10) -> str:
    """The ranked runs (and the cross-validated epoch counts) as Markdown."""
    if not results_rows:
        return "No runs."
    columns = [k for k in results_rows[0] if not k.startswith("final_val")]
    lines = ["| rank | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for rank, row in enumerate(results_rows[:top], 1):
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    if not cv_rows:
        lines.append(f"\nBest: {results_rows[0]['run']} " + json.dumps({k: results_rows[0][k] for k in columns[1:3]}))
    else:  # the folds are not the answer: the configuration whose mean over its folds is best
        best = min(cv_rows, key=lambda row: row["best_mean_val_loss"])
        lines.append(
            f"\nBest configuration: {best['config']} {json.dumps(best['values'])}, trained for "
            f"{best['recommended_epochs']} epochs (its lowest mean val_loss over {best['folds']} folds)"
        )
    for row in cv_rows:
        refit = f", refit test accuracy {row['refit_test_accuracy']:.4f}" if "refit_test_accuracy" in row else ""
        lines.append(
            f"{row['config']} {row['values']}: {row['folds']}-fold CV recommends {row['recommended_epochs']} epochs "
            f"(mean val_loss {row['best_mean_val_loss']:.4f} ± {row['best_std_val_loss']:.4f}){refit}"
        )
    return "\n".join(lines)


def write(workdir: pathlib.Path, runs, histories: dict, results_rows: list[dict], cv_rows: list[dict], grid) -> None:
    """sweep.jsonl, results.csv and cv.csv, each written whole (a temporary file renamed over it: a rerun that
    is killed while it rewrites them leaves the old ones), then sweep.png."""
    ends = {
        r["run"]: {"stop_reason": "pruned", "rung": r["rung"]} for r in results_rows if r["stop_reason"] == "pruned"
    }
    lines = [
        json.dumps({"run": run.name, **typed_values(run), **row, **(ends.get(run.name, {}) if row is rows[-1] else {})})
        + "\n"
        for run in runs
        for rows in [histories[run.name]]
        for row in rows
    ]  # a pruned run's last row says so, with the rung it passed
    report_lib.write_text(workdir / "sweep.jsonl", "".join(lines))
    columns = list(dict.fromkeys(k for row in results_rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(results_rows)
    report_lib.write_text(workdir / "results.csv", text.getvalue())
    if cv_rows:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(
            ["config", *grid[0].keys(), "recommended_epochs", "mean_val_loss", "std_val_loss", "refit_test_accuracy"]
        )
        for row in cv_rows:
            writer.writerow(
                [
                    row["config"],
                    *row["values"].values(),
                    row["recommended_epochs"],
                    row["best_mean_val_loss"],
                    row["best_std_val_loss"],
                    row.get("refit_test_accuracy", ""),
                ]
            )
        report_lib.write_text(workdir / "cv.csv", text.getvalue())
    plot(workdir / "sweep.png", runs, histories, results_rows, grid)


def plot(path: pathlib.Path, runs, histories: dict, results_rows: list[dict], grid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Against each swept key only with 2+ runs to compare (one point per panel says nothing, and costs a panel).
    swept = list(grid[0].keys()) if grid and len(results_rows) > 1 else []
    monitor_key = next((k for k in results_rows[0] if k.startswith("best_") and k != "best_epoch"), None)
    monitor = monitor_key.removeprefix("best_") if monitor_key else "val_loss"
    fig, axes = plt.subplots(1, 1 + len(swept), figsize=(5.5 * (1 + len(swept)), 4.2), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.9, wspace=0.3)  # tight_layout: 0.3 s more
    ax = axes[0][0]
    best = results_rows[0]["run"]
    pruned = {row["run"] for row in results_rows if row["stop_reason"] == "pruned"}
    for run in runs:
        points = [(row["epoch"], row[monitor]) for row in histories[run.name] if monitor in row]
        if not points:  # rows without the monitor: epochs not validated (train.validate_every)
            continue
        if run.name in pruned:  # a cut curve, marked where its rung cut it
            ax.plot(*points[-1], "x", color="grey", ms=4, alpha=0.7)
        ax.plot(
            *zip(*points, strict=True),
            color="C3" if run.name == best else "grey",
            lw=2 if run.name == best else 0.6,
            alpha=1 if run.name == best else 0.5,
            zorder=3 if run.name == best else 1,
        )
    ax.set_title(f"{monitor} of every run (best: {best})")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    for ax, key in zip(axes[0][1:], swept, strict=True):
        ax.scatter(swept_axis(ax, key, [row[key] for row in results_rows]), [row[monitor_key] for row in results_rows],
                   s=18)  # fmt: skip
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {monitor}")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)


MOST_TICKS = 8  # more swept values than this: matplotlib's own ticks (each value's would overrun the next)


def swept_axis(ax, key: str, values: list) -> list:
    """Sets `ax`'s x axis for a swept key and returns the points' x positions: seeds and values that are not
    numbers as categories (in order, one tick each); numbers spanning a decade or more (a learning rate) on a
    log axis; the swept numbers as the ticks, written short ("0.001"), where there are few."""
    numbers = []
    for value in values:
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            break
    label = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    if len(numbers) < len(values) or key.rsplit(".", 1)[-1] == "seed":
        if len(numbers) == len(values):  # seeds: in their numeric order
            shown, categories = [label(v) for v in numbers], [label(v) for v in sorted(set(numbers))]
        else:
            shown = [str(v) for v in values]
            categories = sorted(set(shown))
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
        return [categories.index(v) for v in shown]
    if min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
        ax.set_xscale("log")
    distinct = sorted(set(numbers))
    if len(distinct) <= MOST_TICKS:
        ax.minorticks_off()
        ax.set_xticks(distinct, [label(v) for v in distinct])
    return numbers
