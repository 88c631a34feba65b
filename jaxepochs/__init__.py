"""jaxepochs: an epoch-centric JAX/Flax trainer; whole epochs run as one compiled XLA program.

Layers, each importing only those listed before it: `core` (the pure run program: epoch, optimizer, early
stopping), `models`, `data`, `host` (config, workdir, checkpoints, the host loop, outputs), `sweep`, `studies`
and `cli`.
"""

import importlib

# The subpackage first (its __init__ imports nothing): importing it later would set `jaxepochs.sweep` to it and
# hide the function `sweep` below; imported now, `jaxepochs.sweep.grid` and the rest land on the subpackage.
import jaxepochs.sweep  # noqa: F401  (the function below takes its name in this namespace)

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
