"""What every study shares: finding the published references and the experiment modules (in a checkout or an
installed package), training an experiment over seeds, and the judged report.

Published numbers live in `experiments/references/NAME.json` (value, unit, what it was measured on, source,
tolerance and why); none are in code. Each referenced experiment runs once per seed, sequentially, into
`WORKDIR/runs/<experiment>/seed<k>/` (rerunning resumes finished runs instantly), or as one sweep with `vmap`.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import shutil
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxepochs.host import config as config_lib
from jaxepochs.host import run as run_lib
from jaxepochs.sweep import run as sweep_run


def _experiments_dir() -> pathlib.Path:
    """experiments/ as the installed package jaxepochs.experiments, or in a checkout put on the path uninstalled."""
    try:
        return pathlib.Path(str(importlib.resources.files("jaxepochs.experiments")))
    except ModuleNotFoundError:
        return pathlib.Path(__file__).resolve().parents[2] / "experiments"


EXPERIMENTS = _experiments_dir()
REFERENCES = EXPERIMENTS / "references"


def experiment_module(name: str) -> pathlib.Path:
    return EXPERIMENTS / f"{name}.py"


def load_rerun(reference: dict) -> dict | None:
    """The reference's rerun of the published code over seeds, if it names one ("rerun": {"file": ...}):
    {"curves": {experiment: {seed: {step: value}}}, ...}, or None."""
    if "rerun" not in reference:
        return None
    return json.loads((REFERENCES / reference["rerun"]["file"]).read_text())


def available() -> list[str]:
    return sorted(path.stem for path in REFERENCES.glob("*.json"))


def load_reference(name: str) -> dict:
    path = REFERENCES / f"{name}.json"
    if not path.is_file():
        raise ValueError(f'No published reference "{name}". Available: {", ".join(available())}.')
    return json.loads(path.read_text())


class SeedRun(NamedTuple):
    """One seed of a study: its rows, and its summary.json's fields (a TrainResult has both as well)."""

    history: list[dict]
    summary: dict


def run_seeds(
    run_id: str,
    experiment: str,
    overrides: dict,
    workdir: pathlib.Path,
    seeds: int,
    quiet: bool,
    vmap: bool = False,
    per_seed: Callable[[int], dict] | None = None,
) -> list:
    """Trains `experiment` with `overrides` once per seed into WORKDIR/runs/<run_id>/seed<k>/ (a finished run
    resumes instantly) and copies each history to WORKDIR/histories/<run_id>_seed<k>.jsonl; TrainResults
    (history, summary). `per_seed(k)`: overrides of seed k's run alone (a warm start from that seed's run).
    `vmap`: all seeds as one sweep (one vmapped program) in WORKDIR/sweeps/<run_id>/ instead (not with
    `per_seed`: a sweep's members start from one source)."""
    if vmap and seeds > 1 and per_seed is None:
        return _sweep_seeds(run_id, experiment, overrides, workdir, seeds, quiet)
    results = []
    for seed in range(seeds):
        extra = per_seed(seed) if per_seed else {}
        config = config_lib.apply_overrides(
            config_lib.load_config_file(experiment_module(experiment)), {**overrides, **extra, "seed": str(seed)}
        )
        if not quiet:
            print(f"reproduce: {run_id} seed {seed} ({config.train.epochs} epochs)", flush=True)
        result = run_lib.train_and_evaluate(config, workdir / "runs" / run_id / f"seed{seed}", quiet=True)
        results.append(result)
        target = workdir / "histories" / f"{run_id}_seed{seed}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "runs" / run_id / f"seed{seed}" / "metrics.jsonl", target)
    return results


def _sweep_seeds(run_id: str, experiment: str, overrides: dict, workdir: pathlib.Path, seeds: int, quiet: bool):
    """`run_seeds` as one sweep over the seeds: each seed's history and summary as its solo run's (the same run
    program; bit for bit on one device)."""
    config = config_lib.apply_overrides(config_lib.load_config_file(experiment_module(experiment)), overrides)
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
        runs.append(SeedRun(history, {**result.summaries[name], "epochs_completed": len(history)}))
    return runs


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
