"""jaxepochs: an epoch-centric JAX/Flax trainer; whole epochs run as one compiled XLA program.

Layers, each importing only those listed before it: `core` (the pure run program: epoch, optimizer, early
stopping), `models`, `data`, `host` (config, workdir, checkpoints, the host loop, outputs), `sweep`, `studies`
and `cli`.
"""

import importlib
import os

# The subpackage first (its __init__ imports nothing): importing it later would set `jaxepochs.sweep` to it and
# hide the function `sweep` below; imported now, `jaxepochs.sweep.grid` and the rest land on the subpackage.
import jaxepochs.sweep  # noqa: F401  (the function below takes its name in this namespace)

# XLA:CPU's classic fusion emitters, for this process, unless XLA_FLAGS names the flag already or
# JAXEPOCHS_XLA_DEFAULTS=1. Measured with benchmarks/peers.py on 2 CPU cores (2026-12-03, the product's defaults
# against XLA's): a cold first epoch 1.0-2.0 s sooner (MLP 4.23 -> 2.98 s, CNN 5.49 -> 3.49 s), peak memory
# 115-210 MiB less (MLP 595 -> 406 MiB, CNN 617 -> 407: XLA's newer emitters take that much more to compile) and
# whole epochs as fast or faster at batch 100 (MLP 5940 -> 6398 steps/s, CNN 1279 -> 1420); at batch size 1
# (digits' logistic regression) an epoch is 10-15% slower (2.58 against 2.25 ms, 40 epochs), its first epoch 0.8 s
# sooner. Read when JAX starts its CPU backend, so it is set before anything of JAX runs; it touches no other
# backend. Only for the jaxlib versions it was measured on: XLA stops at a flag it does not know.
_CLASSIC_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _classic_cpu_emitters() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" in flags or os.environ.get("JAXEPOCHS_XLA_DEFAULTS") == "1":
        return
    try:
        from importlib.metadata import version

        major, minor = (int(part) for part in version("jaxlib").split(".")[:2])
    except Exception:  # no jaxlib, or a version it cannot read: XLA's defaults
        return
    if (major, minor) <= (0, 10):
        os.environ["XLA_FLAGS"] = f"{flags} {_CLASSIC_EMITTERS}".strip()


_classic_cpu_emitters()


# The public names and the modules that hold them, imported on first use (PEP 562): `import jaxepochs` and the
# `jaxepochs` command start without JAX, so the command can check its arguments, and take a Ctrl-C, at once.
_HOMES = {
    "jaxepochs.core.early_stopping": ("EarlyStopping", "EarlyStoppingState"),
    "jaxepochs.core.epoch": ("Metrics", "TrainState", "eval_epoch", "train_epoch", "train_step"),
    "jaxepochs.data.loading": ("DataError",),
    "jaxepochs.host.callbacks": ("CallbackError",),
    "jaxepochs.host.config": ("ConfigError", "apply_overrides", "base_config", "load_config_file"),
    "jaxepochs.host.export": ("ExportError", "export_model"),
    "jaxepochs.host.inference": ("InputError", "SavedModel", "load_model"),
    "jaxepochs.host.run": ("NonFiniteLossError", "TrainResult", "train_and_evaluate"),
    "jaxepochs.host.saved_run": ("load",),
    "jaxepochs.host.workdir": ("WorkdirError",),
    "jaxepochs.sweep.grid": ("SweepError",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module 'jaxepochs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_OF[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME_OF})


def sweep(config, grid, workdir, **kwargs):
    """Trains every configuration of `grid` in one vmapped program per shape group; see jaxepochs.sweep.run."""
    from jaxepochs.sweep import run

    return run.sweep(config, grid, workdir, **kwargs)


__all__ = [
    "CallbackError",
    "ConfigError",
    "DataError",
    "EarlyStopping",
    "EarlyStoppingState",
    "ExportError",
    "InputError",
    "Metrics",
    "NonFiniteLossError",
    "SavedModel",
    "SweepError",
    "TrainResult",
    "TrainState",
    "WorkdirError",
    "apply_overrides",
    "base_config",
    "eval_epoch",
    "export_model",
    "load",
    "load_config_file",
    "load_model",
    "sweep",
    "train_and_evaluate",
    "train_epoch",
    "train_step",
]
