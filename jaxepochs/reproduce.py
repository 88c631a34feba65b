"""`jaxepochs reproduce NAME`: rerun a published result over seeds, overlay the published points, judge each.

Published numbers live in `experiments/references/NAME.json` (value, unit, what it was measured on, source,
tolerance and why); none are in code. Each referenced experiment runs once per seed, sequentially, into
`WORKDIR/runs/<experiment>/seed<k>/` (rerunning resumes finished runs instantly). The workdir gets `report.md`
(published value, our mean ± std, difference, pass/fail), `curves.png` (our mean curves with their spread, the
published points on top) and `histories/<experiment>_seed<k>.jsonl`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import NamedTuple

import numpy as np

from jaxepochs import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCES = REPO / "experiments" / "references"
QUICK = {"seeds": 1, "epochs": 8}  # --quick: the direction of every gap, not the published values


def available() -> list[str]:
    return sorted(path.stem for path in REFERENCES.glob("*.json"))


def load_reference(name: str) -> dict:
    path = REFERENCES / f"{name}.json"
    if not path.is_file():
        raise ValueError(f'No published reference "{name}". Available: {", ".join(available())}.')
    return json.loads(path.read_text())


def _experiments(reference: dict) -> list[str]:
    names = [v["experiment"] for v in reference["values"]] + [c["experiment"] for c in reference["curves"]]
    return list(dict.fromkeys(names))


class SeedRun(NamedTuple):
    history: list[dict]


def run_seeds(
    run_id: str, experiment: str, overrides: dict, workdir: pathlib.Path, seeds: int, quiet: bool, vmap: bool = False
) -> list:
    """Trains `experiment` with `overrides` once per seed into WORKDIR/runs/<run_id>/seed<k>/ (a finished run
    resumes instantly) and copies each history to WORKDIR/histories/<run_id>_seed<k>.jsonl; TrainResults.
    `vmap`: all seeds as one sweep (one vmapped program) in WORKDIR/sweeps/<run_id>/ instead."""
    from jaxepochs import train

    if vmap and seeds > 1:
        return _sweep_seeds(run_id, experiment, overrides, workdir, seeds, quiet)
    results = []
    for seed in range(seeds):
        config = config_lib.apply_overrides(
            config_lib.load_config_file(REPO / "experiments" / f"{experiment}.py"), {**overrides, "seed": str(seed)}
        )
        if not quiet:
            print(f"reproduce: {run_id} seed {seed} ({config.train.epochs} epochs)", flush=True)
        result = train.train_and_evaluate(config, workdir / "runs" / run_id / f"seed{seed}", quiet=True)
        results.append(result)
        target = workdir / "histories" / f"{run_id}_seed{seed}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "runs" / run_id / f"seed{seed}" / "metrics.jsonl", target)
    return results


def _sweep_seeds(run_id: str, experiment: str, overrides: dict, workdir: pathlib.Path, seeds: int, quiet: bool):
    """`run_seeds` as one sweep over the seeds: each seed's history as its solo run's, to float32 round-off."""
    from jaxepochs import sweep_run

    config = config_lib.apply_overrides(
        config_lib.load_config_file(REPO / "experiments" / f"{experiment}.py"), overrides
    )
    if not quiet:
        print(f"reproduce: {run_id} seeds 0-{seeds - 1} as one sweep ({config.train.epochs} epochs)", flush=True)
    grid = [{"seed": str(seed)} for seed in range(seeds)]
    result = sweep_run.sweep(config, grid, workdir / "sweeps" / run_id, quiet=True)
    runs = []
    for seed, name in enumerate(sorted(result.histories)):  # r000, r001, ...: the grid's order
        history = [{k: v for k, v in row.items() if k != "run"} for row in result.histories[name]]
        target = workdir / "histories" / f"{run_id}_seed{seed}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(row) + "\n" for row in history))
        runs.append(SeedRun(history))
    return runs


def _run_seeds(
    experiment: str, reference: dict, workdir: pathlib.Path, seeds: int, epochs: int | None, quiet: bool, vmap: bool
):
    overrides = dict(reference.get("overrides", {}))
    if epochs is not None:
        overrides["train.epochs"] = str(epochs)
    return [r.history for r in run_seeds(experiment, experiment, overrides, workdir, seeds, quiet, vmap)]


def _curve(histories: list[list[dict]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps [E] and the metric per seed [S, E] (runs of one experiment share their step counts)."""
    steps = np.array([row["steps"] for row in histories[0]])
    return steps, np.array([[row[metric] for row in history] for history in histories])


def _at_step(steps: np.ndarray, values_se: np.ndarray, step: int) -> np.ndarray:
    """Per-seed value at the last logged step not after `step` (test metrics are logged once per epoch)."""
    index = int(np.searchsorted(steps, step, side="right")) - 1
    return values_se[:, max(index, 0)]


def load_rerun(reference: dict) -> dict | None:
    """The reference's rerun of the published code over seeds, if it names one ("rerun": {"file": ...}):
    {"curves": {experiment: {seed: {step: value}}}, ...}, or None."""
    if "rerun" not in reference:
        return None
    return json.loads((REFERENCES / reference["rerun"]["file"]).read_text())


def _rerun_at(rerun: dict | None, experiment: str, step: int | None) -> np.ndarray | None:
    """Per-seed values of the rerun at `step` (None: its last logged step), or None where it has none."""
    per_seed = (rerun or {}).get("curves", {}).get(experiment)
    if not per_seed:
        return None
    curves = list(per_seed.values())
    key = str(step if step is not None else max(int(s) for s in curves[0]))
    return np.array([curve[key] for curve in curves]) if key in curves[0] else None


def judge(reference: dict, histories: dict[str, list[list[dict]]], quick: bool) -> list[dict]:
    """One row per published number: published, our mean and std, difference, tolerance, pass; where the
    reference names a rerun of the published code, that rerun's mean and std and its own verdict by the rule."""
    rows = []
    if quick:  # the direction of the gaps, which even a few epochs show
        order = reference.get("quick_order", [])
        finals = {name: float(np.mean([h[-1]["test_accuracy"] for h in histories[name]])) for name in order}
        for better, worse in zip(order, order[1:], strict=False):
            rows.append(
                {
                    "what": f"{better} > {worse} (test_accuracy)",
                    "published": "ordering",
                    "mean": finals[better],
                    "std": 0.0,
                    "difference": finals[better] - finals[worse],
                    "tolerance": 0.0,
                    "passed": finals[better] > finals[worse],
                }
            )
        return rows
    rerun = load_rerun(reference)
    for value in reference["values"]:
        steps, values_se = _curve(histories[value["experiment"]], value["metric"])
        ours = values_se[:, -1]
        published = value["value"]
        if "also_published" in value:  # the source gives two values for one result: judge against the range
            published = tuple(sorted((value["value"], value["also_published"]["value"])))
        theirs = _rerun_at(rerun, value["experiment"], None)
        rows.append(row(f"{value['label']} {value['metric']} (final)", published, ours, value["tolerance"], theirs))
    for curve in reference["curves"]:
        steps, values_se = _curve(histories[curve["experiment"]], curve["metric"])
        for step, published in zip(curve["steps"], curve["values"], strict=True):
            ours = _at_step(steps, values_se, step)
            what = f"{curve['experiment']} {curve['metric']} @ {step} steps"
            theirs = _rerun_at(rerun, curve["experiment"], step)
            rows.append(row(what, published, ours, curve["tolerance"], theirs))
    return rows


def row(
    what: str,
    published: float | tuple[float, float],
    ours: np.ndarray,
    tolerance: float,
    rerun: np.ndarray | None = None,
) -> dict:
    """`published` is a value or a (low, high) range; the difference is to the nearer end (0 inside). `rerun`:
    the published code's own per-seed values, judged by the same rule (how strict the rule is for that code)."""
    mean, std = float(np.mean(ours)), float(np.std(ours))
    low, high = published if isinstance(published, tuple) else (published, published)
    difference = mean - min(max(mean, low), high)
    judged = {
        "what": what,
        "published": published,
        "mean": mean,
        "std": std,
        "difference": difference,
        "tolerance": tolerance,
        "passed": abs(difference) <= tolerance,
    }
    if rerun is not None:
        theirs = row(what, published, rerun, tolerance)
        judged.update(rerun_mean=theirs["mean"], rerun_std=theirs["std"], rerun_passed=theirs["passed"])
    return judged


def _ran_on() -> str:
    import jax

    device = jax.devices()[0]
    return f"Ran on {device.platform} ({device.device_kind}), {jax.device_count()} device(s), jax {jax.__version__}."


def write_report(
    path: pathlib.Path, reference: dict, rows: list[dict], seeds: int, quick: bool, extra: list[str] = ()
) -> None:
    """report.md: the recipe, the judged table, the tolerance and why, `extra` Markdown lines, the sources."""
    lines = [f"# Reproduction: {reference['title']}", "", f"Recipe: {reference['recipe']}.", ""]
    lines.append(f"Seeds: {seeds}{' (quick: directions only, not published values)' if quick else ''}. {_ran_on()}")
    with_rerun = any("rerun_mean" in r for r in rows)
    header = "| result | published | ours (mean ± std) | difference | tolerance | verdict |"
    if with_rerun:
        header += f" {reference['rerun']['label']} (mean ± std) | ours - rerun | rerun's verdict |"
    lines += ["", header, "|---" * header.count(" | ") + "|---|"]
    for r in rows:
        published = r["published"]
        if isinstance(published, tuple):
            published = f"{published[0]:.3f}-{published[1]:.3f}"
        elif not isinstance(published, str):
            published = f"{published:.3f}"
        verdict = "pass" if r["passed"] else "FAIL"
        tolerance = r.get("tolerance_text") or f"±{r['tolerance']:.3f}"
        line = (
            f"| {r['what']} | {published} | {r['mean']:.3f} ± {r['std']:.3f} | {r['difference']:+.3f} | "
            f"{tolerance} | {verdict} |"
        )
        if with_rerun and "rerun_mean" in r:
            gap = r["mean"] - r["rerun_mean"]
            rerun_verdict = "pass" if r["rerun_passed"] else "FAIL"
            line += f" {r['rerun_mean']:.3f} ± {r['rerun_std']:.3f} | {gap:+.3f} | {rerun_verdict} |"
        elif with_rerun:
            line += " | | |"
        lines.append(line)
    passed = sum(r["passed"] for r in rows)
    lines += ["", f"**{passed} of {len(rows)} pass.**"]
    if with_rerun:
        judged = [r for r in rows if "rerun_mean" in r]
        farthest = max(judged, key=lambda r: abs(r["mean"] - r["rerun_mean"]))
        gap = farthest["mean"] - farthest["rerun_mean"]
        lines += [
            "",
            f"{reference['rerun']['label']}, judged by the same rule: {sum(r['rerun_passed'] for r in judged)} of "
            f"{len(judged)} pass. Ours against it: the largest difference of the means is {gap:+.3f} "
            f"({farthest['what']}). {reference['rerun'].get('why', '')}",
        ]
    lines += ["", f"Tolerance: {reference.get('tolerance_why', '')}", ""]
    lines += [*extra, ""] if extra else []
    sources = {v["source"] for v in reference.get("values", []) + reference.get("curves", []) if "source" in v}
    lines.append("Sources: " + "; ".join(sorted(sources | set(reference.get("sources", [])))))
    path.write_text("\n".join(lines) + "\n")


def plot(path: pathlib.Path, reference: dict, histories: dict[str, list[list[dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rerun = load_rerun(reference)
    for curve in reference["curves"]:
        if curve["experiment"] not in histories:
            continue
        steps, values_se = _curve(histories[curve["experiment"]], curve["metric"])
        mean, std = values_se.mean(0), values_se.std(0)
        (line,) = ax.plot(steps, mean, label=f"{curve['experiment']} (ours, mean of {values_se.shape[0]})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.scatter(curve["steps"], curve["values"], color=line.get_color(), marker="x", s=60, zorder=3)
        theirs = [(step, _rerun_at(rerun, curve["experiment"], step)) for step in curve["steps"]]
        theirs = [(step, values.mean()) for step, values in theirs if values is not None]
        if theirs:
            ax.scatter(*zip(*theirs, strict=True), facecolors="none", edgecolors=line.get_color(), s=50, zorder=3)
    ax.scatter([], [], color="k", marker="x", label="published (notebook)")
    if rerun:
        ax.scatter([], [], facecolors="none", edgecolors="k", label=f"{reference['rerun']['label']} (mean)")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(reference["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reproduce(
    name: str,
    workdir: str | pathlib.Path,
    seeds: int | None = None,
    quick: bool = False,
    quiet: bool = False,
    vmap: bool = False,
):
    """Runs every experiment `name`'s reference names over `seeds` seeds (None: the reference's "seeds", else 3;
    `vmap`: each experiment's seeds as one sweep, one vmapped program); returns the judged rows."""
    reference = load_reference(name)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if quick:
        seeds = QUICK["seeds"]
    elif seeds is None:
        seeds = reference.get("seeds", 3)
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: use 1 or more seeds.")
    kind = reference.get("kind", "benchmark")
    if kind == "double_descent":
        from jaxepochs import double_descent

        return double_descent.reproduce(reference, workdir, seeds, quick, quiet, vmap)
    if kind == "grokking":
        from jaxepochs import grokking

        return grokking.reproduce(reference, workdir, seeds, quick, quiet, vmap)
    epochs = QUICK["epochs"] if quick else None
    names = reference.get("quick_order", []) if quick else _experiments(reference)
    histories = {exp: _run_seeds(exp, reference, workdir, seeds, epochs, quiet, vmap) for exp in names}
    rows = judge(reference, histories, quick)
    write_report(workdir / "report.md", reference, rows, seeds, quick)
    plot(workdir / "curves.png", reference, histories)
    if not quiet:
        print((workdir / "report.md").read_text())
    return rows
