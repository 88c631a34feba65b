"""Sweeps against the same runs one after another, in one process.

    python benchmarks/sweep_speed.py [--runs 1,8,32,128] [--epochs 20]     # also run by `make bench`

The MNIST-1D MLP (40-100-100-10, batch 100, Adam), R runs differing in seed and learning rate:
  - sweep: `jaxepochs.sweep`, one vmapped program for all R runs (compile included, then steady state);
  - sequential: `jaxepochs.train_and_evaluate` once per run, as `jaxepochs run` would: the first run (compile
    included; the median of --repeats cold tries) + (R - 1) x the mean of three more (their programs found in
    the compilation cache). Sweeps of up to 8 runs are timed --repeats times too (the median counts).
Each contender (the sequential runs, each sweep) starts from an empty compilation cache of its own, so no
program compiled before it is timed (a 1-run sweep trains as a run: it would find the runs' programs).
Prints wall seconds, compile seconds and runs per second for both, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax

import jaxepochs
from jaxepochs.host import config as config_lib
from jaxepochs.sweep import grid as sweep_grid


def fresh_cache(directory: str) -> None:
    """Points JAX's persistent compilation cache at an empty `directory` (dropping the one in use)."""
    from jax._src import compilation_cache

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    compilation_cache.reset_cache()


def _timed_run(base, i: int, workdir: str) -> float:
    """Seconds of one `train_and_evaluate` at seed i and its own learning rate, as a grid point would have."""
    config = jaxepochs.apply_overrides(base, {"seed": str(i), "optimizer.learning_rate": f"{1e-3 * 10 ** (i / 3):.4g}"})
    start = time.perf_counter()
    jaxepochs.train_and_evaluate(config, workdir, quiet=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="1,8,32,128")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="tries of each cold start (the median counts)")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {len(jax.devices())} device(s); {args.epochs} epochs/run")
    with tempfile.TemporaryDirectory() as tmp:
        base = config_lib.apply_overrides(
            config_lib.load_config_file("experiments/mnist1d_mlp.py"),
            {
                "train.epochs": str(args.epochs),
                "checkpoint.every_seconds": "1e9",
                # A compilation cache of this process alone: no program is compiled before it is timed.
                "train.compilation_cache_dir": f"{tmp}/xla",
            },
        )
        # Untimed warm-up of what a process pays once whichever comes first (reading the dataset, imports such as
        # matplotlib's, jax's eager helpers), so that neither contender is charged for it. Another batch size and
        # width: other programs, so that neither contender finds one of its own already compiled.
        warm = jaxepochs.apply_overrides(
            base,
            {
                "train.epochs": "1",
                "train.epochs_per_call": "1",
                "train.batch_size": "50",
                "model.hidden_sizes": "60,60",
            },
        )
        jaxepochs.train_and_evaluate(warm, f"{tmp}/warm_run", quiet=True)
        jaxepochs.sweep(warm, sweep_grid.expand(warm, {"seed": "0,1"}), f"{tmp}/warm_sweep", quiet=True)
        # Sequential: R runs one after another pay one compile (the first run), then find their programs in the
        # cache, as `jaxepochs run`s do with the cache on; each with its own seed and learning rate, as the grid.
        # The cold first run is timed `--repeats` times, each from an empty cache (the median counts): a cold start
        # varies by 10-20% between tries on a 2-core machine, and a 1-run sweep is nearly all cold start.
        cold = []
        for k in range(args.repeats):
            fresh_cache(f"{tmp}/xla_sequential{k}")
            cold.append(_timed_run(base, k, f"{tmp}/seq_cold{k}"))
        first_s = statistics.median(cold)
        next_s = statistics.mean(_timed_run(base, i, f"{tmp}/seq{i}") for i in range(1, 4))
        print(
            f"sequential `jaxepochs run`: the first {first_s:.2f} s (compile included; median of "
            f"{', '.join(f'{c:.2f}' for c in cold)}), each next {next_s:.2f} s"
        )
        print("| runs | sweep s | sweep compile s | sweep runs/s | sequential s | sequential runs/s | sweep speed-up |")
        print("|---|---|---|---|---|---|---|")
        for n in (int(r) for r in args.runs.split(",")):
            rates = ",".join(f"{1e-3 * 10 ** (i / max(n - 1, 1)):.4g}" for i in range(n))
            grid = [
                dict(g, seed=str(i)) for i, g in enumerate(sweep_grid.expand(base, {"optimizer.learning_rate": rates}))
            ]
            tries = []
            for k in range(args.repeats if n <= 8 else 1):  # the short sweeps, as cold as the first run: repeated
                fresh_cache(f"{tmp}/xla_sweep{n}_{k}")
                start = time.perf_counter()
                result = jaxepochs.sweep(base, grid, f"{tmp}/sweep{n}_{k}", quiet=True)
                tries.append((time.perf_counter() - start, result.compile_seconds))
            sweep_s, compile_s = sorted(tries)[len(tries) // 2]
            sequential_s = first_s + (n - 1) * next_s
            print(
                f"| {n} | {sweep_s:.1f} | {compile_s:.1f} | {n / sweep_s:.2f} | {sequential_s:.1f} | "
                f"{n / sequential_s:.2f} | {sequential_s / sweep_s:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
