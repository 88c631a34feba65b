"""jaxepochs: an epoch-centric JAX/Flax trainer; every epoch is one compiled XLA program."""

from jaxepochs.config import ConfigError, apply_overrides, base_config, load_config_file
from jaxepochs.data import DataError
from jaxepochs.early_stopping import EarlyStopping, EarlyStoppingState
from jaxepochs.epoch import Metrics, TrainState, eval_epoch, train_epoch, train_step
from jaxepochs.sweep_grid import SweepError
from jaxepochs.train import NonFiniteLossError, TrainResult, WorkdirError, load, train_and_evaluate


def sweep(config, grid, workdir, **kwargs):
    """Trains every configuration of `grid` in one vmapped program per shape group; see sweep_run.sweep."""
    from jaxepochs import sweep_run

    return sweep_run.sweep(config, grid, workdir, **kwargs)


__all__ = [
    "ConfigError",
    "EarlyStopping",
    "EarlyStoppingState",
    "DataError",
    "Metrics",
    "NonFiniteLossError",
    "SweepError",
    "TrainResult",
    "TrainState",
    "WorkdirError",
    "apply_overrides",
    "base_config",
    "eval_epoch",
    "load",
    "load_config_file",
    "sweep",
    "train_and_evaluate",
    "train_epoch",
    "train_step",
]
