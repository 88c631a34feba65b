"""Any optax transformation as the trainer's optimizer: the update's direction is the transformation's, the rate
is the trainer's (the schedule in epochs, reduce_on_plateau's scale, a sweep's per-run rate and weight decay).

    tx = OptaxOptimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_lion()), shape, defaults)

Its state holds the run's `OptHParams` as arrays (so runs that differ only in the learning rate or the weight
decay share one program) beside the transformation's own state; each update is -learning_rate * shape(count) *
scale * (direction + weight_decay * params where `decay`). A `TrainerOptimizer` (core/optim.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxepochs.core import optim

# optimizer.name -> the optax alias whose direction is taken (at learning rate 1, sign turned back), and the
# optimizer section's keys it reads. Weight decay, where an alias has it, is the trainer's (decoupled, traced).
ALIASES = {
    "lion": (lambda o: optax.lion(1.0, b1=o["b1"], b2=o["b2"]), True),
    "lamb": (lambda o: optax.lamb(1.0, b1=o["b1"], b2=o["b2"]), True),
    "nadam": (lambda o: optax.nadam(1.0, b1=o["b1"], b2=o["b2"]), False),
    "nadamw": (lambda o: optax.nadam(1.0, b1=o["b1"], b2=o["b2"]), True),
    "adabelief": (lambda o: optax.adabelief(1.0, b1=o["b1"], b2=o["b2"]), False),
    "rmsprop": (lambda o: optax.rmsprop(1.0, decay=o["b2"], momentum=o["momentum"] or None), False),
    "adafactor": (lambda o: optax.adafactor(1.0, multiply_by_parameter_scale=False), False),
    "adagrad": (lambda o: optax.adagrad(1.0), False),
    "sgd_nesterov": (lambda o: optax.sgd(1.0, momentum=o["momentum"], nesterov=True), False),
    # RPROP (optax.rprop, iRprop-) for full batches: the learning rate is its initial step, and its steps stay
    # within 1e-6 and 50 times the rate (optax's bounds at rate 1). Meant for train.batch_size >= the split.
    "rprop": (lambda o: optax.rprop(1.0), False),
}


SCHEDULE_FREE = "schedule_free_adamw"  # optax.contrib's, at the trainer's rate: ScheduleFreeOptimizer
NAMES = (*ALIASES, SCHEDULE_FREE)  # the optimizer.name values made here


class OptaxState(NamedTuple):
    count: jax.Array  # int32 [] updates taken
    shape: jax.Array  # float32 [] the schedule's shape at the last update's step (before any: at step 0)
    hparams: optim.OptHParams
    inner: Any  # the transformation's state


@dataclasses.dataclass(frozen=True, eq=False)
class OptaxOptimizer:
    """A TrainerOptimizer around `inner`, an optax.GradientTransformation giving the update's direction (as
    optax's scale_by_* transformations do: the rate, and its sign, are applied here)."""

    inner: optax.GradientTransformation
    shape: optax.Schedule  # the schedule of peak 1, of the 0-based step index
    defaults: tuple[float, ...]
    clip_norm: float = 0.0
    decay: bool = False  # add weight_decay * params to the direction (decoupled, as AdamW)
    group_names: tuple[str, ...] = ()
    groups: Any = None

    def init(self, params) -> OptaxState:
        hparams = optim.OptHParams(*(jnp.asarray(v, jnp.float32) for v in self.defaults))
        count = jnp.zeros((), jnp.int32)
        return OptaxState(count, jnp.asarray(self.shape(count), jnp.float32), hparams, self.inner.init(params))

    def update(self, grads, state: OptaxState, params=None):
        if self.clip_norm > 0:
            grads, _ = optax.clip_by_global_norm(self.clip_norm).update(grads, optax.EmptyState())
        direction, inner = self.inner.update(grads, state.inner, params)
        h = state.hparams
        if self.decay:
            direction = jax.tree.map(lambda d, p: d + h.weight_decay * p, direction, params)
        shape = jnp.asarray(self.shape(state.count), jnp.float32)
        rate = h.learning_rate * shape * h.scale
        return jax.tree.map(lambda d: -rate * d, direction), OptaxState(state.count + 1, shape, h, inner)

    def with_hparams(self, state: OptaxState, hparams: optim.OptHParams, groups=None) -> OptaxState:
        return state._replace(hparams=hparams)

    def hparams(self, state: OptaxState) -> optim.OptHParams:
        return state.hparams

    def learning_rate(self, state: OptaxState) -> jax.Array:
        return optim.learning_rate_of(state)

    def with_plateau_scale(self, state: OptaxState, scale: jax.Array) -> OptaxState:
        return optim.with_plateau_scale(state, _Scale(scale))


class _Scale(NamedTuple):
    scale: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleFreeOptimizer(OptaxOptimizer):
    """optax.contrib.schedule_free_adamw (Defazio et al. 2024) at the trainer's rate: each step builds it at
    that step's learning_rate * shape * scale (a traced number: the schedule's warmup, the plateau's factor and a
    sweep's per-run rate and betas all reach it) and takes its update whole, since the rate enters its averaging
    weights and cannot be applied afterwards. The parameters trained are its gradient point y; evaluation,
    the best epoch and `jaxepochs.load` see its average x (`eval_params`: optax's schedule_free_eval_params, with
    the run's b1). Its weight decay (optimizer.weight_decay) is optax's, multiplied by the rate."""

    def update(self, grads, state: OptaxState, params=None):  # init: OptaxOptimizer's, of `inner` at rate 1
        if self.clip_norm > 0:
            grads, _ = optax.clip_by_global_norm(self.clip_norm).update(grads, optax.EmptyState())
        h = state.hparams
        shape = jnp.asarray(self.shape(state.count), jnp.float32)
        rate = h.learning_rate * shape * h.scale
        tx = optax.contrib.schedule_free_adamw(rate, b1=h.b1, b2=h.b2, weight_decay=h.weight_decay)
        updates, inner = tx.update(grads, state.inner, params)
        return updates, OptaxState(state.count + 1, shape, h, inner)

    def eval_params(self, state: OptaxState, params):
        b1 = state.hparams.b1
        return jax.tree.map(lambda y, z: (y - (1.0 - b1) * z) / b1, params, state.inner.z)


def alias_direction(o: dict) -> tuple[optax.GradientTransformation, bool]:
    """The direction of optimizer.name's optax alias (its updates at rate 1, negated) and whether the trainer
    decays the weights for it."""
    make, decays = ALIASES[o["name"]]
    return optax.chain(make(o), optax.scale(-1.0)), decays


def make(spec: dict, steps_per_epoch: int, total_epochs: int, direction=None) -> OptaxOptimizer:
    """The OptaxOptimizer of an optimizer spec: `direction` (a get_optimizer hook's transformation), else the
    alias optimizer.name names. ValueError naming what does not fit."""
    o = optim.optimizer_spec(spec)
    if not o["learning_rate"] > 0:
        raise ValueError(
            f"config.optimizer.learning_rate = {o['learning_rate']!r}. The learning rate must be positive."
        )
    shape = optim.make_schedule(o["schedule"], 1.0, steps_per_epoch, total_epochs)
    defaults = tuple(optim.hparams_of(o))
    if direction is None and o["name"] == SCHEDULE_FREE:
        if not 0 < o["b1"] < 1:
            raise ValueError(f"config.optimizer.b1 = {o['b1']!r}. Schedule-free AdamW needs 0 < b1 < 1.")
        inner = optax.contrib.schedule_free_adamw(1.0, b1=o["b1"], b2=o["b2"])
        return ScheduleFreeOptimizer(inner, shape, defaults, float(o["clip_norm"]))
    decays = o["name"] == "adamw"
    if direction is None:
        direction, decays = alias_direction(o)
    return OptaxOptimizer(direction, shape, defaults, float(o["clip_norm"]), decays)
