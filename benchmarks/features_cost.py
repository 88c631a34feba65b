"""What each optional feature of an epoch costs when on: the default experiment's whole epoch with it against without.

    python benchmarks/features_cost.py                 # 3 interleaved rounds, about 3 minutes on 2 CPU cores
    python benchmarks/features_cost.py --rounds 5 --epochs 40

Each variant trains the default experiment (experiments/mnist1d_mlp.py: MNIST-1D's MLP, batch 100, validation
every epoch) for --epochs epochs, 10 a call, checkpoints off, in this process, one variant after another and the
rounds interleaved (the machine's noise then falls on every variant alike). An epoch's time is the median of the
rows' `seconds` after the first call (compilation); each variant's best round counts, and the spread over the
rounds is shown. W&B runs offline.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {
    "off": {},
    "logging.norms": {"logging.norms": "True"},
    "logging.norms + layer_norms": {"logging.norms": "True", "logging.layer_norms": "True"},
    "train.ema_decay 0.999": {"train.ema_decay": "0.999"},
    "train.swa_start_epoch 5": {"train.swa_start_epoch": "5"},
    "an evaluation set (the test split again)": {"data.eval_splits": "('again=test',)"},
    "logging.wandb (offline)": {"logging.wandb": "True"},
}


def epoch_seconds(overrides: dict, epochs: int, workdir: pathlib.Path) -> float:
    import jaxepochs

    config = jaxepochs.load_config_file(ROOT / "experiments" / "mnist1d_mlp.py")
    fixed = {"train.epochs": str(epochs), "train.epochs_per_call": "10", "checkpoint.enabled": "False"}
    config = jaxepochs.apply_overrides(config, {**fixed, "logging.curves": "False", **overrides})
    result = jaxepochs.train_and_evaluate(config, workdir, quiet=True, restart=True)
    return statistics.median(row["seconds"] for row in result.history[10:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, overrides) in enumerate(VARIANTS.items()):
                times[name].append(epoch_seconds(overrides, args.epochs, pathlib.Path(tmp) / f"v{i}"))
            print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1] * 1e3:.2f} ms" for n, t in times.items()), flush=True)
    base = min(times["off"])
    print("\n| variant | epoch ms (best) | rounds' spread ms | vs off |\n|---|---|---|---|")
    for name, seconds in times.items():
        spread = f"{min(seconds) * 1e3:.2f}-{max(seconds) * 1e3:.2f}"
        print(f"| {name} | {min(seconds) * 1e3:.2f} | {spread} | {min(seconds) / base:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
