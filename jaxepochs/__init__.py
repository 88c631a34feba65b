"""jaxepochs: an epoch-centric JAX/Flax trainer; whole epochs run as one compiled XLA program.

Layers, each importing only those listed before it: `core` (the pure run program: epoch, optimizer, early
stopping), `models`, `data`, `host` (config, workdir, checkpoints, the host loop, outputs), `sweep`, `studies`
and `cli`.
"""

from jaxepochs.core.early_stopping import EarlyStopping, EarlyStoppingState
from jaxepochs.core.epoch import Metrics, TrainState, eval_epoch, train_epoch, train_step
from jaxepochs.data.loading import DataError
from jaxepochs.host.config import ConfigError, apply_overrides, base_config, load_config_file
from jaxepochs.host.export import ExportError, export_model
from jaxepochs.host.inference import InputError, SavedModel, load_model
from jaxepochs.host.run import NonFiniteLossError, TrainResult, train_and_evaluate
from jaxepochs.host.saved_run import load
from jaxepochs.host.workdir import WorkdirError
from jaxepochs.sweep.grid import SweepError


def sweep(config, grid, workdir, **kwargs):
    """Trains every configuration of `grid` in one vmapped program per shape group; see jaxepochs.sweep.run."""
    from jaxepochs.sweep import run

    return run.sweep(config, grid, workdir, **kwargs)


__all__ = [
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
