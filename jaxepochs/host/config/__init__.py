"""Experiment configs: the schema of known keys, loading `experiments/NAME.py`, and `--config.a.b=v` overrides.

Every experiment's `get_config()` starts from `base_config()` and changes what it needs. `validate` checks a
config against the schema, so a typo anywhere (a file, an override, the Python API) names the unknown key.

    errors.py      ConfigError, the one error of a config that cannot run
    schema.py      base_config and its sections' builders, with every default; flatten
    validate.py    validate: the keys, their types, and each section's rules (pure: imports no experiment module)
    stopping.py    make_early_stopping, and the early_stopping section's checks against the logged metrics
    overrides.py   apply_overrides (`--config.a.b=v`), from_json (a config.json read back)
    experiment.py  load_config_file, import_experiment: an experiment module imported by path
"""

import pathlib  # noqa: F401  (reached as config_lib.pathlib by callers of the old module)

from jaxepochs.core.task import METRIC_NAMES as TASK_METRICS
from jaxepochs.core.task import TASKS
from jaxepochs.data import MNIST1D_ARGS
from jaxepochs.host.config.errors import ConfigError
from jaxepochs.host.config.experiment import import_experiment, load_config_file
from jaxepochs.host.config.overrides import apply_overrides, from_json
from jaxepochs.host.config.schema import (
    base_config,
    checkpoint_config,
    data_config,
    early_stopping_config,
    experiment_config,
    finetune_config,
    flatten,
    init_config,
    logging_config,
    mesh_config,
    mnist1d_args,
    model_config,
    optimizer_config,
    schedule_config,
    train_config,
)
from jaxepochs.host.config.stopping import make_early_stopping
from jaxepochs.host.config.validate import COMPUTE_DTYPES, OPTIMIZERS, SEED_KEYS, validate
from jaxepochs.models import MODELS

__all__ = [
    "COMPUTE_DTYPES",
    "MNIST1D_ARGS",
    "MODELS",
    "OPTIMIZERS",
    "SEED_KEYS",
    "TASKS",
    "TASK_METRICS",
    "ConfigError",
    "apply_overrides",
    "base_config",
    "checkpoint_config",
    "data_config",
    "early_stopping_config",
    "experiment_config",
    "finetune_config",
    "flatten",
    "from_json",
    "import_experiment",
    "init_config",
    "load_config_file",
    "logging_config",
    "make_early_stopping",
    "mesh_config",
    "mnist1d_args",
    "model_config",
    "optimizer_config",
    "schedule_config",
    "train_config",
    "validate",
]
