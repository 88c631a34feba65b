"""Sweeps against the same runs one after another, in one process.

    python benchmarks/sweep_speed.py [--runs 1,8,32,128] [--epochs 20]     # also run by `make bench`

The MNIST-1D MLP (40-100-100-10, batch 100, Adam), R runs differing in seed and learning rate:
  - sweep: `jaxepochs.sweep`, one vmapped program for all R runs (compile included, then steady state);
  - sequential: `jaxepochs.train_and_evaluate` once per run, as `jaxepochs run` would (compile included), timed
    for min(R, 4) runs and scaled to R.
Prints wall seconds, compile seconds and runs per second for both, and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax

import jaxepochs
from jaxepochs import config as config_lib
from jaxepochs import sweep_grid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="1,8,32,128")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    base = config_lib.apply_overrides(
        config_lib.load_config_file("experiments/mnist1d_mlp.py"),
        {
            "train.epochs": str(args.epochs),
            "train.epochs_per_call": str(args.epochs),
            "checkpoint.every_seconds": "1e9",
        },
    )
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {len(jax.devices())} device(s); {args.epochs} epochs/run")
    print("| runs | sweep s | sweep compile s | sweep runs/s | sequential s | sequential runs/s | sweep speed-up |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        # Untimed warm-up of what a process pays once whichever comes first (reading the dataset, imports such as
        # matplotlib's, jax's eager helpers), so that neither contender is charged for it.
        warm = jaxepochs.apply_overrides(base, {"train.epochs": "1", "train.epochs_per_call": "1"})
        jaxepochs.train_and_evaluate(warm, f"{tmp}/warm_run", quiet=True)
        jaxepochs.sweep(warm, sweep_grid.expand(warm, {"seed": "0"}), f"{tmp}/warm_sweep", quiet=True)
        for n in (int(r) for r in args.runs.split(",")):
            rates = ",".join(f"{1e-3 * 10 ** (i / max(n - 1, 1)):.4g}" for i in range(n))
            grid = [
                dict(g, seed=str(i)) for i, g in enumerate(sweep_grid.expand(base, {"optimizer.learning_rate": rates}))
            ]
            start = time.perf_counter()
            result = jaxepochs.sweep(base, grid, f"{tmp}/sweep{n}", quiet=True)
            sweep_s = time.perf_counter() - start
            timed = min(n, 4)
            start = time.perf_counter()
            for i in range(timed):
                config = jaxepochs.apply_overrides(base, {**grid[i], "train.epochs_per_call": "1"})
                jaxepochs.train_and_evaluate(config, f"{tmp}/seq{n}_{i}", quiet=True)
            sequential_s = (time.perf_counter() - start) * n / timed
            print(
                f"| {n} | {sweep_s:.1f} | {result.compile_seconds:.1f} | {n / sweep_s:.2f} | {sequential_s:.1f} | "
                f"{n / sequential_s:.2f} | {sequential_s / sweep_s:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
