"""The `early_stopping` section made into the core's EarlyStopping, and checked against the metrics a run logs.

The metrics' names are "loss" and the task's (core/task.py), or those of an experiment module's metrics_fn,
known once the module is loaded (hooks.load_hooks) and its metrics traced (setup.make_tracker). Validating a
config imports no module: it checks what the config alone decides.
"""

from __future__ import annotations

import ml_collections

from jaxepochs.core import early_stopping as early_stopping_lib
from jaxepochs.core.task import METRIC_NAMES
from jaxepochs.host.config.errors import ConfigError, fail


def make_early_stopping(
    es_config: ml_collections.ConfigDict, has_validation: bool = True, metric_names=("loss", "accuracy")
):
    """The EarlyStopping of an `early_stopping` section; ConfigError naming the key and the valid choices. The
    monitor is one of the logged metrics: train_<name> or (with a validation split) val_<name>."""
    splits = ("train", "val") if has_validation else ("train",)
    available = tuple(f"{split}_{name}" for split in splits for name in metric_names)
    fields = {key: value for key, value in es_config.items() if key != "enabled"}
    try:
        return early_stopping_lib.EarlyStopping(**fields, known_monitors=available)
    except ValueError as e:
        raise ConfigError(f"config.early_stopping: {e}") from None


def check(config: ml_collections.ConfigDict, metric_names: tuple[str, ...] | None) -> None:
    """ConfigError for an enabled early_stopping section that cannot run on a run logging `metric_names`
    (None: not known yet, nothing is checked)."""
    if config.early_stopping.enabled and metric_names:
        make_early_stopping(config.early_stopping, config.data.validation_fraction > 0, metric_names)


def names_known_from_the_config(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """The metrics' names a config's early stopping can be checked against without its experiment module: the
    task's; with a module (whose metrics_fn may log others), "loss" alone where the monitor is a loss every run
    logs (the section's other rules do not depend on the names), else None."""
    if not config.experiment.module:
        return METRIC_NAMES[config.task]
    logged = ("train_loss", "val_loss") if config.data.validation_fraction > 0 else ("train_loss",)
    return ("loss",) if config.early_stopping.monitor in logged else None


def check_strips(config: ml_collections.ConfigDict) -> None:
    """Prechelt's pq and up measure at strip ends, every k epochs after start_from_epoch: on a validation metric
    those must be epochs that validate (a strip end without a value is not measured)."""
    e, n = config.early_stopping, config.train.validate_every
    if not (e.enabled and e.rule in ("pq", "up") and e.monitor.startswith("val_") and n > 1):
        return
    if e.k % n or e.start_from_epoch % n:
        fail(
            "early_stopping.k",
            f"{e.k} (start_from_epoch {e.start_from_epoch}) ends strips on epochs that train.validate_every = {n} "
            f'does not validate (rule "{e.rule}" measures {e.monitor} at strip ends)',
            f"Use k and start_from_epoch multiples of {n}, or train.validate_every = 1.",
        )
