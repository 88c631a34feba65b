"""An epoch's metrics as sums over its examples (and its steps' norms): what the run program carries and the host
divides once, at the end of the epoch.

A metric is the sum of its per-example values over the real (unmasked) examples; a weighted one (a loss or metric
giving (values, weights)) adds its weight sum under name + WEIGHT; a maximum over the steps is kept under
name + MAX. logging.norms and logging.layer_norms add each step's norms as metrics of weight 1 a step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

WEIGHT = "/weight"  # sums[name + WEIGHT]: the weight sum of a weighted metric (a loss or metric giving (v, w))
MAX = "/max"  # sums[name + MAX]: a maximum over the steps, not a sum (combined by max; shown as <name>_max)


class Metrics(NamedTuple):
    """Sums over the examples seen; divided once, on the host, at the end of the epoch. A weighted metric (one
    whose function returned (values, weights)) has its weighted sum under its name and its weight sum under
    name + WEIGHT: its mean is the one divided by the other."""

    sums: dict  # name -> float32 [] the sum of the per-example values over the real examples; "loss" always
    count: jax.Array  # float32 [] real (unmasked) examples

    @staticmethod
    def zeros(names) -> Metrics:
        """`names`: the metrics' names, "loss" among them."""
        return Metrics({name: jnp.zeros((), jnp.float32) for name in names}, jnp.zeros((), jnp.float32))

    def __add__(self, other: Metrics) -> Metrics:  # type: ignore[override]
        return Metrics(combine_sums(self.sums, other.sums), self.count + other.count)

    def mean(self, name: str):
        """A metric's mean over the examples (a traced value inside a program)."""
        if name + WEIGHT in self.sums:
            return weighted_mean(self.sums[name], self.sums[name + WEIGHT])
        return self.sums[name] / jnp.maximum(self.count, 1.0)

    def means(self, prefix: str) -> dict[str, float]:
        count = max(float(self.count), 1.0)
        names = ["loss", *sorted(name for name in self.sums if name != "loss" and "/" not in name)]
        out = {}
        for name in names:
            weight = float(self.sums[name + WEIGHT]) if name + WEIGHT in self.sums else None
            out[f"{prefix}_{name}"] = float(self.sums[name]) / (count if weight is None else (weight or 1.0))
            if name + MAX in self.sums:
                out[f"{prefix}_{name}_max"] = float(self.sums[name + MAX])
        return out


def combine_sums(a: dict, b: dict) -> dict:
    """Two steps' (or chunks') metric sums as one: added, but the maxima (MAX) maxed."""
    return {k: jnp.maximum(a[k], b[k]) if k.endswith(MAX) else a[k] + b[k] for k in a}


# logging.norms: each training step's global L2 norms, as weighted sums of weight 1 a step, so that an epoch's
# figure (train_grad_norm, ...) is their mean over its steps, whatever the batch's real rows; and the gradient's
# largest norm over the epoch's steps (train_grad_norm_max).
NORMS = ("grad_norm", "update_norm", "param_norm", "update_ratio")
NORM_SUMS = (*(name + suffix for name in NORMS for suffix in ("", WEIGHT)), "grad_norm" + MAX)


def norm_sums(grads, updates, params, new_params) -> dict:
    """A step's NORM_SUMS: the global L2 norms of its gradient, its update (the learning rate applied) and the
    parameters it leaves, and the update's norm over the parameters' before it, each with weight 1; and the
    gradient's norm again, as a maximum."""
    grad, update = optax.global_norm(grads), optax.global_norm(updates)
    ratio = update / jnp.maximum(optax.global_norm(params), jnp.finfo(jnp.float32).tiny)
    norms = (grad, update, optax.global_norm(new_params), ratio)
    sums = {name: norm.astype(jnp.float32) for name, norm in zip(NORMS, norms, strict=True)}
    ones = {name + WEIGHT: jnp.ones((), jnp.float32) for name in NORMS}
    return {**sums, **ones, "grad_norm" + MAX: grad.astype(jnp.float32)}


def layer_norm_names(layers: tuple[str, ...]) -> tuple[str, ...]:
    """logging.layer_norms' sums: the gradient's and the parameters' norms of each top-level group `layers`."""
    return tuple(
        f"{kind}_norm_{layer}{suffix}" for layer in layers for kind in ("grad", "param") for suffix in ("", WEIGHT)
    )


def layer_norm_sums(grads, params, layers: tuple[str, ...]) -> dict:
    """A step's layer_norm_names: each top-level group's gradient and (new) parameter norms, weight 1 each."""
    one, out = jnp.ones((), jnp.float32), {}
    for layer in layers:
        for kind, tree in (("grad", grads), ("param", params)):
            out[f"{kind}_norm_{layer}"] = optax.global_norm(tree[layer]).astype(jnp.float32)
            out[f"{kind}_norm_{layer}{WEIGHT}"] = one
    return out


def weighted_mean(total, weight):
    """total / weight, 0 where the weight is 0 (a batch of padding, or of examples weighted 0)."""
    return jnp.where(weight > 0, total / jnp.where(weight > 0, weight, 1.0), 0.0)
