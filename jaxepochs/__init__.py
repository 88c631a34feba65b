"""jaxepochs: an epoch-centric JAX/Flax trainer; every epoch is one compiled XLA program."""

from jaxepochs.config import ConfigError, base_config, load_config_file
from jaxepochs.data import DataError
from jaxepochs.epoch import Metrics, TrainState, eval_epoch, train_epoch, train_step
from jaxepochs.train import NonFiniteLossError, TrainResult, WorkdirError, train_and_evaluate

__all__ = [
    "ConfigError",
    "DataError",
    "Metrics",
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "WorkdirError",
    "base_config",
    "eval_epoch",
    "load_config_file",
    "train_and_evaluate",
    "train_epoch",
    "train_step",
]
