"""Fine-tuning's parameter groups: freezing, gradual unfreezing and per-layer rates, from the config.

    finetune.groups = ("body=Conv_*", "head=Dense_*")   # optional: groups by path pattern, bottom to top
    finetune.freeze = ("Dense_0",)            # groups frozen throughout
    finetune.unfreeze_epochs = (3, 2, 1)      # the epoch each group starts training, bottom to top (head first)
    optimizer.layer_decay = 0.5               # group k from the top trains at learning_rate * 0.5 ** k
    finetune.rate_scales = (0.1, 0.3, 1.0)    # or each group's multiplier of the rate, bottom to top

Without `finetune.groups` the groups are the model's top-level submodules, in order (bottom to top): `Dense_0`,
`Dense_1`, ... for the built-in MLP, the module's own names for a user's linen or NNX model. With it, each
parameter belongs to the first group one of whose fnmatch patterns matches its path ("Conv_0/kernel"). The
optimizer (core/optim.py) holds each group's first trainable epoch and rate multiplier as arrays in its state:
what trains at a step follows from the step's epoch inside the compiled program, so unfreezing recompiles
nothing and a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import NamedTuple

import jax

from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib

NEVER = 2**30  # the first trainable epoch of a group frozen throughout


class Groups(NamedTuple):
    names: tuple[str, ...]  # bottom to top
    of_leaf: tuple[int, ...]  # each parameter's group, in tree-flatten order


def _paths(abstract_params) -> list[tuple[str, str]]:
    """(top-level submodule, "/"-joined path) of each parameter, in tree-flatten order."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    return [(str(getattr(path[0], "key", path[0])), checkpoint_lib.path_name(path, "/")) for path, _ in flat]


def parse_groups(specs) -> list[tuple[str, tuple[str, ...]]]:
    """("body=Conv_*,BatchNorm_*", ...) as [(name, patterns)]; config.validate has checked the spelling."""
    out = []
    for spec in specs:
        name, _, patterns = str(spec).partition("=")
        out.append((name.strip(), tuple(p.strip() for p in patterns.split(",") if p.strip())))
    return out


class FinetuneSpec(NamedTuple):
    """What fine-tuning needs of a config (its finetune section, optimizer.layer_decay and train.epochs), read
    once after validation; a sweep's members each have theirs (their groups' values may differ)."""

    groups: tuple[str, ...]
    freeze: tuple[str, ...]
    unfreeze_epochs: tuple[int, ...]
    rate_scales: tuple[float, ...]
    layer_decay: float
    epochs: int


def grouping(f: FinetuneSpec, abstract_params) -> Groups:
    """The model's groups (config.finetune.groups, or its top-level submodules) and each parameter's group;
    ConfigError naming a pattern that matches nothing, or a parameter in no group."""
    paths = _paths(abstract_params)
    if not f.groups:
        names = tuple(dict.fromkeys(top for top, _ in paths))
        return Groups(names, tuple(names.index(top) for top, _ in paths))
    specs = parse_groups(f.groups)
    names = tuple(name for name, _ in specs)
    first = lambda path: next((g for g, (_, pats) in enumerate(specs) if _matches(path, pats)), None)
    of_leaf = [first(path) for _, path in paths]
    listed = ", ".join(path for _, path in paths)
    for name, patterns in specs:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(path, pattern) for _, path in paths):
                raise config_lib.ConfigError(
                    f"config.finetune.groups: group {name!r}'s pattern {pattern!r} matches no parameter. The "
                    f"model's parameters: {listed}."
                )
    missing = [path for (_, path), g in zip(paths, of_leaf, strict=True) if g is None]
    if missing:
        raise config_lib.ConfigError(
            f"config.finetune.groups: {', '.join(missing)} in no group. Add a pattern for them (every parameter "
            "belongs to the first group whose pattern matches it)."
        )
    return Groups(names, tuple(of_leaf))


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def in_use(f: FinetuneSpec) -> bool:
    return bool(f.freeze or f.unfreeze_epochs or f.rate_scales or f.layer_decay != 1.0)


def _check_counts(f: FinetuneSpec, names: tuple[str, ...]) -> None:
    count = len(names)
    for name in f.freeze:
        if name not in names:
            raise config_lib.ConfigError(
                f"config.finetune.freeze names {name!r}, which is not a group of the model. Its groups, bottom to "
                f"top: {', '.join(names)}."
            )
    for key in ("unfreeze_epochs", "rate_scales"):
        given = getattr(f, key)
        if given and len(given) != count:
            raise config_lib.ConfigError(
                f"config.finetune.{key} = {given} gives {len(given)} values for the model's {count} "
                f"groups ({', '.join(names)}, bottom to top). Give one per group."
            )


def group_values(f: FinetuneSpec, names: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Each group's first trainable epoch and rate multiplier; ConfigError naming what does not fit."""
    _check_counts(f, names)
    count = len(names)
    starts = list(f.unfreeze_epochs) or [1] * count
    for lower, upper in zip(range(count - 1), range(1, count), strict=True):
        if starts[lower] < starts[upper]:
            raise config_lib.ConfigError(
                f"config.finetune.unfreeze_epochs = {tuple(starts)}: {names[lower]} unfreezes (epoch "
                f"{starts[lower]}) before {names[upper]} above it (epoch {starts[upper]}). Unfreeze from the top "
                "down: each group at or after the one above it."
            )
    if max(starts) > f.epochs or min(starts) < 1:
        raise config_lib.ConfigError(
            f"config.finetune.unfreeze_epochs = {tuple(starts)}: each must be an epoch of the run, 1 to "
            f"train.epochs = {f.epochs}. Use finetune.freeze for a group that never trains."
        )
    starts = [NEVER if name in f.freeze else start for name, start in zip(names, starts, strict=True)]
    if f.rate_scales:
        return tuple(starts), tuple(float(r) for r in f.rate_scales)
    decay = f.layer_decay
    return tuple(starts), tuple(float(decay ** (count - 1 - k)) for k in range(count))


def configure(tx, f: FinetuneSpec, abstract_params, steps_per_epoch: int):
    """The optimizer with the config's groups (make_pieces calls it where `in_use`)."""
    groups = grouping(f, abstract_params)
    starts, rates = group_values(f, groups.names)
    return dataclasses.replace(
        tx,
        groups=groups.of_leaf,
        group_names=groups.names,
        trainable_from=starts,
        rate_scale=rates,
        steps_per_epoch=steps_per_epoch,
    )


def rate_columns(epoch: int, learning_rate: float, names, starts, rates) -> dict[str, float]:
    """metrics.jsonl's `learning_rate/<group>`: the rate each group's parameters moved at in the epoch's last
    step (0 before the group unfreezes). The schedule's rate times the group's multiplier, as the optimizer
    applies them (core/optim.py), computed on the host from the row's rate: the compiled program is unchanged."""
    return {
        f"learning_rate/{name}": float(learning_rate) * rate if epoch >= start else 0.0
        for name, start, rate in zip(names, starts, rates, strict=True)
    }
