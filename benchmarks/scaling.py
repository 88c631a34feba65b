"""One run on more devices: data parallelism's speed, its communication, bfloat16 and gradient accumulation.

    python benchmarks/scaling.py speed [--epochs 12] [--rounds 3] [--batch 200]
    python benchmarks/scaling.py comm [--batch 200]
    python benchmarks/scaling.py processes [--epochs 12] [--batch 200]

speed: the MNIST-1D MLP (40-100-100-10, Adam) at --batch, the same config trained in one process on 1 device
(mesh.data = 1) and split over 2 (mesh.data = 2), in float32 and bfloat16, and with 4 micro-batches a step; rounds
interleaved; the median seconds per epoch of epochs 2.. (epoch 1 compiles) and each variant's ratio to the
1-device float32 run per round. On CPU the "devices" are XLA's host devices
(--xla_force_host_platform_device_count, set here): they share the machine's cores, so a 2-device run cannot
be faster than the cores allow; the figure measures what the split costs (the all-reduce of every step, the
partitioned program), not a second chip's worth of compute.

comm: one data-parallel training step compiled for 2 devices; the bytes its all-reduces move per device (from
the compiled HLO) against the parameters' bytes: plain data parallelism sums the gradient (one parameter-sized
all-reduce) and the metric sums (a few floats). Then a wider MLP with and without mesh.shard_params (FSDP): its
collectives and the bytes of state each device holds for the step.

processes: the MLP trained by two processes joined by jax.distributed over loopback (gloo's TCP collectives on
CPU), one device each, against one process: what a step's all-reduce costs when it crosses processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxepochs  # noqa: E402
from jaxepochs.core import epoch as epoch_lib  # noqa: E402
from jaxepochs.core import layout as layout_lib  # noqa: E402
from jaxepochs.host import config as config_lib  # noqa: E402
from jaxepochs.host import hooks as hooks_lib  # noqa: E402
from jaxepochs.host import setup  # noqa: E402

VARIANTS = {
    "1 device f32": {"mesh.data": "1"},
    "2 devices f32": {"mesh.data": "2"},
    "1 device bf16": {"mesh.data": "1", "train.compute_dtype": "bfloat16"},
    "2 devices bf16": {"mesh.data": "2", "train.compute_dtype": "bfloat16"},
    "1 device f32, 4 micro-batches": {"mesh.data": "1", "train.accumulate_steps": "4"},
}


def _config(overrides: dict):
    config = config_lib.load_config_file("experiments/mnist1d_mlp.py")
    return config_lib.apply_overrides(config, {"checkpoint.enabled": "False", **overrides})


def speed(epochs: int, rounds: int, batch: int) -> None:
    base = {"train.epochs": str(epochs), "early_stopping.enabled": "False", "train.batch_size": str(batch)}
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    accuracy: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, overrides in VARIANTS.items():
            with tempfile.TemporaryDirectory() as workdir:
                result = jaxepochs.train_and_evaluate(_config({**base, **overrides}), workdir, quiet=True)
            seconds[name].append(statistics.median(row["seconds"] for row in result.history[1:]))
            accuracy[name].append(result.summary["test_accuracy"])
    reference = seconds["1 device f32"]
    steps = result.summary["steps_per_epoch"]
    print(f"{jax.device_count()} devices ({jax.devices()[0].platform}), batch {batch}, {steps} steps an epoch")
    print(f"{'variant':32} {'ms/epoch':>9} {'steps/s':>8} {'vs 1 device f32 (per round)':>30} {'test acc':>9}")
    for name in VARIANTS:
        ratios = [ref / s for ref, s in zip(reference, seconds[name], strict=True)]
        median = statistics.median(seconds[name])
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"{name:32} {median * 1e3:9.1f} {steps / median:8.0f} {shown:>30} {np.mean(accuracy[name]):9.4f}")


def all_reduce_bytes(hlo_text: str) -> int:
    """The bytes every all-reduce in a compiled program's HLO text sums, per execution of each (a loop body's
    collectives count once): what a data-parallel step sends, at most, per device and step."""
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s64": 8, "s8": 1, "u8": 1}
    total = 0
    for line in hlo_text.splitlines():
        if " all-reduce(" not in line and " all-reduce-start(" not in line:
            continue
        head = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", head):
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            total += sizes.get(dtype, 4) * count
    return total


def comm(batch: int) -> None:
    for hidden, shard in (("(100, 100)", False), ("(1024, 1024)", False), ("(1024, 1024)", True)):
        config = _config({"train.batch_size": str(batch), "model.hidden_sizes": hidden})
        hooks = hooks_lib.load_hooks(config)
        dataset = setup.load_data(config, hooks, True)
        pieces = setup.make_pieces(config, dataset, hooks, 1, True)
        layout = layout_lib.Layout(layout_lib.make_mesh(jax.devices(), 1, 2), shard_params=shard)
        state = setup.init_carries(pieces, [config], [pieces.tx.defaults], dataset.train.x[:1])
        state = setup.without_run_axis(state).state
        where = jax.tree.map(lambda a, layout=layout: layout.sharding(a.shape), state)
        batch_arrays = {"x": dataset.train.x[:batch], "y": dataset.train.y[:batch]}
        step = functools.partial(epoch_lib.train_step, task=pieces.task, tx=pieces.tx, layout=layout)
        rows = NamedSharding(layout.mesh, P("data"))
        jitted = jax.jit(step, in_shardings=(where, rows), out_shardings=(where, layout.replicated()))
        compiled = jitted.lower(state, batch_arrays).compile()
        text = compiled.as_text()
        counts = {kind: len(re.findall(rf" {kind}(-start)?\(", text)) for kind in ("all-reduce", "all-gather")}
        params = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(state.params))
        held = compiled.memory_analysis().argument_size_in_bytes
        print(
            f"MLP 40-{hidden[1:-1].replace(', ', '-')}-10, batch {batch} over 2 devices, shard_params {shard}: "
            f"parameters {params / 1e6:.3f} MB; all-reduce {all_reduce_bytes(text) / 1e6:.3f} MB a step "
            f"per device; collectives {counts}; the step's state and batch per device {held / 1e6:.2f} MB"
        )


def processes(epochs: int, batch: int) -> None:
    """Two processes over loopback (gloo), one CPU device each, against one process with one device."""
    import json
    import pathlib
    import socket
    import subprocess
    import sys

    overrides = [f"--config.train.epochs={epochs}", f"--config.train.batch_size={batch}"]
    overrides += ["--config.checkpoint.enabled=False", "--config.early_stopping.enabled=False", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base = [sys.executable, "-m", "jaxepochs.cli", "run", "--config", "experiments/mnist1d_mlp.py", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        joined = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2"]
        two = pathlib.Path(tmp) / "two"
        children = [
            subprocess.Popen([*base, "--workdir", str(two), *joined, "--process_id", str(p)], env=env) for p in (0, 1)
        ]
        assert [child.wait() for child in children] == [0, 0]
        one = pathlib.Path(tmp) / "one"
        subprocess.run([*base, "--workdir", str(one)], env=env, check=True)
        for name, workdir in (("1 process, 1 device", one), ("2 processes, 1 device each", two)):
            rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
            summary = json.loads((workdir / "summary.json").read_text())
            median = statistics.median(row["seconds"] for row in rows[1:])
            print(f"{name:28} {median * 1e3:8.1f} ms/epoch  test_accuracy {summary['test_accuracy']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "comm", "processes"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    if args.what == "speed":
        speed(args.epochs, args.rounds, args.batch)
    elif args.what == "processes":
        processes(args.epochs, args.batch)
    else:
        comm(args.batch)


if __name__ == "__main__":
    main()
