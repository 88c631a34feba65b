"""Pruned sweeps against the full grid (issue #32), and compaction's wall time against the run-epochs trained.

    python benchmarks/prune_table.py                      # both tables, 150 epochs (about 15 min on 2 cores)
    python benchmarks/prune_table.py --epochs 30 --part grid

Part "grid": MNIST-1D's default MLP (experiments/mnist1d_mlp.py) with AdamW over an 81-configuration grid,
9 learning rates x 3 weight decays x 3 seeds, for `--epochs` epochs, each run ending with its best epoch's
parameters by validation accuracy (early stopping's tracker, patience past the last epoch: nothing stops early).
Trained whole, with successive halving (eta 3, first rung `--min_epochs`) and with Hyperband (same eta and first
rung), and with Optuna's TPE sampler and its successive-halving pruner when optuna is installed. For each: the
run-epochs trained (and their fraction of the grid's), the wall time, and the test accuracy of the configuration
it ranks first against the best test accuracy any run of the full grid reached.

Part "compaction": 64 runs, half of which stop early (patience 1, min_delta 0.05 on val_loss) and half never
(patience past the last epoch), trained with and without compaction; the compacted sweep's wall time against
the uncompacted one's scaled by the fraction of run-epochs actually trained.
"""

from __future__ import annotations

import argparse
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


def _row(name: str, result, grid_epochs: int, best_test: float, seconds: float) -> dict:
    run_epochs = sum(len(h) for h in result.histories.values())
    chosen = result.results[0]
    return {
        "search": name,
        "run_epochs": run_epochs,
        "fraction": run_epochs / grid_epochs,
        "seconds": seconds,
        "chosen": chosen["run"],
        "test_accuracy": chosen["final_test_accuracy"],
        "gap_points": 100 * (best_test - chosen["final_test_accuracy"]),
    }


def grid_table(epochs: int, min_epochs: int, workdir: pathlib.Path) -> list[dict]:
    tracking = {"early_stopping.enabled": "True", "early_stopping.monitor": "val_accuracy"}
    tracking.update({"early_stopping.patience": str(epochs + 1), "early_stopping.restore_best": "True"})
    config = _config(epochs, tracking)
    grid = grid_lib.expand(config, GRID)
    rows, best_test = [], None
    for name, prune in (
        ("full grid", None),
        (f"successive halving (eta 3, first rung {min_epochs})", prune_lib.PruneSpec("sha", 3, min_epochs)),
        (f"Hyperband (eta 3, first rung {min_epochs})", prune_lib.PruneSpec("hyperband", 3, min_epochs)),
    ):
        start = time.perf_counter()
        result = jaxepochs.sweep(config, grid, workdir / name.split()[0], quiet=True, restart=True, prune=prune)
        seconds = time.perf_counter() - start
        if prune is None:
            best_test = max(r["final_test_accuracy"] for r in result.results)
        rows.append(_row(name, result, len(grid) * epochs, best_test, seconds))
        print(rows[-1], flush=True)
    rows[0]["best_test_accuracy_of_any_run"] = best_test
    return rows


def compaction_table(epochs: int, workdir: pathlib.Path) -> list[dict]:
    config = _config(epochs, {"early_stopping.enabled": "True", "early_stopping.min_delta": "0.05"})
    grid = grid_lib.expand(
        config, {"early_stopping.patience": f"1,{epochs + 1}", "seed": ",".join(map(str, range(32)))}
    )
    out = {}
    for compact in (False, True):
        start = time.perf_counter()
        result = jaxepochs.sweep(config, grid, workdir / f"c{int(compact)}", quiet=True, restart=True, compact=compact)
        out[compact] = (time.perf_counter() - start, result)
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("grid", "both"):
            print(_markdown(grid_table(args.epochs, args.min_epochs, pathlib.Path(tmp))))
        if args.part in ("compaction", "both"):
            print(_markdown(compaction_table(args.epochs, pathlib.Path(tmp))))


if __name__ == "__main__":
    main()
