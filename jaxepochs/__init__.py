"""jaxepochs: an epoch-centric JAX/Flax trainer; every epoch is one compiled XLA program."""

from jaxepochs.config import ConfigError, apply_overrides, base_config, load_config_file
from jaxepochs.data import DataError
from jaxepochs.early_stopping import EarlyStopping, EarlyStoppingState
from jaxepochs.epoch import Metrics, TrainState, eval_epoch, train_epoch, train_step
from jaxepochs.train import NonFiniteLossError, TrainResult, WorkdirError, load, train_and_evaluate

__all__ = [
    "ConfigError",
    "EarlyStopping",
    "EarlyStoppingState",
    "DataError",
    "Metrics",
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "WorkdirError",
    "apply_overrides",
    "base_config",
    "eval_epoch",
    "load",
    "load_config_file",
    "train_and_evaluate",
    "train_epoch",
    "train_step",
]
