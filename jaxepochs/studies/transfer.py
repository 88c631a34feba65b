"""`jaxepochs reproduce transfer`: pretrain on one task, fine-tune on a related one with few labels, over seeds.

The MNIST-1D CNN is pretrained on digits 0-4 (`experiments/transfer_pretrain.py`), then learns digits 5-9 from 10%
of their labels (`experiments/transfer_finetune.py`) in each arm of `experiments/references/transfer.json`: from
scratch, and from the pretraining run of the same seed with a fresh head: full fine-tuning, a frozen backbone,
gradual unfreezing, discriminative rates (and the rate checks). Every arm logs its test accuracy after every
epoch; the report gives, per arm, the final and best test accuracy, the epoch of the best, the epochs to 99% of
its own best and to a common bar (a fraction of from scratch's final accuracy), the claims judged from those
numbers, what was expected before the runs (the reference's text) and what was found (computed). Every number
the study fixes (seeds, epochs, rates, bars) is in the reference file.

WORKDIR gets `runs/<arm>/seed<k>/` (the pretraining runs under `runs/pretrain/`), `histories/`, `curves.json`
(test accuracy per arm, seed and epoch), `report.md` and `curves.png`.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from jaxepochs.studies import common


def _overrides(reference: dict, arm: dict, quick: bool) -> dict:
    """The fine-tuning experiment's overrides for `arm` (the pretrained source is added per seed)."""
    overrides = {**reference.get("overrides", {}), **arm["overrides"]}
    if arm["pretrained"]:
        overrides["init.reinit"] = f"('{reference['head']}',)"
    if quick:
        overrides["train.epochs"] = str(reference["quick"]["epochs"])
    return overrides


def run_arms(reference: dict, workdir: pathlib.Path, seeds: int, quick: bool, quiet: bool, vmap: bool) -> dict:
    """Pretrains each seed, then trains every arm on every seed; {"pretrain" and each arm's id: [history per
    seed]}. `vmap` sweeps the from-scratch seeds; the pretrained arms start each seed from its own run, so they
    (and the pretraining, whose runs they read) run one seed at a time."""
    pretrain = reference["pretrain"]
    overrides = dict(pretrain.get("overrides", {}))
    if quick:
        overrides["train.epochs"] = str(reference["quick"]["pretrain_epochs"])
    results = {"pretrain": common.run_seeds("pretrain", pretrain["experiment"], overrides, workdir, seeds, quiet)}
    source = (workdir / "runs" / "pretrain").resolve()
    from_source = lambda seed: {"init.from_workdir": str(source / f"seed{seed}")}
    for arm in reference["arms"]:
        per_seed = from_source if arm["pretrained"] else None
        results[arm["id"]] = common.run_seeds(
            arm["id"], reference["experiment"], _overrides(reference, arm, quick), workdir, seeds, quiet, vmap, per_seed
        )
    return {name: [r.history for r in runs] for name, runs in results.items()}


def test_curves(histories: list[list[dict]]) -> np.ndarray:
    """Test accuracy per seed and epoch, [S, E]."""
    return np.array([[row["test_accuracy"] for row in history] for history in histories])


def first_epoch_at(curve_se: np.ndarray, bar_s: np.ndarray) -> np.ndarray:
    """Per seed, the first epoch (1-based) whose value reaches that seed's bar; E + 1 where none does."""
    reached_se = curve_se >= bar_s[:, None]
    return np.where(reached_se.any(1), reached_se.argmax(1) + 1, curve_se.shape[1] + 1)


def arm_numbers(reference: dict, histories: dict) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """Per arm, per seed: final and best test accuracy, the epoch of the best, the epochs to near its best and
    to the common bar; and the bar (a fraction of the baseline arm's mean final accuracy)."""
    curves = {arm["id"]: test_curves(histories[arm["id"]]) for arm in reference["arms"]}
    bar = reference["threshold_fraction"] * float(curves[reference["baseline"]][:, -1].mean())
    numbers = {}
    for name, curve_se in curves.items():
        best_s = curve_se.max(1)
        numbers[name] = {
            "final": curve_se[:, -1],
            "best": best_s,
            "epoch_of_best": curve_se.argmax(1) + 1,
            "epochs_to_near_best": first_epoch_at(curve_se, reference["near_best_fraction"] * best_s),
            "epochs_to_bar": first_epoch_at(curve_se, np.full(len(best_s), bar)),
            "reached_bar": (curve_se >= bar).any(1),
        }
    return numbers, bar


def _paired(metric: str, arm: dict, base: dict) -> np.ndarray:
    """The claim's per-seed difference: epochs saved against the baseline, or accuracy gained over it."""
    if metric == "epochs_to_threshold_saved":
        return (base["epochs_to_bar"] - arm["epochs_to_bar"]).astype(float)
    if metric == "epochs_to_best_saved":
        return (base["epoch_of_best"] - arm["epoch_of_best"]).astype(float)
    if metric == "final_accuracy_gain":
        return arm["final"] - base["final"]
    raise ValueError(f"transfer.json: unknown claim metric {metric!r}.")


def judge(reference: dict, numbers: dict) -> list[dict]:
    """One row per claim of the reference, judged on the mean over seeds of its paired difference."""
    rows = []
    for claim in reference["values"]:
        ours = _paired(claim["metric"], numbers[claim["arm"]], numbers[reference["baseline"]])
        mean = float(ours.mean())
        rows.append(
            {
                "what": claim["label"],
                "published": f"{claim['metric']} >= {claim['low']:g}",
                "mean": mean,
                "std": float(ours.std()),
                "difference": mean - claim["low"],
                "tolerance": 0.0,
                "tolerance_text": f"{claim['low']:g} to {claim['high']:g}",
                "passed": bool(claim["low"] <= mean <= claim["high"]),
            }
        )
    return rows


def _pm(values: np.ndarray, digits: int) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table_lines(reference: dict, numbers: dict, bar: float, pretrain_final: np.ndarray) -> list[str]:
    near = reference["near_best_fraction"]
    lines = [
        "## Test accuracy and epochs, per arm",
        "",
        f"Mean ± std over seeds. The bar: {reference['threshold_fraction']:.0%} of from scratch's mean final test "
        f"accuracy = {bar:.3f} ({reference['threshold_why']}); a run that never reaches it counts as the run's "
        f"epochs + 1. Pretraining (digits 0-4) ended at test accuracy {_pm(pretrain_final, 3)} on its own task.",
        "",
        f"| arm | final test acc | best test acc | epoch of the best | epochs to {near:.0%} of its best | "
        f"epochs to the bar ({bar:.3f}) | runs reaching the bar |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in reference["arms"]:
        n = numbers[arm["id"]]
        lines.append(
            f"| {arm['label']} | {_pm(n['final'], 3)} | {_pm(n['best'], 3)} | {_pm(n['epoch_of_best'], 1)} | "
            f"{_pm(n['epochs_to_near_best'], 1)} | {_pm(n['epochs_to_bar'], 1)} | "
            f"{int(n['reached_bar'].sum())} of {len(n['reached_bar'])} |"
        )
    return lines


def found_lines(reference: dict, numbers: dict, rows: list[dict]) -> list[str]:
    """What was found, computed from the numbers (nothing here is written in advance)."""
    labels = {arm["id"]: arm["label"] for arm in reference["arms"]}
    base = reference["baseline"]
    by_final = sorted(numbers, key=lambda a: -numbers[a]["final"].mean())
    by_bar = sorted(numbers, key=lambda a: numbers[a]["epochs_to_bar"].mean())
    below = [labels[a] for a in numbers if a != base and numbers[a]["final"].mean() <= numbers[base]["final"].mean()]
    slower = [
        labels[a]
        for a in numbers
        if a != base and numbers[a]["epochs_to_bar"].mean() >= numbers[base]["epochs_to_bar"].mean()
    ]
    spread, to_bar = numbers[base]["epoch_of_best"], numbers[base]["epochs_to_bar"]
    lines = [
        "## What we found",
        "",
        "- Final test accuracy, highest first: "
        + "; ".join(f"{labels[a]} {numbers[a]['final'].mean():.3f}" for a in by_final)
        + ".",
        "- Epochs to the bar, fewest first: "
        + "; ".join(f"{labels[a]} {numbers[a]['epochs_to_bar'].mean():.1f}" for a in by_bar)
        + ".",
        "- Arms ending no higher than from scratch: " + ("; ".join(below) if below else "none") + ".",
        "- Arms needing at least as many epochs as from scratch to reach the bar: "
        + ("; ".join(slower) if slower else "none")
        + ".",
        "- Arms whose best comes earlier than from scratch's (mean epoch of the best, "
        f"{numbers[base]['epoch_of_best'].mean():.1f}): " + _ids_before(numbers, labels, "epoch_of_best", base) + ".",
        f"- Arms reaching {reference['near_best_fraction']:.0%} of their own best sooner than from scratch (mean "
        f"{numbers[base]['epochs_to_near_best'].mean():.1f} epochs): "
        + _ids_before(numbers, labels, "epochs_to_near_best", base)
        + ".",
        f"- From scratch, over the seeds: the epoch of the best from {spread.min()} to {spread.max()} (std "
        f"{spread.std():.1f}), the epochs to the bar from {to_bar.min()} to {to_bar.max()} (std {to_bar.std():.1f}).",
        f"- Claims: {sum(r['passed'] for r in rows)} of {len(rows)} hold; "
        + (
            "failing: " + "; ".join(r["what"] for r in rows if not r["passed"])
            if not all(r["passed"] for r in rows)
            else "none fail"
        )
        + ".",
    ]
    return lines


def _ids_before(numbers: dict, labels: dict, key: str, base: str) -> str:
    """The arms whose mean `key` (an epoch) is below the baseline's, with theirs; "none" if no arm's is."""
    before = [
        f"{labels[a]} ({numbers[a][key].mean():.1f})"
        for a in numbers
        if numbers[a][key].mean() < numbers[base][key].mean()
    ]
    return "; ".join(before) if before else "none"


def plot(path: pathlib.Path, reference: dict, histories: dict, bar: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    main = [arm for arm in reference["arms"] if not arm.get("rate_check")]
    rates = [arm for arm in reference["arms"] if arm.get("rate_check") or arm["id"] in ("full", reference["baseline"])]
    titles = ("the arms", "rate check: full fine-tuning at three rates")
    colors = {arm["id"]: f"C{k}" for k, arm in enumerate(reference["arms"])}  # one color per arm in both panels
    for ax, arms, title in zip(axes, (main, rates), titles, strict=True):
        for arm in arms:
            curve_se = test_curves(histories[arm["id"]])
            epochs = np.arange(1, curve_se.shape[1] + 1)
            mean, std = curve_se.mean(0), curve_se.std(0)
            style = "--" if arm.get("rate_check") else "-"
            ax.plot(epochs, mean, style, color=colors[arm["id"]], label=arm["label"], lw=1.5)
            ax.fill_between(epochs, mean - std, mean + std, color=colors[arm["id"]], alpha=0.15, lw=0)
        ax.axhline(
            bar, color="k", ls=":", lw=1, label=f"the bar: {reference['threshold_fraction']:.0%} of scratch's final"
        )
        ax.set_xlabel("epoch (fine-tuning on digits 5-9, 200 labels)")
        ax.set_title(f"{title} (mean of {curve_se.shape[0]} seeds ± std)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reproduce(
    reference: dict, workdir: pathlib.Path, seeds: int, quick: bool, quiet: bool, vmap: bool = False
) -> list[dict]:
    if quick:
        seeds = reference["quick"]["seeds"]
    start = time.monotonic()
    histories = run_arms(reference, workdir, seeds, quick, quiet, vmap)
    numbers, bar = arm_numbers(reference, histories)
    rows = judge(reference, numbers)
    pretrain_final = test_curves(histories["pretrain"])[:, -1]
    minutes = (time.monotonic() - start) / 60
    lines = [
        f"This invocation took {minutes:.1f} min (finished runs resume instantly).",
        "",
        "## What we expected (written before the first full run)",
        "",
        reference["expected"],
        "",
        *table_lines(reference, numbers, bar, pretrain_final),
        "",
        *found_lines(reference, numbers, rows),
        "",
        "![test accuracy against epochs](curves.png)",
    ]
    curves = {arm["id"]: test_curves(histories[arm["id"]]).round(4).tolist() for arm in reference["arms"]}
    (workdir / "curves.json").write_text(json.dumps({"test_accuracy": curves, "bar": bar}) + "\n")
    common.write_report(workdir / "report.md", reference, rows, seeds, quick, lines)
    plot(workdir / "curves.png", reference, histories, bar)
    if not quiet:
        print((workdir / "report.md").read_text())
    return rows
