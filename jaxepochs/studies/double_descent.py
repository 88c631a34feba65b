"""`jaxepochs reproduce double-descent`: test error against width on MNIST-1D, with and without label noise,
and the epoch-wise rise at the peak widths that early stopping cuts short.

Every width is its own run (widths change shapes, so each is a separate compiled program). The reference file
(`experiments/references/double-descent.json`) holds the published curves, the judged points, the shape to
check (the peak above both ends) and the early-stopping setting whose savings are reported.
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxepochs.studies import common as reproduce_lib


def _run_id(condition: str, width: int) -> str:
    return f"{condition}_h{width}"


def _final_error(results) -> np.ndarray:
    """Per-seed test error after the last epoch, [S]."""
    return np.array([1.0 - r.history[-1]["test_accuracy"] for r in results])


def _error_curve(results) -> np.ndarray:
    """Per-seed test error per epoch, [S, E]."""
    return np.array([[1.0 - row["test_accuracy"] for row in r.history] for r in results])


def judge(reference: dict, finals: dict[str, np.ndarray], quick: bool) -> list[dict]:
    """Published points (skipped in quick mode) and the shape: the peak's error above both ends'."""
    rows = []
    if not quick:
        for value in reference["values"]:
            ours = finals[_run_id(value["condition"], value["width"])]
            rows.append(reproduce_lib.row(value["label"] + " test error", value["value"], ours, value["tolerance"]))
    shape = reference["shape"]
    widths = reference["quick"]["widths"] if quick else reference["widths"]
    peak_widths = [w for w in shape["peak"] if w in widths]
    peak = max((finals[_run_id(shape["condition"], w)] for w in peak_widths), key=np.mean)
    for end in ("low_end", "high_end"):
        ours_end = finals[_run_id(shape["condition"], shape[end])]
        gap = peak - ours_end
        rows.append(
            {
                "what": f"peak (h in {peak_widths}) above h={shape[end]} ({shape['condition']} test error)",
                "published": "peak higher",
                "mean": float(np.mean(gap)),
                "std": float(np.std(gap)),
                "difference": float(np.mean(gap)),
                "tolerance": 0.0,
                "passed": bool(np.mean(gap) > 0),
            }
        )
    return rows


def early_stopping_lines(reference: dict, full: dict, stopped: dict, epochs: int) -> tuple[list[str], list[dict]]:
    """Markdown on what early stopping saved at each peak width, and the epoch-wise rise as judged rows."""
    es = reference["early_stopping"]
    lines = [
        "## The epoch-wise rise at the peak, and early stopping",
        "",
        f"Early stopping: {es['why']}.",
        "",
        "| width | test error at epoch 50 | minimum (epoch) | at epoch "
        f"{epochs} | early stopping: stopped / best epoch | its test error | saved (error, epochs) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for width in stopped:
        curve_se = _error_curve(full[width])
        mean_e = curve_se.mean(0)
        at_50 = mean_e[min(49, len(mean_e) - 1)]
        low = int(np.argmin(mean_e))
        stop_epochs = [r.summary["stopped_epoch"] or r.summary["epochs_completed"] for r in stopped[width]]
        best_epochs = [r.summary["best_epoch"] for r in stopped[width]]
        es_error = np.array([1.0 - r.summary["test_accuracy"] for r in stopped[width]])
        lines.append(
            f"| {width} | {at_50:.3f} | {mean_e[low]:.3f} ({low + 1}) | {mean_e[-1]:.3f} | "
            f"{np.mean(stop_epochs):.0f} / {np.mean(best_epochs):.0f} | {es_error.mean():.3f} | "
            f"{mean_e[-1] - es_error.mean():+.3f}, {epochs - np.mean(stop_epochs):.0f} |"
        )
        rise = curve_se[:, -1] - curve_se[:, min(49, curve_se.shape[1] - 1)]
        rows.append(
            {
                "what": f"h={width}: test error rises from epoch 50 to epoch {epochs}",
                "published": "rises",
                "mean": float(rise.mean()),
                "std": float(rise.std()),
                "difference": float(rise.mean()),
                "tolerance": 0.0,
                "passed": bool(rise.mean() > 0),
            }
        )
    return lines, rows


def plot(path: pathlib.Path, reference: dict, finals: dict, widths: list[int], full: dict, stopped: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_epochs) = plt.subplots(1, 2, figsize=(13, 5))
    for curve in reference["curves"]:
        condition = curve["condition"]
        ours = [finals.get(_run_id(condition, w)) for w in widths]
        if any(o is None for o in ours):
            continue
        mean = np.array([o.mean() for o in ours])
        std = np.array([o.std() for o in ours])
        label = reference["conditions"][condition]["label"]
        (line,) = ax.plot(widths, mean, "o-", ms=3, label=f"{label} (ours, mean of {len(ours[0])})")
        ax.fill_between(widths, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.scatter(curve["widths"], curve["values"], color=line.get_color(), marker="x", s=50, zorder=3)
    ax.scatter([], [], color="k", marker="x", label="published (notebook)")
    ax.set_xscale("log")
    ax.set_xlabel("hidden width h (MLP 40-h-h-10)")
    ax.set_ylabel("test error after the last epoch")
    ax.set_title("model-wise double descent")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for width, results in full.items():
        curve_se = _error_curve(results)
        epochs = np.arange(1, curve_se.shape[1] + 1)
        (line,) = ax_epochs.plot(epochs, curve_se.mean(0), label=f"h={width}, trained to the end")
        if width in stopped:
            stop = np.mean([r.summary["stopped_epoch"] or r.summary["epochs_completed"] for r in stopped[width]])
            best = np.mean([r.summary["best_epoch"] for r in stopped[width]])
            es_error = np.mean([1.0 - r.summary["test_accuracy"] for r in stopped[width]])
            ax_epochs.axvline(stop, color=line.get_color(), ls="--", lw=1)
            ax_epochs.scatter([best], [es_error], color=line.get_color(), marker="*", s=120, zorder=3)
    ax_epochs.plot([], [], "k--", lw=1, label="early stopping stops (val_loss)")
    ax_epochs.scatter([], [], color="k", marker="*", s=120, label="its restored best: test error")
    ax_epochs.set_xlabel("epoch")
    ax_epochs.set_ylabel("test error")
    ax_epochs.set_title(f"epoch-wise at the peak widths ({reference['early_stopping']['condition']})")
    ax_epochs.legend(fontsize=8)
    ax_epochs.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reproduce(
    reference: dict, workdir: pathlib.Path, seeds: int, quick: bool, quiet: bool, vmap: bool = False
) -> list[dict]:
    quick_settings = reference["quick"]
    widths = quick_settings["widths"] if quick else reference["widths"]
    conditions = [reference["shape"]["condition"]] if quick else list(reference["conditions"])
    overrides = dict(reference.get("overrides", {}))
    if quick:
        overrides["train.epochs"] = str(quick_settings["epochs"])
    epochs = int(overrides.get("train.epochs", 0)) or None
    results: dict[str, list] = {}
    for condition in conditions:
        for width in widths:
            run_overrides = {
                **overrides,
                **reference["conditions"][condition]["overrides"],
                "model.hidden_sizes": f"({width},{width})",
            }
            run_id = _run_id(condition, width)
            results[run_id] = reproduce_lib.run_seeds(
                run_id, reference["experiment"], run_overrides, workdir, seeds, quiet, vmap
            )
    finals = {run_id: _final_error(r) for run_id, r in results.items()}
    es = reference["early_stopping"]
    es_widths = [w for w in es["widths"] if w in widths]
    stopped = {}
    for width in es_widths:
        run_overrides = {
            **overrides,
            **reference["conditions"][es["condition"]]["overrides"],
            **es["overrides"],
            "model.hidden_sizes": f"({width},{width})",
        }
        run_id = f"early_stopping_h{width}"
        stopped[width] = reproduce_lib.run_seeds(
            run_id, reference["experiment"], run_overrides, workdir, seeds, quiet, vmap
        )
    full = {w: results[_run_id(es["condition"], w)] for w in es_widths}
    epochs = epochs or len(next(iter(results.values()))[0].history)
    rows = judge(reference, finals, quick)
    extra, rise_rows = early_stopping_lines(reference, full, stopped, epochs)
    rows += rise_rows
    reproduce_lib.write_report(workdir / "report.md", reference, rows, seeds, quick, extra)
    plot(workdir / "curves.png", reference, finals, widths, full, stopped)
    if not quiet:
        print((workdir / "report.md").read_text())
    return rows
