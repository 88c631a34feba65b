"""Starting a run from another run's parameters: `init.from_workdir` (transfer, fine-tuning).

    init.from_workdir = "runs/pretrained"   # a run's workdir (read with jaxepochs.load)
    init.epoch = "last"                     # "last", "best" or an epoch number with a checkpoint
    init.include = ("*",)                   # path patterns (fnmatch, "Dense_0/kernel") of what is taken
    init.exclude = ()                       # ... and of what is not
    init.reinit = ("Dense_2/*",)            # initialised afresh even where the run has them (a new head)

    pieces = warm_start.attach(pieces, config.init, trace_init, x_1)   # Pieces whose fresh runs take the arrays
    params, model_state = pieces.warm.apply(params, model_state)   # (host/setup.init_carries does this)

A parameter is named by its path in the parameter tree, "/"-joined ("Dense_0/kernel"); BatchNorm's statistics
by theirs without the collection ("BatchNorm_0/mean"), so one pattern names a layer's parameters and statistics.
Every parameter the patterns select is taken from the run; one the run lacks, or whose shape differs, is an
error naming its path unless `init.reinit` names it. Everything is checked before the workdir is touched; a
resumed run restores its own checkpoint and never reads the source again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import pathlib
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import saved_run, setup


class WarmStart(NamedTuple):
    """What a new run takes from the source run: the source's arrays by path, and which paths to take."""

    workdir: str
    epoch: str  # as asked: "last", "best" or a number
    params: dict[str, np.ndarray]  # path -> the source's array, for every path taken
    model_state: dict[str, np.ndarray]  # (collection, path) joined as "collection:path" -> array
    reinitialised: tuple[str, ...]  # the new model's paths initialised afresh
    identity: dict = {}  # what identifies the source: its config's sha256, the epoch whose arrays were taken

    def apply(self, params, model_state):
        """A freshly initialised run's (params, model_state) with the source's arrays where this takes them."""

        def put(table, prefix=""):
            return lambda path, leaf: table.get(prefix + path_name(path), leaf)

        params = jax.tree_util.tree_map_with_path(put(self.params), params)
        if model_state:
            model_state = {
                collection: jax.tree_util.tree_map_with_path(put(self.model_state, f"{collection}:"), tree)
                for collection, tree in model_state.items()
            }
        return params, model_state

    def summary(self) -> dict:
        return {
            "workdir": self.workdir,
            "epoch": self.epoch,
            **self.identity,
            "parameters_taken": len(self.params),
            "reinitialised": list(self.reinitialised),
        }


def path_name(path) -> str:
    """ "Dense_0/kernel": the name patterns match."""
    return checkpoint_lib.path_name(path, "/")


def _flat(tree) -> dict[str, Any]:
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _state_flat(model_state) -> dict[str, Any]:
    """BatchNorm's statistics and the like as "collection:path" -> leaf (path without the collection)."""
    out = {}
    for collection, tree in (model_state or {}).items():
        out.update({f"{collection}:{name}": leaf for name, leaf in _flat(tree).items()})
    return out


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _epoch_arg(epoch: str):
    return None if epoch == "last" else ("best" if epoch == "best" else int(epoch))


def attach(pieces: setup.Pieces, init, trace_init, x_1) -> setup.Pieces:
    """`pieces` with the arrays its fresh runs take from init.from_workdir (`init`: the config's init section;
    `trace_init(x)`: a run's initialisation, traced for the new model's shapes), read and checked now."""
    if not init.from_workdir:
        return pieces
    shapes = jax.eval_shape(trace_init, x_1)
    return pieces._replace(warm=prepare(init, shapes[0], shapes[1]))


def prepare(init, abstract_params, abstract_model_state) -> WarmStart | None:
    """The source run's arrays that a run starts from (None without init.from_workdir; `init`: the config's init
    section, its values checked by config.validate), checked against the new model's shapes; ConfigError naming
    the path or pattern that does not fit."""
    if not init.from_workdir:
        return None
    source = pathlib.Path(init.from_workdir).expanduser()
    try:
        saved = saved_run.open_run(source, _epoch_arg(str(init.epoch)))
    except ValueError as e:
        raise config_lib.ConfigError(f"config.init.from_workdir = {str(source)!r}: {e}") from None
    loaded = saved.state
    new, old = _flat(abstract_params), {k: np.asarray(v) for k, v in _flat(loaded.params).items()}
    _check_patterns(init, new)
    taken, fresh = {}, []
    for name, leaf in new.items():
        selected = (not init.include or _matches(name, init.include)) and not _matches(name, init.exclude)
        if not selected or _matches(name, init.reinit):
            fresh.append(name)
            continue
        _check_fits(source, name, leaf, old, list(old))
        taken[name] = old[name].astype(leaf.dtype)
    state = _take_state(init, source, abstract_model_state, loaded.model_state, fresh)
    return WarmStart(str(source), str(init.epoch), taken, state, tuple(fresh), identity(saved))


def identity(saved: saved_run.SavedRun) -> dict:
    """What identifies the run a warm start read, for summary.json: the sha256 of its config.json (a sweep
    member's config as a run's config.json would hold it) and the epoch whose parameters were taken."""
    path = saved.where.directory / "config.json"
    text = path.read_bytes() if path.exists() else (saved.config.to_json_best_effort(indent=2) + "\n").encode()
    return {"config_sha256": hashlib.sha256(text).hexdigest(), "epoch_loaded": saved.best_epoch or saved.epoch}


def _check_patterns(init, new: dict) -> None:
    groups = sorted({name.split("/")[0] for name in new})
    for key in ("include", "exclude", "reinit"):
        for pattern in init[key]:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in new):
                raise config_lib.ConfigError(
                    f"config.init.{key} pattern {pattern!r} matches no parameter of the model. Its groups: "
                    f"{', '.join(groups)} (a parameter is named like {next(iter(new))!r}; patterns use fnmatch)."
                )


def _check_fits(source, name: str, leaf, old: dict, old_names: list[str]) -> None:
    if name not in old:
        raise config_lib.ConfigError(
            f"config.init.from_workdir: the run in {source} has no parameter {name} (it has "
            f"{', '.join(old_names[:8])}{' ...' if len(old_names) > 8 else ''}): it is a run of another model. "
            f"Name {name!r} in init.reinit to initialise it afresh, or start from a run of this model."
        )
    if tuple(old[name].shape) != tuple(leaf.shape):
        raise config_lib.ConfigError(
            f"config.init.from_workdir: {name} has shape {tuple(old[name].shape)} in the run in {source}, and "
            f"{tuple(leaf.shape)} in this model. Name {name!r} in init.reinit to initialise it afresh (a new head "
            "for a new number of classes), or exclude it."
        )


def _take_state(init, source, abstract_state, loaded_state, fresh: list[str]) -> dict:
    """The source's model state (BatchNorm's statistics) for every layer taken."""
    new, old = _state_flat(abstract_state), {k: np.asarray(v) for k, v in _state_flat(loaded_state).items()}
    taken = {}
    for key, leaf in new.items():
        name = key.split(":", 1)[1]
        selected = (not init.include or _matches(name, init.include)) and not _matches(name, init.exclude)
        if selected and not _matches(name, init.reinit):
            _check_fits(source, key, leaf, old, list(old))
            taken[key] = old[key].astype(leaf.dtype)
    return taken
