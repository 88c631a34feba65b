"""An experiment module's own pieces: the hooks the trainer takes from it, checked before anything compiles.

    get_config()                 -> the config (required)
    get_model(config)            -> a flax linen nn.Module or a flax nnx.Module
    loss_fn(outputs, batch)      -> the per-example loss [B] (the trainer masks the padding and takes the mean)
    metrics_fn(outputs, batch)   -> {name: per-example values [B]}, logged as train_<name>, val_<name>, test_<name>
    get_data(config)             -> {"train": batch, "test": batch, optionally "validation": batch}, in memory
    augment(key, batch)          -> a batch, inside each training step on the device
    get_optimizer(config)        -> an optax.GradientTransformation: the update's direction (the trainer applies
                                    its learning rate, schedule and plateau scale to it)
    on_epoch_end(row)            -> True to stop the run; on the host with each epoch's row (host/callbacks.py),
                                    or on_epoch_end(row, run) for run.params()

loss_fn, metrics_fn and augment may take a third argument, `hparams`: config.hparams' numbers as traced scalars
(hparams.weight or hparams["weight"]), so a sweep over them is one program. loss_fn and each metric may give
(values [B], weights [B]) for a weighted mean.

A batch is a dict of arrays with one leading example axis: "x" (any pytree, the model's input) and "y". Whatever
a module leaves out takes the built-in default. A function whose name is close to a hook's, or that starts with
"get_", and that the trainer does not use, is said (a warning), so that a typo is not silently ignored.
"""

from __future__ import annotations

import difflib
import inspect
import json
import warnings
from collections.abc import Callable
from typing import NamedTuple

import ml_collections

from jaxepochs.core.task import METRIC_NAMES
from jaxepochs.host import config as config_lib
from jaxepochs.host.config import stopping

HOOKS = {
    "get_model": ("config",),
    "loss_fn": ("outputs", "batch"),
    "metrics_fn": ("outputs", "batch"),
    "get_data": ("config",),
    "augment": ("key", "batch"),
    "get_optimizer": ("config",),
    "on_epoch_end": ("row",),
}
# These may take one more argument: config.hparams' numbers (the device's hooks), or the run (on_epoch_end's).
TAKES_ONE_MORE = ("loss_fn", "metrics_fn", "augment", "on_epoch_end")


class Hooks(NamedTuple):
    module: str  # the experiment module's path ("" without one)
    get_model: Callable | None = None
    loss_fn: Callable | None = None
    metrics_fn: Callable | None = None
    get_data: Callable | None = None
    augment: Callable | None = None
    get_optimizer: Callable | None = None
    on_epoch_end: Callable | None = None


def _check_signature(path: str, name: str, function) -> None:
    if not callable(function):
        raise config_lib.ConfigError(f"{path}: {name} is a {type(function).__name__}, not a function.")
    expected = HOOKS[name]
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return
    required = [
        p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    most = len(expected) + (name in TAKES_ONE_MORE)
    names = [p.name for p in positional]
    if name == "augment" and names[:2] == ["batch", "key"]:
        raise config_lib.ConfigError(
            f"{path}: augment{inspect.signature(function)} takes its arguments swapped: the trainer calls "
            "augment(key, batch). Define it as def augment(key, batch): ..."
        )
    if len(required) > most or (len(positional) < len(expected) and not variadic):
        raise config_lib.ConfigError(
            f"{path}: {name}{inspect.signature(function)} cannot be called as {name}({', '.join(expected)}). "
            f"Define it as def {name}({', '.join(expected)}): ..."
        )


def _say_unused(path: str, module) -> None:
    """Warns of the module's functions that look meant for the trainer but that it does not use."""
    known = ("get_config", *HOOKS)
    for name, value in vars(module).items():
        if name in known or name.startswith("_") or not inspect.isfunction(value):
            continue
        if value.__module__ != module.__name__:  # imported, not written here
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        if close or name.startswith("get_"):
            hint = f' Did you mean "{close[0]}"?' if close else ""
            warnings.warn(
                f"{path}: {name}() is not a hook jaxepochs uses, so it is not called.{hint} The hooks are "
                f"{', '.join(known)}; a helper of your own can start with an underscore.",
                stacklevel=2,
            )


def keys_read(settings: dict, section: str, builders) -> set[str]:
    """The keys of the config's `section` that the `builders` (the module's get_model, get_data) read, each called
    once on a copy of the config (`settings`, as a dict) whose section notes the keys read."""

    class Noting(ml_collections.ConfigDict):
        def __getitem__(self, key):
            object.__getattribute__(self, "_read").add(key)
            return super().__getitem__(key)

    noting = Noting(settings[section])
    object.__setattr__(noting, "_read", set())
    copy = ml_collections.ConfigDict(settings)
    copy[section] = noting
    for build in builders:
        if build is not None:
            build(copy)
    return set(object.__getattribute__(noting, "_read"))


def _say_unused_config(path: str, hooks: Hooks, sections: dict, model_keys_read: Callable[[], set]) -> None:
    """get_model and get_data replace config.model and config.data: settings there that differ from the
    defaults would be ignored, so they are said. Those that apply to get_data's arrays too are not: the validation
    split's, the label noise (classification), and whether (data.stream) and by which budget
    (data.device_memory_*) they are streamed. `sections`: the config's model and data sections, by name. A model
    setting that get_model reads itself (config.model.d_model) is used: where a warning would be given,
    `model_keys_read()` calls get_model once more, on a copy, to note what it reads."""
    defaults = config_lib.base_config()
    for hook, section, kept in (
        ("get_model", "model", ()),
        ("get_data", "data", ("validation_fraction", "split_seed", "label_noise", "stream", "device_memory_fraction",
                              "device_memory_bytes")),
    ):  # fmt: skip
        if getattr(hooks, hook) is None:
            continue
        ours = config_lib.flatten(json.loads(sections[section].to_json_best_effort()))
        theirs = config_lib.flatten(json.loads(defaults[section].to_json_best_effort()))
        changed = [k for k in ours if ours[k] != theirs.get(k) and k.split(".")[0] not in kept]
        if changed and hook == "get_model":  # get_data is not called twice: it may read a dataset
            read = model_keys_read()
            changed = [k for k in changed if k.split(".")[0] not in read]
        changed = [f"{section}.{k}" for k in changed]
        if changed:
            warnings.warn(
                f"{path}: {hook} gives the {section}, so config.{', config.'.join(changed)} is not used. Read it in "
                f"{hook}(config), or leave it at its default.",
                stacklevel=2,
            )


def load_hooks(config: ml_collections.ConfigDict) -> Hooks:
    """The hooks of the config's experiment module (none for a config built without one). Checks what needs the
    module: its hooks' signatures, its early stopping's monitor (validate leaves it to here: the module's
    metrics_fn may log metrics of its own, checked once traced by setup.make_tracker), and the functions and
    settings it would leave unused (warnings)."""
    path = config.experiment.module
    if not path:
        return Hooks("")
    try:
        module = config_lib.import_experiment(path)
    except FileNotFoundError:
        raise config_lib.ConfigError(
            f"The experiment module {path} (config.experiment.module) is gone; its model and hooks are needed. "
            "Restore it, or point config.experiment.module at it."
        ) from None
    found = {name: getattr(module, name) for name in HOOKS if hasattr(module, name)}
    if config.task == "custom" and "loss_fn" not in found:
        raise config_lib.ConfigError(
            f'{path}: config.task = "custom" needs the module\'s own loss: define loss_fn(outputs, batch).'
        )
    if "metrics_fn" not in found:  # the task's metrics: their names are known now
        stopping.check(config.early_stopping, config.data.validation_fraction > 0, METRIC_NAMES[config.task])
    for name, function in found.items():
        _check_signature(path, name, function)
    _say_unused(path, module)
    hooks = Hooks(path, **found)
    model_keys_read = lambda: keys_read(config.to_dict(), "model", [hooks.get_model])
    _say_unused_config(path, hooks, {"model": config.model, "data": config.data}, model_keys_read)
    return hooks
