"""`jaxepochs reproduce prechelt`: Prechelt's trade-off between stopping sooner and generalising better.

Each problem of the reference (an experiment module) trains its grid of MLP sizes x seeds as one sweep, early
stopping off and the test split logged every epoch, so every run's whole training, validation and test curves are
recorded once; Prechelt's 14 criteria are then evaluated on those curves (studies/prechelt_criteria.py, the
trainer's own rules), and his measures computed per problem and averaged over the problems. The claims judged:
the slowest criterion trains about 4 times as long as the fastest, and buys about 4% lower test error.
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxepochs.host import config as config_lib
from jaxepochs.studies import common, prechelt_criteria
from jaxepochs.sweep import grid as grid_lib
from jaxepochs.sweep import run as sweep_run


def _curves(histories: dict[str, list[dict]], task: str) -> tuple[np.ndarray, ...]:
    """[R, T] validation, training and test errors: Prechelt's squared error percentage ("sqerr", a classifier's
    metric from data/proben1.py), or the loss of a regression (its mean squared error); of the runs that trained
    every epoch (one whose loss turned non-finite stopped there, and its rows with it: it is left out)."""
    longest = max(len(rows) for rows in histories.values())
    names = sorted(name for name, rows in histories.items() if len(rows) == longest)
    field = "sqerr" if task == "classification" else "loss"
    curve = lambda split: np.array([[row[f"{split}_{field}"] for row in histories[n]] for n in names])
    if task == "classification" and "val_sqerr" not in histories[names[0]][0]:
        raise ValueError("a classification problem of reproduce prechelt needs metrics_fn = proben1.classifier_metrics")
    return curve("val"), curve("train"), curve("test")


def _split_sizes(config) -> tuple[int, int, int]:
    """The training and test splits' sizes and the classes of the experiment `config` names (RPROP's full batch;
    the step of a classifier's test error)."""
    from jaxepochs.data.splits import count
    from jaxepochs.host import hooks as hooks_lib
    from jaxepochs.host import setup

    dataset = setup.load_data(config, hooks_lib.load_hooks(config), quiet=True)
    return count(dataset.train), count(dataset.test), dataset.num_classes


def run_problem(problem: dict, condition: dict, workdir: pathlib.Path, seeds: int, epochs: int | None,
                quiet: bool, notes: list[str]) -> dict:  # fmt: skip
    """One problem's sweep under one condition (optimizer) and its criteria's measures ({criterion: measures});
    a line on its runs appended to `notes`."""
    config = config_lib.load_config_file(common.experiment_module(problem["experiment"]))
    overrides = {"early_stopping.enabled": "False", "train.log_test": "True", "logging.curves": "False"}
    overrides |= {**problem.get("overrides", {}), **condition.get("overrides", {})}
    if epochs is not None:
        overrides["train.epochs"] = str(epochs)
    config = config_lib.apply_overrides(config, overrides)
    n_train, n_test, classes = _split_sizes(config)
    if condition.get("full_batch"):
        config = config_lib.apply_overrides(config, {"train.batch_size": str(n_train)})
    specs = {"model.hidden_sizes": problem["hidden_sizes"], "seed": ",".join(str(s) for s in range(seeds))}
    where = workdir / condition["id"] / problem["id"]
    result = sweep_run.sweep(config, grid_lib.expand(config, specs), where, quiet=True, restart=True)
    val, train, test = _curves(result.histories, config.task)
    stops = prechelt_criteria.stopping_epochs(val, train)
    left_out = len(result.histories) - val.shape[0]
    note = f"{condition['label']} {problem['id']}: {val.shape[0]} runs of {val.shape[1]} epochs" + (
        f" ({left_out} diverged: a non-finite loss ended them, left out)" if left_out else "")  # fmt: skip
    notes.append(note)
    if not quiet:
        print(note, flush=True)
    # A classifier's test sqerr can near 0: relative measures divide by at least one test example wholly wrong.
    floor = 100.0 * 2.0 / (classes * n_test) if config.task == "classification" else 0.0
    return prechelt_criteria.measures(stops, val, test, floor)


def pooled(per_problem: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each criterion's measures averaged over the problems (each problem counts once, as in Prechelt's tables)."""
    criteria = next(iter(per_problem.values()))
    return {
        name: {key: float(np.mean([p[name][key] for p in per_problem.values()])) for key in criteria[name]}
        for name in criteria
    }


def by_class(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each class's (GL, PQ, UP) measures averaged over its criteria."""
    classes = {}
    for name, measures in table.items():
        classes.setdefault(name[:2], []).append(measures)
    return {c: {k: float(np.mean([m[k] for m in ms])) for k in ms[0]} for c, ms in classes.items()}


def judge(reference: dict, table: dict[str, dict[str, float]], per_problem: dict[str, dict],
          label: str = "") -> list[dict]:  # fmt: skip
    """The claims: the slowest criterion's training time over the fastest's (averaged over the problems); its
    test error's improvement on the fastest's (each problem's relative improvement, averaged: the problems'
    errors are on other scales); and the classes' ranking — GL most often ends within 1% of the best reachable
    test error ("to maximize the probability of finding a good solution, use a GL criterion"), while a PQ or an
    UP criterion gives the lower mean test error ("to maximize the average quality ... PQ ... or UP")."""
    slowest = max(table, key=lambda c: table[c]["mean_stop_epoch"])
    fastest = min(table, key=lambda c: table[c]["mean_stop_epoch"])
    time_ratio = table[slowest]["mean_stop_epoch"] / table[fastest]["mean_stop_epoch"]
    gains = [
        100.0
        * (m[fastest]["test_error"] - m[slowest]["test_error"])
        / max(m[fastest]["test_error"], m[fastest].get("error_floor", 0.0))
        for m in per_problem.values()
    ]
    claims = {value["metric"]: (value["low"], value["high"]) for value in reference["values"]}
    classes = by_class(table)
    near = {c: m["near_best_fraction"] for c, m in classes.items()}
    loss = {c: 100.0 * m["generalisation_loss"] for c, m in classes.items()}
    gl_lead = near["GL"] - max(near["PQ"], near["UP"])
    gl_excess = loss["GL"] - min(loss["PQ"], loss["UP"])
    return [
        common.row(f"{label}training time, slowest ({slowest}) over fastest ({fastest}) criterion",
                   claims["time_ratio"], np.array([time_ratio]), 0.0),
        common.row(f"{label}test error improvement of {slowest} over {fastest}, % (mean over problems)",
                   claims["generalisation_gain_percent"], np.array(gains), 0.0),
        common.row(f"{label}GL's near-best fraction minus the better of PQ's and UP's (classes' means)",
                   claims["gl_near_best_lead"], np.array([gl_lead]), 0.0),
        common.row(f"{label}GL's generalisation loss minus the better of PQ's and UP's, % points",
                   claims["gl_loss_excess_percent"], np.array([gl_excess]), 0.0),
    ]  # fmt: skip


def plot(path: pathlib.Path, tables: dict[str, dict[str, dict[str, float]]]) -> None:
    """The trade-off, a panel per condition: each criterion's training time (relative to the fastest) against its
    generalisation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (condition, table) in zip(axes[0], tables.items(), strict=True):
        for name, m in table.items():
            ax.scatter(m["relative_time"], 100 * m["generalisation_loss"], color=f"C{'GPU'.index(name[0])}", s=25)
            ax.annotate(name, (m["relative_time"], 100 * m["generalisation_loss"]), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("training time relative to the fastest criterion")
        ax.set_ylabel("test error above the best reachable, %")
        ax.set_title(f"{condition}: GL blue, PQ orange, UP green")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table_lines(table: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| criterion | mean stop epoch | time vs fastest | test error | vs best reachable | near best |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in table.items():
        lines.append(
            f"| {name} | {m['mean_stop_epoch']:.1f} | {m['relative_time']:.2f}x | {m['test_error']:.4f} | "
            f"{100 * m['generalisation_loss']:+.1f}% | {100 * m['near_best_fraction']:.0f}% |"
        )
    return lines


def _class_lines(table: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| class | mean stop epoch | time vs fastest | vs best reachable | near best |", "|---|---|---|---|---|"]
    for name, m in by_class(table).items():
        lines.append(f"| {name} | {m['mean_stop_epoch']:.1f} | {m['relative_time']:.2f}x | "
                     f"{100 * m['generalisation_loss']:+.1f}% | {100 * m['near_best_fraction']:.0f}% |")  # fmt: skip
    return lines


def reproduce(reference: dict, workdir: pathlib.Path, seeds: int, quick: bool, quiet: bool, vmap: bool) -> list[dict]:
    """Every condition's and problem's sweep, the criteria on its curves, each condition's pooled table judged;
    report.md and curves.png."""
    problems = [p for p in reference["problems"] if p.get("quick") or not quick]
    conditions = [c for c in reference["conditions"] if c.get("quick") or not quick]
    epochs = reference["quick_epochs"] if quick else None
    rows, extra, tables, notes = [], [], {}, []
    for condition in conditions:
        per_problem = {p["id"]: run_problem(p, condition, workdir / "sweeps", seeds, epochs, quiet, notes)
                       for p in problems}  # fmt: skip
        tables[condition["label"]] = table = pooled(per_problem)
        rows += judge(reference, table, per_problem, f"{condition['label']}: ")
        extra += [f"## {condition['label']}: every criterion, averaged over the problems", "", *_table_lines(table)]
        extra += ["", "By class (each class's criteria averaged):", "", *_class_lines(table), ""]
    extra += [f"Problems: {', '.join(p['id'] for p in problems)}. The curves: "
              "workdir/sweeps/<condition>/<problem>/sweep.jsonl.", "", "Runs: " + "; ".join(notes) + "."]  # fmt: skip
    common.write_report(workdir / "report.md", reference, rows, seeds, quick, extra)
    plot(workdir / "curves.png", tables)
    if not quiet:
        print((workdir / "report.md").read_text())
    return rows
