"""The user's optax direction through `get_optimizer` against the built-in adam (issue 29): the default MNIST-1D MLP,
one epoch's time at batch 100 and at batch 1, in one process, rounds interleaved, the best of each kept.

    python benchmarks/optax_hook.py [--epochs 4] [--rounds 3]

`optax.scale_by_adam()` from the hook gets the trainer's learning rate (optax_optim.py); the built-in adam is
core/optim.py's, written by hand for speed at batch size 1 and equal rounding batched and unbatched; the two are
the same method but not the same float operations, so their losses part a little (the last train_loss of each is
printed). The ratio hook / built-in is the cost of bringing one's own optax chain.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jaxepochs

HOOK_MODULE = """
import optax

from jaxepochs import base_config


def get_config():
    return base_config()


def get_optimizer(config):
    return optax.scale_by_adam()
"""


def epoch_seconds(config, batch_size: int, epochs: int, workdir: pathlib.Path) -> tuple[float, float]:
    """The fastest epoch after the first (compiling is outside the rows' seconds, but the first call warms up)
    and the last train_loss."""
    overrides = {"train.epochs": str(epochs), "train.batch_size": str(batch_size), "train.epochs_per_call": "1",
                 "checkpoint.enabled": "False", "logging.tensorboard": "False", "logging.csv": "False"}  # fmt: skip
    result = jaxepochs.train_and_evaluate(jaxepochs.apply_overrides(config, overrides), workdir, quiet=True, plot=False)
    return min(row["seconds"] for row in result.history[1:]), result.history[-1]["train_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    (tmp / "hook.py").write_text(HOOK_MODULE)
    hook = jaxepochs.load_config_file(tmp / "hook.py")
    configs = {"built-in adam": jaxepochs.base_config(), "hook scale_by_adam": hook}
    best: dict = {}
    for r in range(args.rounds):
        for batch_size in (100, 1):
            for name, config in configs.items():
                seconds, loss = epoch_seconds(config, batch_size, args.epochs, tmp / f"{name}-{batch_size}-{r}")
                key = (name, batch_size)
                best.setdefault(key, []).append(seconds)
                print(f"round {r + 1} batch {batch_size:3d} {name:18s} {seconds * 1e3:8.1f} ms/epoch  loss {loss:.6f}")
    print("\nbest ms an epoch (spread over rounds), and hook / built-in:")
    for batch_size in (100, 1):
        b, h = (best[(name, batch_size)] for name in configs)
        print(f"batch {batch_size:3d}: built-in {min(b) * 1e3:.1f} ({min(b) * 1e3:.1f}-{max(b) * 1e3:.1f}), hook "
              f"{min(h) * 1e3:.1f} ({min(h) * 1e3:.1f}-{max(h) * 1e3:.1f}), ratio {min(h) / min(b):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
