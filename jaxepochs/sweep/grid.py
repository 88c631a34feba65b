"""Sweeps in one compiled program: `jax.vmap` over runs that differ only in traced values.

    jaxepochs sweep --config experiments/mnist1d_mlp.py --workdir runs/sweep \
        --sweep.optimizer.learning_rate=1e-3,3e-3,1e-2 --sweep.seed=0,1,2,3
    jaxepochs sweep ... --random 16 --sweep.optimizer.learning_rate=loguniform:1e-4:1e-1
    jaxepochs sweep ... --cv 5 [--refit]

Values that live in arrays (`TRACED`: the seed, the optimizer's rates, early stopping's numbers) are a leading
run axis of the carry of the run program (core/program.py), vmapped, so one program trains every run of a
group; runs that differ in anything else (batch size, widths, dataset, schedule shape) form separate groups,
one program each. A run that stops early (or diverges) is frozen inside the program while the others go on.
With several devices the run axis is split over them. Cross-validation (`--cv K`) trains each
configuration on K folds of the training split as K more runs of the same program.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from jaxepochs.data.loading import fold_indices  # noqa: F401  (the sweep's name for it)
from jaxepochs.host import config as config_lib

# Keys whose values are arrays in the carry (or the early-stopping hyperparameters): vmapped, not recompiled.
TRACED = (
    "seed",
    "optimizer.learning_rate",
    "optimizer.weight_decay",
    "optimizer.momentum",
    "optimizer.b1",
    "optimizer.b2",
    "train.ema_decay",  # (0 is not traced: no average kept, a program of its own)
    "early_stopping.min_delta",
    "early_stopping.patience",
    "early_stopping.baseline",
    "early_stopping.start_from_epoch",
    "early_stopping.alpha",
    "early_stopping.strips",
    "early_stopping.divergence_threshold",
    # Fine-tuning's group values: arrays in each run's optimizer state (host/finetune.py), so "when should each
    # layer unfreeze" is one program; whether fine-tuning is on at all is not traced (program_key).
    "finetune.freeze",
    "finetune.unfreeze_epochs",
    "finetune.rate_scales",
    "optimizer.layer_decay",
)
DISTRIBUTIONS = ("loguniform", "uniform", "randint")
USED_BY = {  # optimizer hyperparameters that only some optimizers have
    "optimizer.weight_decay": ("adamw", "lion", "lamb", "nadamw"),
    "optimizer.momentum": ("sgd", "rmsprop", "sgd_nesterov"),
    "optimizer.b1": ("adam", "adamw", "lion", "lamb", "nadam", "nadamw", "adabelief"),
    "optimizer.b2": ("adam", "adamw", "lion", "lamb", "nadam", "nadamw", "adabelief", "rmsprop"),
}


class SweepError(ValueError):
    """A sweep specification that cannot run; raised before anything compiles."""


class Run(NamedTuple):
    name: str  # "r003", or "r003_fold1" under cross-validation
    values: dict[str, str]  # the swept keys' values, as override text
    config: object  # the validated ConfigDict
    fold: int  # -1 without cross-validation


def split_values(text: str) -> list[str]:
    """ "1e-3,3e-3" -> ["1e-3", "3e-3"]; commas inside brackets stay: "(16,16),(32,32)" -> 2 values."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def _draw(key: str, spec: str, rng: np.random.Generator) -> str:
    kind, _, bounds = spec.partition(":")
    low_text, _, high_text = bounds.partition(":")
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        raise SweepError(f'--sweep.{key}={spec}: write a range as "{kind}:LOW:HIGH" with numbers.') from None
    if not low < high:
        raise SweepError(f"--sweep.{key}={spec}: the range needs LOW < HIGH.")
    if kind == "loguniform":
        if low <= 0:
            raise SweepError(f"--sweep.{key}={spec}: loguniform needs LOW > 0.")
        return repr(float(math.exp(rng.uniform(math.log(low), math.log(high)))))
    if kind == "uniform":
        return repr(float(rng.uniform(low, high)))
    return str(int(rng.integers(int(low), int(high) + 1)))  # randint: both ends included


def expand(base, specs: dict[str, str], random: int = 0, random_seed: int = 0) -> list[dict[str, str]]:
    """The runs of `specs` ({"optimizer.learning_rate": "1e-3,1e-2", ...}): the grid (product of the lists),
    or with `random` N, N draws (ranges "loguniform:a:b", "uniform:a:b", "randint:a:b"; lists: a choice).
    Every value is checked against the config now: unknown keys, wrong types and empty lists raise SweepError."""
    if not specs:
        raise SweepError("Nothing to sweep: give at least one --sweep.KEY=V1,V2,... (or a range with --random N).")
    if random < 0:
        raise SweepError(f"--random {random}: give the number of configurations to draw (1 or more).")
    rng = np.random.default_rng(random_seed)
    lists = {}
    for key, text in specs.items():
        is_range = text.split(":", 1)[0] in DISTRIBUTIONS
        if is_range and not random:
            raise SweepError(f"--sweep.{key}={text} is a range; draw from it with --random N, or list the values.")
        values = [text] if is_range else split_values(text)
        if any(v == "" for v in values):
            raise SweepError(f"--sweep.{key}={text}: an empty value; list values separated by commas.")
        lists[key] = values
    if random:
        runs = []
        for _ in range(random):
            run = {}
            for key, values in lists.items():
                is_range = values[0].split(":", 1)[0] in DISTRIBUTIONS
                run[key] = _draw(key, values[0], rng) if is_range else values[int(rng.integers(len(values)))]
            runs.append(run)
    else:
        runs = [dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())]
    for run in runs:  # every value must parse into its key's type: before anything compiles
        try:
            config = config_lib.apply_overrides(base, run)
        except config_lib.ConfigError as e:
            raise SweepError(str(e).replace("--config.", "--sweep.")) from None
        for key, optimizers in USED_BY.items():
            if key in run and config.optimizer.name not in optimizers:
                raise SweepError(
                    f"--sweep.{key}: optimizer {config.optimizer.name} has no {key.split('.')[1]} (it applies to "
                    f"{' and '.join(optimizers)}); sweep optimizer.name too, or drop this key."
                )
    return runs


BUILT_IN = ("adam", "adamw", "sgd")  # their betas and momentum are arrays; an optax optimizer's are settings


def program_key(flat: dict, static_hparams=()) -> str:
    """Everything of a run's flattened config but the traced values: runs with equal keys share one compiled
    program. (Momentum 0 is not traced: sgd without momentum keeps no trace, a program of its own.) The numbers
    of config.hparams are traced, but for `static_hparams` (those get_model or get_data read: they may change
    shapes)."""
    # reduce_on_plateau's floor is a fraction of the learning rate in its (static) settings: with a floor, the
    # learning rate is not traced either.
    floored = flat["optimizer.schedule.name"] == "reduce_on_plateau" and flat["optimizer.schedule.min_learning_rate"]
    settings = () if flat["optimizer.name"] in BUILT_IN else ("optimizer.b1", "optimizer.b2", "optimizer.momentum")
    traced = [k for k in TRACED if not (floored and k == "optimizer.learning_rate") and k not in settings]
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    traced += [k for k, v in flat.items() if k.startswith("hparams.") and number(v) and k[8:] not in static_hparams]
    static = sorted((k, repr(v)) for k, v in flat.items() if k not in traced)
    tuning = ("finetune.freeze", "finetune.unfreeze_epochs", "finetune.rate_scales")
    tuned = ("fine-tuning's groups", any(flat[k] for k in tuning) or flat["optimizer.layer_decay"] != 1.0)
    zeros = [("optimizer.momentum is 0", flat["optimizer.momentum"] == 0), ("no average", flat["train.ema_decay"] == 0)]
    return repr([*static, *zeros, tuned])


def make_runs(base, grid: list[dict[str, str]], cv: int = 0) -> list[Run]:
    runs = []
    width = len(str(len(grid) - 1))
    for i, values in enumerate(grid):
        config = config_lib.apply_overrides(base, values)
        name = f"r{i:0{width}d}"
        if cv:
            runs += [Run(f"{name}_fold{k}", values, config, k) for k in range(cv)]
        else:
            runs.append(Run(name, values, config, -1))
    return runs


def group_runs(runs: list[Run], static_hparams=()) -> list[list[Run]]:
    """Runs grouped by program (same shapes and static settings), in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    keys: dict[int, str] = {}  # by config: a configuration's K folds share one (K may be large before it is checked)
    for run in runs:
        if id(run.config) not in keys:
            keys[id(run.config)] = program_key(config_lib.flatten(run.config), static_hparams)
        groups.setdefault(keys[id(run.config)], []).append(run)
    return list(groups.values())


def hparams_read_by_builders(settings: dict, hooks) -> set[str]:
    """The keys of config.hparams that the module's get_model or get_data read (called once, on a copy of the
    config, `settings` as a dict, that notes the keys read): a value there may change shapes, so runs that
    differ in it are separate programs. Nothing is read where the module has neither hook or no hparams."""
    from jaxepochs.host import hooks as hooks_lib

    if not settings.get("hparams") or (hooks.get_model is None and hooks.get_data is None):
        return set()
    return hooks_lib.keys_read(settings, "hparams", [hooks.get_model, hooks.get_data])


def check_cv(cv: int, num_train: int) -> None:
    if cv == 0:
        return
    if cv < 2:
        raise SweepError(f"--cv {cv}: cross-validation needs K >= 2 folds.")
    if cv > num_train:
        raise SweepError(f"--cv {cv}: more folds than the {num_train} training examples; use K <= {num_train}.")
