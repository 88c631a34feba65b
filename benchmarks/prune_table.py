"""Pruned sweeps against the full grid (issue #32), and compaction's wall time against the run-epochs trained.

    python benchmarks/prune_table.py                      # both tables, 150 epochs (about 15 min on 2 cores)
    python benchmarks/prune_table.py --epochs 30 --part grid

Part "grid": MNIST-1D's default MLP (experiments/mnist1d_mlp.py) with AdamW over an 81-configuration grid,
9 learning rates x 3 weight decays x 3 seeds, for `--epochs` epochs, each run ending with its best epoch's
parameters by `--monitor` (val_loss by default: early stopping's tracker, patience past the last epoch, so nothing
stops early), which the rungs rank by too.
Trained whole, with successive halving (eta 3, first rung `--min_epochs`) and with Hyperband (same eta and first
rung), and with Optuna's TPE sampler and its successive-halving pruner when optuna is installed. For each: the
run-epochs trained (and their fraction of the grid's), the wall time, and the test accuracy of the configuration
it ranks first against the best test accuracy any run of the full grid reached, against the test accuracy of the
run the full grid ranks first, and (the seeds' noise averaged out) the full grid's mean over seeds of the chosen
learning rate and weight decay against the best such mean.

Part "compaction": 64 runs, half of which stop early (patience 1, min_delta 0.05 on val_loss) and half never
(patience past the last epoch), trained with and without compaction; the compacted sweep's wall time against
the uncompacted one's scaled by the fraction of run-epochs actually trained (both without the first compile of
the program, which both pay; the compacted sweep's compiles of its smaller programs are counted).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jaxepochs  # noqa: E402
from jaxepochs.sweep import grid as grid_lib  # noqa: E402
from jaxepochs.sweep import prune as prune_lib  # noqa: E402

GRID = {
    "optimizer.learning_rate": "3e-4,6e-4,1e-3,2e-3,3e-3,6e-3,1e-2,2e-2,4e-2",
    "optimizer.weight_decay": "1e-4,1e-2,1e-1",
    "seed": "0,1,2",
}


def _config(epochs: int, overrides: dict[str, str]):
    config = jaxepochs.load_config_file(str(REPO / "experiments" / "mnist1d_mlp.py"))
    settings = {"train.epochs": str(epochs), "optimizer.name": "adamw", "logging.curves": "False"}
    settings.update({"checkpoint.every_seconds": "600", "logging.csv": "False", "logging.tensorboard": "False"})
    return jaxepochs.apply_overrides(config, {**settings, **overrides})


def _config_means(result, grid) -> dict[tuple, float]:
    """The full grid's mean test accuracy of each (learning rate, weight decay) over its seeds."""
    by_config: dict[tuple, list[float]] = {}
    for row in result.results:
        values = grid[int(row["run"][1:])]
        key = (float(values["optimizer.learning_rate"]), float(values["optimizer.weight_decay"]))
        by_config.setdefault(key, []).append(row["final_test_accuracy"])
    return {key: sum(v) / len(v) for key, v in by_config.items()}


def _row(name: str, run_epochs: int, chosen: dict, grid_epochs: int, best: tuple, seconds: float) -> dict:
    """A table row; `best`: (the best test accuracy of any run of the full grid, that of the run it ranks first,
    each configuration's mean over its seeds in the full grid)."""
    key = (float(chosen["values"]["optimizer.learning_rate"]), float(chosen["values"]["optimizer.weight_decay"]))
    means = best[2]
    return {
        "search": name,
        "run_epochs": run_epochs,
        "fraction_of_grid": run_epochs / grid_epochs,
        "seconds": seconds,
        "chosen": json.dumps({k.split(".")[-1]: v for k, v in chosen["values"].items()}),
        "test_accuracy": chosen["test_accuracy"],
        "points_below_best_run": 100 * (best[0] - chosen["test_accuracy"]),
        "points_below_grid_choice": 100 * (best[1] - chosen["test_accuracy"]),
        "its_lr_wd_mean_over_seeds": means[key],
        "points_below_best_lr_wd_mean": 100 * (max(means.values()) - means[key]),
    }


def _chosen(result, grid) -> dict:
    first = result.results[0]
    return {"values": grid[int(first["run"][1:])], "test_accuracy": first["final_test_accuracy"]}


def grid_table(epochs: int, min_epochs: int, workdir: pathlib.Path, monitor: str) -> list[dict]:
    tracking = {"early_stopping.enabled": "True", "early_stopping.monitor": monitor}
    tracking.update({"early_stopping.patience": str(epochs + 1), "early_stopping.restore_best": "True"})
    config = _config(epochs, tracking)
    grid = grid_lib.expand(config, GRID)
    rows, best = [], None
    for name, prune in (
        ("full grid", None),
        (f"successive halving (eta 3, first rung {min_epochs})", prune_lib.PruneSpec("sha", 3, min_epochs)),
        (f"Hyperband (eta 3, first rung {min_epochs})", prune_lib.PruneSpec("hyperband", 3, min_epochs)),
    ):
        start = time.perf_counter()
        result = jaxepochs.sweep(config, grid, workdir / name.split()[0], quiet=True, restart=True, prune=prune)
        seconds = time.perf_counter() - start
        if prune is None:
            best = (max(r["final_test_accuracy"] for r in result.results), result.results[0]["final_test_accuracy"],
                    _config_means(result, grid))  # fmt: skip
        run_epochs = sum(len(h) for h in result.histories.values())
        rows.append(_row(name, run_epochs, _chosen(result, grid), len(grid) * epochs, best, seconds))
        print(rows[-1], flush=True)
    if importlib.util.find_spec("optuna") is not None:
        rows.append(_optuna_row(config, min_epochs, workdir, len(grid) * epochs, best))
        print(rows[-1], flush=True)
    rows[0]["best_test_accuracy_of_any_run"] = best[0]
    return rows


def _optuna_row(config, min_epochs: int, workdir: pathlib.Path, grid_epochs: int, best: tuple) -> dict:
    """Optuna's TPE over the grid's values (categorical), 81 trials in 3 batches of 27, its successive-halving
    pruner at the same rungs."""
    from jaxepochs.studies import search

    start = time.perf_counter()
    rows = search.search(config, GRID, workdir / "optuna", trials=81, batch=27, min_epochs=min_epochs, quiet=True,
                         restart=True)  # fmt: skip
    seconds = time.perf_counter() - start
    run_epochs = sum(int(row["epochs_run"]) for row in rows)
    chosen = {"values": {k: rows[0][k] for k in GRID}, "test_accuracy": rows[0]["final_test_accuracy"]}
    name = f"Optuna TPE + its successive halving (81 trials, 3 batches of 27, first rung {min_epochs})"
    return _row(name, run_epochs, chosen, grid_epochs, best, seconds)


def compaction_table(epochs: int, workdir: pathlib.Path) -> list[dict]:
    config = _config(epochs, {"early_stopping.enabled": "True", "early_stopping.min_delta": "0.05"})
    grid = grid_lib.expand(
        config, {"early_stopping.patience": f"1,{epochs + 1}", "seed": ",".join(map(str, range(32)))}
    )
    out = {}
    for compact in (False, True):
        start = time.perf_counter()
        result = jaxepochs.sweep(config, grid, workdir / f"c{int(compact)}", quiet=True, restart=True, compact=compact)
        out[compact] = (time.perf_counter() - start - result.compile_seconds, result)  # the first compile left out
    run_epochs = sum(len(h) for h in out[True][1].histories.values())
    lengths = sorted(len(h) for h in out[True][1].histories.values())
    expected = out[False][0] * run_epochs / (len(grid) * epochs)
    row = {
        "runs": len(grid),
        "stopped_before_epoch_20": sum(n < 20 for n in lengths),
        "run_epochs": run_epochs,
        "fraction": run_epochs / (len(grid) * epochs),
        "seconds_uncompacted": out[False][0],
        "seconds_compacted": out[True][0],
        "seconds_expected_from_run_epochs": expected,
        "compacted_over_expected": out[True][0] / expected,
    }
    print(row, flush=True)
    return [row]


def _markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--min_epochs", type=int, default=5)
    parser.add_argument("--part", choices=("grid", "compaction", "both"), default="both")
    parser.add_argument("--monitor", default="val_loss", help="what the rungs rank by and each run ends at its best of")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("grid", "both"):
            print(_markdown(grid_table(args.epochs, args.min_epochs, pathlib.Path(tmp), args.monitor)))
        if args.part in ("compaction", "both"):
            print(_markdown(compaction_table(args.epochs, pathlib.Path(tmp))))


if __name__ == "__main__":
    main()
