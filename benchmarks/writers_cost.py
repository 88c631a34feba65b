"""What the writers cost a run: metrics.csv and TensorBoard (on by default) against metrics.jsonl alone.

    python benchmarks/writers_cost.py [--epochs 150] [--rounds 4] [--mlflow]

The default experiment (experiments/mnist1d_mlp.py) trained in this process with logging.csv and
logging.tensorboard off, then on (and, with --mlflow, MLflow into a temporary local store too), in interleaved
rounds. Each variant's wall seconds per epoch (the run's summary: train_seconds / epochs) and its ratio to the
"off" run of the same round; and the host's own work per epoch (summary.json's host_seconds_per_epoch: reading
the rows, writing them, checkpointing), whose difference from "off" is the writers' cost itself: the host does it
while the device runs the next call, so it shows in the wall time only where the cores are short.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile

import jaxepochs
from jaxepochs.host import config as config_lib

EXPERIMENT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "mnist1d_mlp.py"


def _variants(mlflow: bool, store: pathlib.Path) -> dict[str, dict[str, str]]:
    off = {"logging.csv": "False", "logging.tensorboard": "False"}
    out = {"off": off, "csv+tensorboard": {"logging.csv": "True", "logging.tensorboard": "True"}}
    if mlflow:
        out["csv+tensorboard+mlflow"] = {
            **out["csv+tensorboard"],
            "logging.mlflow": "True",
            "logging.mlflow_tracking_uri": store.as_uri(),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--mlflow", action="store_true")
    args = parser.parse_args()
    base = config_lib.load_config_file(EXPERIMENT)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        variants = _variants(args.mlflow, root / "mlruns")
        per_epoch: dict[str, list[float]] = {name: [] for name in variants}
        host: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds + 1):  # round 0 warms the compilation cache and the imports
            for name, overrides in variants.items():
                config = config_lib.apply_overrides(base, {"train.epochs": str(args.epochs), **overrides})
                workdir = root / f"{name}_{round_}"
                summary = jaxepochs.train_and_evaluate(config, workdir, quiet=True, restart=True).summary
                if round_:
                    per_epoch[name].append(summary["train_seconds"] / args.epochs)
                    host[name].append(summary["host_seconds_per_epoch"])
    print(f"MNIST-1D MLP, {args.epochs} epochs, {args.rounds} interleaved rounds: seconds per epoch (train_seconds)")
    for name, values in per_epoch.items():
        ratios = [v / off for v, off in zip(values, per_epoch["off"], strict=True)]
        print(
            f"  {name:24s} median {statistics.median(values) * 1e3:6.2f} ms/epoch;  per round vs off: "
            + " / ".join(f"{r:.3f}" for r in ratios)
        )
    off_host, off_epoch = statistics.median(host["off"]), statistics.median(per_epoch["off"])
    for name, values in host.items():
        extra = statistics.median(values) - off_host
        print(
            f"  {name:24s} host work {statistics.median(values) * 1e3:6.3f} ms/epoch (spread "
            f"{min(values) * 1e3:.3f}-{max(values) * 1e3:.3f}); the writers: {extra * 1e3:+.3f} ms = "
            f"{extra / off_epoch:+.2%} of an epoch"
        )


if __name__ == "__main__":
    main()
