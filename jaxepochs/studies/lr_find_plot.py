"""lr_find.png: the range test's smoothed loss against the learning rate (from where a suggestion may fall, as
Lightning draws it), with the suggestion marked, beside the constant rates' final losses."""

from __future__ import annotations

import math
import pathlib


def plot(result: dict, path: pathlib.Path, skip_begin: int) -> None:
    """Two panels: the range test's loss (raw and smoothed) against the rate, the suggestion marked; each constant
    rate's validation loss (or training loss) after E epochs, the best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, c = result["range_test"], result["constant_rates"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    nan = lambda values: [math.nan if v is None else v for v in values]
    left.plot(r["learning_rates"], nan(r["losses"]), color="0.75", label="loss")
    # The smoothed curve from where the suggestion may fall, as Lightning plots it: its first points are still
    # warming up (the bias correction starts them near half the first loss).
    left.plot(r["learning_rates"][skip_begin:], nan(r["smoothed_losses"])[skip_begin:],
              label=f"smoothed (beta {r['beta']})")  # fmt: skip
    if r["suggestion_step"] is not None:
        i = r["suggestion_step"]
        left.plot(r["learning_rates"][i], r["smoothed_losses"][i], "o", color="red",
                  label=f"suggested {r['suggested_learning_rate']:.3g}")  # fmt: skip
    start = [v for v in r["losses"][:skip_begin] if v is not None]
    low = min(v for v in r["losses"] + r["smoothed_losses"] if v is not None)
    left.set_ylim(0.9 * low if low > 0 else low - 0.1, 1.5 * max(start))  # a diverged tail would flatten the rest
    left.set(xscale="log", xlabel="learning rate", ylabel="training loss",
             title=f"range test: {r['steps']} steps, {r['stop_reason']}")  # fmt: skip
    metric = c["selected_by"]
    points = [(row["learning_rate"], row.get(metric, math.nan)) for row in c["runs"] if not row["diverged"]]
    if points:
        right.plot(*zip(*points, strict=True), "o-", label=metric)
    for row in c["runs"]:
        if row["diverged"]:
            right.axvline(row["learning_rate"], color="0.6", linestyle=":", label="diverged")
    if c["suggested_learning_rate"] is not None:
        best = next(row for row in c["runs"] if row["learning_rate"] == c["suggested_learning_rate"])
        right.plot(best["learning_rate"], best[metric], "o", color="red", label=f"best {best['learning_rate']:.3g}")
    shown = [v for _, v in points if math.isfinite(v)]
    if shown and min(shown) > 0 and max(shown) > 10 * min(shown):
        right.set_yscale("log")
    right.set(xscale="log", xlabel="learning rate", ylabel=f"{metric} after {c['epochs']} epochs",
              title=f"{len(c['runs'])} constant rates, one vmapped program")  # fmt: skip
    for ax in (left, right):
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
