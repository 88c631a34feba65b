"""`jaxepochs reproduce grokking`: delayed generalisation on modular addition, and what early stopping misses.

Runs the full setting of Nanda et al. (2023) and the reduced one (`experiments/grokking_*.py`), finds the
epoch where training accuracy and where test accuracy first reach the reference's threshold, judges them
against the published phases (`experiments/references/grokking.json`), and replays Keras-style early stopping
on the held-out loss of each run's history: where it would have stopped, and the test accuracy it would have
kept instead of the grokked one.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from jaxepochs.core import early_stopping as early_stopping_lib
from jaxepochs.studies import common as reproduce_lib


def first_epoch_at(history: list[dict], metric: str, threshold: float) -> int | None:
    """The first epoch whose `metric` (where logged) reaches `threshold`; None if never."""
    for row in history:
        if metric in row and row[metric] >= threshold:
            return row["epoch"]
    return None


def early_stop_replay(history: list[dict], patience: int) -> dict:
    """Keras EarlyStopping on test_loss over the epochs where it was logged (patience counted in those
    evaluations), replayed with jaxepochs' own pure tracker: its stop and best epochs and the test accuracy there."""
    rows = [row for row in history if "test_loss" in row]
    tracker = early_stopping_lib.EarlyStopping(monitor="val_loss", patience=patience)
    final, states = tracker.run(np.array([row["test_loss"] for row in rows], np.float32))
    stopped = bool(final.should_stop)
    best = rows[int(final.best_epoch) - 1]
    stop = rows[int(final.stop_epoch) - 1] if stopped else rows[-1]
    return {
        "stopped": stopped,
        "stop_epoch": stop["epoch"],
        "best_epoch": best["epoch"],
        "test_accuracy_kept": best["test_accuracy"],  # restore_best: the parameters of the best evaluation
        "test_accuracy_final": rows[-1]["test_accuracy"],
    }


def _epochs_row(what: str, published: float, ours: list[int | None], low: float, high: float) -> dict:
    reached = [o for o in ours if o is not None]
    mean = float(np.mean(reached)) if reached else float("nan")
    return {
        "what": what,
        "published": float(published),
        "mean": mean,
        "std": float(np.std(reached)) if reached else 0.0,
        "difference": mean - published,
        "tolerance": 0.0,
        "tolerance_text": f"{low:g}-{high:g}",
        "passed": len(reached) == len(ours) and low <= mean <= high,
    }


def judge(reference: dict, histories: dict[str, list[list[dict]]], quick: bool) -> tuple[list[dict], list[str]]:
    """Judged rows (the published phases for the full run; the delay itself for every run) and report lines."""
    threshold = reference["threshold"]
    rows, lines = [], []
    for run in reference["runs"]:
        if run["id"] not in histories:
            continue
        seeds = histories[run["id"]]
        memorised = [first_epoch_at(h, "train_accuracy", threshold) for h in seeds]
        grokked = [first_epoch_at(h, "test_accuracy", threshold) for h in seeds]
        for check in [] if quick else run.get("published", []):
            ours = memorised if check["metric"] == "train_accuracy" else grokked
            rows.append(_epochs_row(check["label"], check["value"], ours, check["low"], check["high"]))
        ratios = [g / m if g and m else 0.0 for g, m in zip(grokked, memorised, strict=True)]
        delay = reference["min_delay_ratio"]
        rows.append(
            {
                "what": f"{run['id']}: test accuracy reaches {threshold:.0%} at least {delay}x later than train",
                "published": "delayed",
                "mean": float(np.mean(ratios)),
                "std": float(np.std(ratios)),
                "difference": float(np.mean(ratios)) - delay,
                "tolerance": 0.0,
                "tolerance_text": f">= {delay}x",
                "passed": all(r >= delay for r in ratios),
            }
        )
        replays = [early_stop_replay(h, reference["early_stopping_patience"]) for h in seeds]
        for seed, (m, g, r) in enumerate(zip(memorised, grokked, replays, strict=True)):
            lines.append(
                f"| {run['id']} | {seed} | {m} | {g} | {r['stop_epoch'] if r['stopped'] else 'never'} | "
                f"{r['best_epoch']} | {r['test_accuracy_kept']:.3f} | {r['test_accuracy_final']:.3f} |"
            )
    header = [
        "## The delay, and what early stopping would have missed",
        "",
        f"Epochs where train / test accuracy first reach {threshold:.0%}, and Keras-style early stopping replayed "
        f"on the held-out loss (patience {reference['early_stopping_patience']} evaluations, restore best): "
        f"{reference['early_stopping_why']}",
        "",
        "| run | seed | train acc reached | test acc reached | early stopping stops at | its best epoch | "
        "test acc it keeps | test acc at the end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return rows, header + lines


def plot(path: pathlib.Path, reference: dict, histories: dict[str, list[list[dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in reference["runs"] if run["id"] in histories]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        for seed, history in enumerate(histories[run["id"]]):
            epochs = [row["epoch"] for row in history]
            tested = [row for row in history if "test_accuracy" in row]
            alpha = 1.0 if seed == 0 else 0.4
            ax.plot(epochs, [row["train_accuracy"] for row in history], color="C0", alpha=alpha, lw=1)
            ax.plot([r["epoch"] for r in tested], [r["test_accuracy"] for r in tested], color="C1", alpha=alpha)
            replay = early_stop_replay(history, reference["early_stopping_patience"])
            if replay["stopped"]:
                ax.axvline(replay["stop_epoch"], color="C3", ls="--", lw=1, alpha=alpha)
        ax.plot([], [], color="C0", label="train accuracy")
        ax.plot([], [], color="C1", label="test accuracy")
        ax.plot([], [], color="C3", ls="--", label="early stopping (held-out loss) stops")
        for color, phase in zip(("C2", "C4", "C5"), run.get("phases", []), strict=False):
            ax.axvspan(phase["start"], phase["end"], color=color, alpha=0.1, lw=0)
            middle = math.sqrt(phase["start"] * phase["end"])  # the middle on the log axis
            ax.text(middle, 0.55, f"published: {phase['name']}", ha="center", rotation=90, fontsize=7, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("epoch (one full-batch step each)")
        ax.set_ylabel("accuracy")
        ax.set_title(run["title"], fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reproduce(
    reference: dict, workdir: pathlib.Path, seeds: int, quick: bool, quiet: bool, vmap: bool = False
) -> list[dict]:
    histories = {}
    for run in reference["runs"]:
        if quick and not run.get("quick"):
            continue
        overrides = dict(run.get("quick_overrides", {})) if quick else {}
        results = reproduce_lib.run_seeds(run["id"], run["experiment"], overrides, workdir, seeds, quiet, vmap)
        histories[run["id"]] = [r.history for r in results]
    rows, lines = judge(reference, histories, quick)
    reproduce_lib.write_report(workdir / "report.md", reference, rows, seeds, quick, lines)
    plot(workdir / "curves.png", reference, histories)
    if not quiet:
        print((workdir / "report.md").read_text())
    return rows
