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
    es_config: ml_collections.ConfigDict, has_validation: bool = True, metric_names=("loss", "accuracy"), evals=()
):
    """The EarlyStopping of an `early_stopping` section; ConfigError naming the key and the valid choices. The
    monitor is one of the logged metrics: train_<name>, (with a validation split) val_<name>, or <set>_<name> of a
    further evaluation set (`evals`, their names)."""
    splits = (*(("train", "val") if has_validation else ("train",)), *evals)
    available = tuple(f"{split}_{name}" for split in splits for name in metric_names)
    fields = {key: value for key, value in es_config.items() if key != "enabled"}
    try:
        return early_stopping_lib.EarlyStopping(**fields, known_monitors=available)
    except ValueError as e:
        raise ConfigError(f"config.early_stopping: {e}") from None


def check(section: ml_collections.ConfigDict, has_validation: bool, metric_names: tuple[str, ...] | None) -> None:
    """ConfigError for an enabled `early_stopping` section that cannot run on a run logging `metric_names`
    (None: not known yet, nothing is checked)."""
    if section.enabled and metric_names:
        make_early_stopping(section, has_validation, metric_names)


def known_names(task: str, module: str, monitor: str, has_validation: bool):
    """The metrics' names early stopping can be checked against without importing the experiment module: the
    task's; with a module (whose metrics_fn may log others), "loss" alone where the monitor is a loss every run
    logs (the section's other rules do not depend on the names), else None (checked once the module is loaded)."""
    if monitor.split("_", 1)[0] not in ("train", "val"):
        return None  # a further evaluation set's (get_data's or data.eval_splits'): checked once the data is read
    if not module:
        return METRIC_NAMES[task]
    logged = ("train_loss", "val_loss") if has_validation else ("train_loss",)
    return ("loss",) if monitor in logged else None


def check_strips(e: ml_collections.ConfigDict, n: int, eval_every=()) -> None:
    """Prechelt's pq and up measure at strip ends, every k epochs after start_from_epoch: on a validation metric
    (or an evaluation set's) those must be epochs that evaluate it (a strip end without a value is not measured);
    n is train.validate_every, `eval_every` train.eval_every's "name=N" entries."""
    split = e.monitor.split("_", 1)[0]
    if split not in ("train", "val"):  # an evaluation set's: its own cadence, else validation's
        n = {k.strip(): int(v) for k, _, v in (str(x).partition("=") for x in eval_every)}.get(split, n)
    if not (e.enabled and e.rule in ("pq", "up") and split != "train" and n > 1):
        return
    if e.k % n or e.start_from_epoch % n:
        cadence = f"train.validate_every = {n}" if split == "val" else f"the set {split}'s cadence ({n} epochs)"
        fail(
            "early_stopping.k",
            f"{e.k} (start_from_epoch {e.start_from_epoch}) ends strips on epochs that {cadence} does not "
            f'evaluate (rule "{e.rule}" measures {e.monitor} at strip ends)',
            f"Use k and start_from_epoch multiples of {n}, or evaluate {e.monitor} every epoch.",
        )
