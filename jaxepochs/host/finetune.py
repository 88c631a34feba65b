"""Fine-tuning's parameter groups: freezing, gradual unfreezing and per-layer rates, from the config.

    finetune.freeze = ("Dense_0",)            # groups frozen throughout
    finetune.unfreeze_epochs = (3, 2, 1)      # the epoch each group starts training, bottom to top (head first)
    optimizer.layer_decay = 0.5               # group k from the top trains at learning_rate * 0.5 ** k

The groups are the model's top-level submodules, in order (bottom to top): `Dense_0`, `Dense_1`, ... for the
built-in MLP, the module's own names for a user's linen or NNX model. The optimizer (core/optim.py) holds each
group's first trainable epoch and rate multiplier as arrays in its state: what trains at a step follows from the
step's epoch inside the compiled program, so unfreezing recompiles nothing and a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxepochs.host import config as config_lib

NEVER = 2**30  # the first trainable epoch of a group frozen throughout


def groups_of(abstract_params) -> list[str]:
    """The model's top-level submodules, in order: its groups, bottom to top."""
    return [str(getattr(path[0], "key", path[0])) for path, _ in _top_level(abstract_params)]


def _top_level(params):
    seen, out = set(), []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[0] not in seen:
            seen.add(path[0])
            out.append((path, leaf))
    return out


def in_use(config) -> bool:
    f = config.finetune
    return bool(f.freeze or f.unfreeze_epochs or config.optimizer.layer_decay != 1.0)


def group_values(config, names: list[str]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Each group's first trainable epoch and rate multiplier; ConfigError naming what does not fit."""
    f, count = config.finetune, len(names)
    for name in f.freeze:
        if name not in names:
            raise config_lib.ConfigError(
                f"config.finetune.freeze names {name!r}, which is not a group of the model. Its groups, bottom to "
                f"top: {', '.join(names)}."
            )
    starts = list(f.unfreeze_epochs) or [1] * count
    if len(starts) != count:
        raise config_lib.ConfigError(
            f"config.finetune.unfreeze_epochs = {tuple(f.unfreeze_epochs)} gives {len(starts)} epochs for the "
            f"model's {count} groups ({', '.join(names)}, bottom to top). Give one epoch per group."
        )
    for lower, upper in zip(range(count - 1), range(1, count), strict=True):
        if starts[lower] < starts[upper]:
            raise config_lib.ConfigError(
                f"config.finetune.unfreeze_epochs = {tuple(starts)}: {names[lower]} unfreezes (epoch "
                f"{starts[lower]}) before {names[upper]} above it (epoch {starts[upper]}). Unfreeze from the top "
                "down: each group at or after the one above it."
            )
    if max(starts) > config.train.epochs or min(starts) < 1:
        raise config_lib.ConfigError(
            f"config.finetune.unfreeze_epochs = {tuple(starts)}: each must be an epoch of the run, 1 to "
            f"train.epochs = {config.train.epochs}. Use finetune.freeze for a group that never trains."
        )
    starts = [NEVER if name in f.freeze else start for name, start in zip(names, starts, strict=True)]
    decay = config.optimizer.layer_decay
    return tuple(starts), tuple(float(decay ** (count - 1 - k)) for k in range(count))


def configure(tx, config, abstract_params, steps_per_epoch: int):
    """The optimizer with the config's groups (make_pieces calls it where `in_use`)."""
    names = groups_of(abstract_params)
    starts, rates = group_values(config, names)
    index = {name: g for g, name in enumerate(names)}
    leaf_groups = tuple(index[str(getattr(path[0], "key", path[0]))] for path, _ in _flat(abstract_params))
    return dataclasses.replace(
        tx, groups=leaf_groups, trainable_from=starts, rate_scale=rates, steps_per_epoch=steps_per_epoch
    )


def _flat(params):
    return jax.tree_util.tree_flatten_with_path(params)[0]
