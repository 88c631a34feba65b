"""Streamed epochs against device-resident ones, the input pipeline alone, and a streamed run's memory.

    python benchmarks/stream_speed.py speed [--epochs 20] [--rounds 3]     # streamed / device-resident epochs
    python benchmarks/stream_speed.py input [--batches 400]                # examples/s: our reader vs tfds loop
    python benchmarks/stream_speed.py rss --num-samples 400000 --mode stream|device   # peak RSS of one run

speed: the MNIST-1D MLP (40-100-100-10, batch 100, Adam), the same config trained with its data on the device and
streamed (data.stream = True), in one process, rounds interleaved (device, stream, device, ...); the median
seconds per epoch of each run's epochs 2.. (epoch 1 compiles), their ratio per round, and the streamed runs'
input_wait_fraction (the share of the epoch the host waited for its next chunk).

input: reading the training split's batches in a shuffled order, host side only: jaxepochs' chunk reader (grain
threads gathering rows of the decoded copy) against a plain loop over `tfds.data_source` indices (decoding each
example, as a reader over TFDS's array_record files does).

rss: one run of an MNIST-1D variant of --num-samples examples (prepared once as its own TFDS config), streamed
with a device budget of --budget-mb, or device-resident; prints the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import numpy as np

import jaxepochs
from jaxepochs.host import config as config_lib


def _config(overrides: dict):
    config = config_lib.load_config_file("experiments/mnist1d_mlp.py")
    return config_lib.apply_overrides(config, {"checkpoint.enabled": "False", **overrides})


def speed(epochs: int, rounds: int) -> None:
    base = {"train.epochs": str(epochs), "early_stopping.enabled": "False"}
    ratios, waits = [], []
    for r in range(rounds):
        per_epoch = {}
        for mode in ("device", "stream"):
            extra = {"data.stream": "True"} if mode == "stream" else {"data.stream": "False"}
            with tempfile.TemporaryDirectory() as workdir:
                result = jaxepochs.train_and_evaluate(_config({**base, **extra}), workdir, quiet=True)
            per_epoch[mode] = statistics.median(row["seconds"] for row in result.history[1:])
            if mode == "stream":
                waits.append(result.summary["input_wait_fraction"])
        ratios.append(per_epoch["device"] / per_epoch["stream"])
        print(
            f"round {r + 1}: device {per_epoch['device'] * 1e3:.2f} ms/epoch, streamed "
            f"{per_epoch['stream'] * 1e3:.2f} ms/epoch: streamed speed {ratios[-1]:.2f}x, input wait "
            f"{waits[-1]:.1%}"
        )
    print(f"streamed / device-resident speed: {min(ratios):.2f}-{max(ratios):.2f}x over {rounds} rounds")


def input_throughput(batches: int) -> None:
    from jaxepochs.data import loading
    from jaxepochs.host import streamed

    config = _config({"data.stream": "True"})
    dataset = loading.load_dataset(config, quiet=True, streamed=True)
    n, batch = loading.count(dataset.train), config.train.batch_size
    order = np.random.default_rng(0).permutation(n)
    steps = min(batches, n // batch)
    idx = order[: steps * batch].reshape(steps, batch)
    mask = np.ones_like(idx, bool)
    start = time.perf_counter()
    per_chunk = streamed.chunk_steps(config.train, config.data, dataset, n // batch)
    for _ in streamed.chunks(dataset.train, idx, mask, per_chunk, "bench"):
        pass
    ours = steps * batch / (time.perf_counter() - start)
    builder = loading._builder(config.data.name, loading.data_dir(config.data), True, config.data)
    source = builder.as_data_source(split="train")
    start = time.perf_counter()
    for b in range(steps):
        examples = source.__getitems__([int(i) for i in idx[b]])
        np.stack([e["x"] for e in examples]), np.asarray([e["label"] for e in examples])
    plain = steps * batch / (time.perf_counter() - start)
    print(f"{steps} batches of {batch}: jaxepochs' chunk reader {ours:,.0f} examples/s (to the device), a plain loop")
    print(f"over tfds.data_source indices {plain:,.0f} examples/s: {ours / plain:.1f}x")


def rss(num_samples: int, mode: str, budget_mb: int, epochs: int) -> None:
    overrides = {"data.args.num_samples": str(num_samples), "train.epochs": str(epochs)}
    if mode == "stream":
        overrides.update({"data.stream": "True", "data.device_memory_bytes": str(budget_mb << 20)})
        overrides["data.device_memory_fraction"] = "1.0"
    else:
        overrides["data.stream"] = "False"
    config = _config(overrides)
    with tempfile.TemporaryDirectory() as workdir:
        result = jaxepochs.train_and_evaluate(config, workdir, quiet=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data_mb = num_samples * 41 * 4 / 1e6
    print(
        f"{mode}: {num_samples} examples ({data_mb:.0f} MB as float32), budget {budget_mb} MiB: peak RSS "
        f"{peak:.0f} MiB, {len(result.history)} epochs, {statistics.median(r['seconds'] for r in result.history):.2f}"
        " s/epoch"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["speed", "input", "rss"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--num-samples", type=int, default=400_000)
    parser.add_argument("--mode", choices=["stream", "device"], default="stream")
    parser.add_argument("--budget-mb", type=int, default=16)
    args = parser.parse_args()
    if args.what == "speed":
        speed(args.epochs, args.rounds)
    elif args.what == "input":
        input_throughput(args.batches)
    else:
        rss(args.num_samples, args.mode, args.budget_mb, min(args.epochs, 2))


if __name__ == "__main__":
    main()
