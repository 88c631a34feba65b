"""Experiment modules: `experiments/NAME.py`, imported by path, whose `get_config()` is the experiment's config
(and whose other functions are its hooks, host/hooks.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import sys

import ml_collections

from jaxepochs.host.config.errors import ConfigError
from jaxepochs.host.config.validate import validate


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports an experiment module by path and returns its validated `get_config()`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"No experiment module at {path}. Pass a file such as experiments/mnist1d_mlp.py.")
    module = import_experiment(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(); an experiment module must define one.")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}; return jaxepochs.base_config().")
    if callable(getattr(module, "loss_fn", None)):  # its own loss: no built-in task's checks or metrics
        config.task = "custom"
    config.experiment = ml_collections.ConfigDict(
        {"module": str(path.resolve()), "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    )
    return validate(config)


def import_experiment(path: str | pathlib.Path):
    """The experiment module at `path`, imported (once per path and source: edits are seen)."""
    path = pathlib.Path(path).resolve()
    source = path.read_bytes()
    key = (str(path), hashlib.sha256(source).hexdigest())
    if key not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"jaxepochs_experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        folder = str(path.parent)
        sys.path.insert(0, folder)  # its siblings import while it loads (from two_heads import ...)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(folder)
        _MODULES[key] = module
    return _MODULES[key]


_MODULES: dict = {}
