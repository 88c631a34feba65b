"""Optimizers: what the trainer needs of one (`TrainerOptimizer`, a Protocol), and the built-in one
(`make_optimizer`: adam, adamw or sgd); pure functions of plain values (no config objects).

`make_optimizer` returns adam, adamw or sgd (momentum) with gradient clipping and a schedule's shape
(core/schedules.py), whose state holds every number a sweep may vary as an array (`OptHParams`: the peak rate, the
plateau scale, Adam's betas, weight decay, momentum), so runs that differ only in them share one compiled program
and `jax.vmap` batches them. One counter drives the schedule and Adam's bias correction; the schedule is evaluated
once per step. (It replaced `optax.inject_hyperparams`, whose three counters and rebuilt inner optimizer cost
about 0.45 us per step at batch size 1 on CPU, and whose `b ** count` rounds differently batched and unbatched: a
sweep member parted from its solo run in the 7th digit.)

    tx = make_optimizer(spec, steps_per_epoch, epochs)   # spec: name, learning_rate, ..., schedule: {...}
    opt_state = tx.with_hparams(tx.init(params), hparams_of(spec))   # a run's own values (a sweep's differ)
    updates, opt_state = tx.update(grads, opt_state, params)
    tx.learning_rate(opt_state)                          # the rate the last update applied

reduce_on_plateau (`optax.contrib.reduce_on_plateau`) sees one monitored value per epoch: `plateau_init`,
`plateau_update` (pure), and the optimizer's `with_plateau_scale`, which writes its scale into the state.
The schedules' names (SCHEDULES, make_schedule, ...) are importable from here too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax

from jaxepochs.core.schedules import (
    MONITORS,
    SCHEDULE_DEFAULTS,
    SCHEDULES,
    epochs_to_steps,
    make_schedule,
    schedule_spec,
    validate_schedule,
)

__all__ = [  # the schedules' names are core/schedules.py's, importable from here as before
    "ADAM_EPS",
    "MONITORS",
    "OPTIMIZERS",
    "OPTIMIZER_DEFAULTS",
    "SCHEDULES",
    "SCHEDULE_DEFAULTS",
    "GroupState",
    "OptHParams",
    "OptState",
    "Optimizer",
    "PlateauState",
    "TrainerOptimizer",
    "epochs_to_steps",
    "hparams_of",
    "learning_rate_of",
    "make_optimizer",
    "make_schedule",
    "optimizer_spec",
    "plateau_init",
    "plateau_update",
    "schedule_spec",
    "validate_schedule",
    "with_plateau_scale",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
ADAM_EPS = 1e-8  # optax.adam's default

# The keys of an optimizer spec (the config's `optimizer` section), with their defaults.
OPTIMIZER_DEFAULTS = {
    "name": "adam",  # one of OPTIMIZERS
    "learning_rate": 1e-2,  # the peak rate; schedules scale it
    "momentum": 0.9,  # sgd only
    "b1": 0.9,  # adam, adamw: decay of the first moment
    "b2": 0.999,  # adam, adamw: decay of the second moment
    "weight_decay": 1e-4,  # adamw only
    "clip_norm": 0.0,  # clip gradients to this global norm before the optimizer; 0 = off
    "layer_decay": 1.0,  # fine-tuning: group k from the top trains at learning_rate * layer_decay ** k (host/finetune)
}


class OptHParams(NamedTuple):
    """The numbers a sweep may vary per run: float32 [] each (with a leading run axis in a sweep)."""

    learning_rate: jax.Array  # the peak rate that the schedule's shape multiplies
    scale: jax.Array  # reduce_on_plateau's multiplier; 1 for every other schedule
    b1: jax.Array  # adam, adamw: decay of the first moment
    b2: jax.Array  # adam, adamw: decay of the second moment
    weight_decay: jax.Array  # adamw
    momentum: jax.Array  # sgd


class GroupState(NamedTuple):
    """Fine-tuning's parameter groups (bottom to top): when each trains, at what rate, its own bias correction."""

    trainable_from: jax.Array  # int32 [G] the first epoch each group trains (a group frozen throughout: never)
    rate_scale: jax.Array  # float32 [G] each group's multiplier of the learning rate (layer decay)
    b1_power: jax.Array  # float32 [G] b1 ** (the group's updates): its moments start when it unfreezes
    b2_power: jax.Array  # float32 [G]


class OptState(NamedTuple):
    count: jax.Array  # int32 [] updates taken
    shape: jax.Array  # float32 [] the schedule's shape at the last update's step (before any: at step 0)
    hparams: OptHParams
    b1_power: jax.Array  # float32 [] b1 ** count, a running product: Adam's bias correction
    b2_power: jax.Array  # float32 [] b2 ** count
    mu: Any  # first moment (adam, adamw) or momentum trace (sgd), shaped as the params
    nu: Any  # second moment (adam, adamw), shaped as the params; None for sgd
    groups: GroupState | None = None  # with fine-tuning's groups (Optimizer.groups), else None


@runtime_checkable
class TrainerOptimizer(Protocol):
    """What the trainer asks of an optimizer (`RunSpec.tx`; host/setup.py makes the built-in `Optimizer`).

    optax's contract (optax.GradientTransformation), which the run program calls once per step:
      init(params) -> state
      update(grads, state, params) -> (updates, state): `updates` are added to the parameters as they are
          (optax.apply_updates): the learning rate is already in them.
    The state is a pytree of arrays whose structure `init` fixes: the run's carry holds it, checkpoints save it,
    and a sweep stacks it on a leading run axis.

    What the trainer owns per run, written into and read from that state:
      defaults: the run's `OptHParams` (as floats, in its field order) for the optimizer's own spec. A sweep puts
          each run's values (`hparams_of(spec)` of its config's optimizer section) on the run axis: runs that
          differ only in them share one program. An optimizer keeps every field and reads those it uses (sgd: no
          betas; weight decay: adamw's).
      with_hparams(state, hparams, groups=None) -> state: a fresh state (from `init`) with a run's values: its
          `OptHParams` (float32 [] each) and, with fine-tuning's groups (`group_names` not empty), its
          `GroupState` (None: the state's own).
      hparams(state) -> OptHParams: the values `with_hparams` wrote (the learning-rate finder rewrites the rate).
      learning_rate(state) -> float32 []: the rate the last update applied (before any: the first step's), with
          the schedule and reduce_on_plateau's scale in it: metrics.jsonl's learning_rate.
      with_plateau_scale(state, scale) -> state: the state whose next updates apply `scale` (float32 [],
          reduce_on_plateau's multiplier of the rate, core/optim.PlateauState.scale) in place of the one before;
          once per epoch, after the epoch's steps. The plateau's own state is the trainer's (RunCarry.plateau).
      group_names: fine-tuning's groups, bottom to top (learning_rate/<group> in metrics.jsonl); () without.

    An optimizer whose direction is another optax transformation implements it by owning the rest: a state of
    (count, the schedule's shape, OptHParams, the inner transformation's state); `update` scales the inner
    updates by -learning_rate * shape * scale (adding weight_decay * params first where it decays).

    Optional: eval_params(state, params) -> params, the parameters to evaluate where they are not the trained
    ones (schedule-free's average x beside its gradient point y: core/optax_optim.py). Validation, test, the
    best epoch's parameters, the final metrics and `jaxepochs.load` then see them (`evaluation_state`).
    """

    defaults: tuple[float, ...]
    group_names: tuple[str, ...]

    def init(self, params) -> Any: ...

    def update(self, grads, state, params=None) -> tuple[Any, Any]: ...

    def with_hparams(self, state, hparams: OptHParams, groups: GroupState | None = None) -> Any: ...

    def hparams(self, state) -> OptHParams: ...

    def learning_rate(self, state) -> jax.Array: ...

    def with_plateau_scale(self, state, scale: jax.Array) -> Any: ...


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """adam, adamw or sgd with momentum, the schedule's shape and optional clipping by global norm: a
    `TrainerOptimizer`. Every update applies learning_rate * shape(count) * scale."""

    name: str  # one of OPTIMIZERS
    shape: optax.Schedule  # the schedule of peak 1, of the 0-based step index
    defaults: tuple[float, ...]  # OptHParams' values for `init`
    clip_norm: float = 0.0
    momentum: bool = True  # sgd: keep a momentum trace (False where momentum is 0: no trace to keep or update)
    # Fine-tuning (host/finetune.py): each parameter's group, in tree-flatten order; the groups' first trainable
    # epochs and rate multipliers; the steps of an epoch (the epoch of a step decides what trains). None: off.
    groups: tuple[int, ...] | None = None
    group_names: tuple[str, ...] = ()  # bottom to top: metrics.jsonl's learning_rate/<group>
    trainable_from: tuple[int, ...] = ()
    rate_scale: tuple[float, ...] = ()
    steps_per_epoch: int = 1

    def init(self, params) -> OptState:
        hparams = OptHParams(*(jnp.asarray(v, jnp.float32) for v in self.defaults))
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        one = jnp.ones((), jnp.float32)
        count = jnp.zeros((), jnp.int32)
        mu = zeros() if self.name != "sgd" or self.momentum else None
        nu = None if self.name == "sgd" else zeros()
        groups = None
        if self.groups is not None:
            ones = jnp.ones(len(self.trainable_from), jnp.float32)
            groups = GroupState(jnp.asarray(self.trainable_from, jnp.int32), jnp.asarray(self.rate_scale, jnp.float32),
                                ones, ones)  # fmt: skip
        return OptState(count, self._shape_at(count), hparams, one, one, mu, nu, groups)

    def with_hparams(self, state: OptState, hparams: OptHParams, groups: GroupState | None = None) -> OptState:
        state = state._replace(hparams=hparams)
        return state if groups is None else state._replace(groups=groups)

    def hparams(self, state: OptState) -> OptHParams:
        return state.hparams

    def learning_rate(self, state: OptState) -> jax.Array:
        return learning_rate_of(state)

    def with_plateau_scale(self, state: OptState, scale: jax.Array) -> OptState:
        return _with_scale(state, scale)

    def _shape_at(self, count: jax.Array) -> jax.Array:
        return jnp.asarray(self.shape(count), jnp.float32)

    def update(self, grads, state: OptState, params=None):
        if state.groups is not None:
            return self._update_groups(grads, state, params)
        h = state.hparams
        b1_power, b2_power = state.b1_power, state.b2_power
        if self.name != "sgd":
            b1_power, b2_power = b1_power * h.b1, b2_power * h.b2
        same = lambda power: jax.tree.map(lambda _: power, grads)
        updates, mu, nu, shape = self._step(grads, state, params, same(b1_power), same(b2_power))
        return updates, OptState(state.count + 1, shape, h, b1_power, b2_power, mu, nu)

    def _step(self, grads, state: OptState, params, b1_power, b2_power):
        """(updates, mu, nu, shape): the step, with each parameter's bias-correction powers (already advanced;
        trees shaped as the params: the run's powers everywhere, or fine-tuning's group's)."""
        h = state.hparams
        if self.clip_norm > 0:
            grads, _ = optax.clip_by_global_norm(self.clip_norm).update(grads, optax.EmptyState())
        shape = self._shape_at(state.count)
        rate = h.learning_rate * shape * h.scale
        nu = state.nu
        if self.name == "sgd":  # optax.sgd: trace (mu = g + momentum * mu), then -rate * mu
            mu = jax.tree.map(lambda g, t: g + h.momentum * t, grads, state.mu) if self.momentum else None
            direction = mu if self.momentum else grads
        else:  # optax.adam's moments and bias correction; adamw adds the decayed weights
            mu = jax.tree.map(lambda g, t: (1 - h.b1) * g + h.b1 * t, grads, state.mu)
            nu = jax.tree.map(lambda g, t: (1 - h.b2) * (g * g) + h.b2 * t, grads, state.nu)
            correct = lambda m, v, p1, p2: (m / (1 - p1)) / (jnp.sqrt(v / (1 - p2)) + ADAM_EPS)
            direction = jax.tree.map(correct, mu, nu, b1_power, b2_power)
            if self.name == "adamw":
                direction = jax.tree.map(lambda d, p: d + h.weight_decay * p, direction, params)
        return jax.tree.map(lambda d: -rate * d, direction), mu, nu, shape

    def _update_groups(self, grads, state: OptState, params):
        """`update` with fine-tuning's groups: a group before its first trainable epoch keeps its parameters and
        its moments (zeros) exactly and counts no update; each group's Adam bias correction counts its own
        updates, so its moments start when it unfreezes; its rate is multiplied by its rate_scale."""
        g, h = state.groups, state.hparams
        trains_g = state.count // self.steps_per_epoch + 1 >= g.trainable_from  # bool [G]: this step's epoch
        treedef = jax.tree.structure(grads)
        index = jnp.asarray(self.groups, jnp.int32)  # each leaf's group
        per_leaf = lambda values_g: jax.tree.unflatten(treedef, list(values_g[index]))
        b1_g = jnp.where(trains_g, g.b1_power * h.b1, g.b1_power) if self.name != "sgd" else g.b1_power
        b2_g = jnp.where(trains_g, g.b2_power * h.b2, g.b2_power) if self.name != "sgd" else g.b2_power
        updates, mu, nu, shape = self._step(grads, state, params, per_leaf(b1_g), per_leaf(b2_g))
        trains, rate = per_leaf(trains_g), per_leaf(g.rate_scale)
        updates = jax.tree.map(lambda u, t, r: jnp.where(t, u * r, jnp.zeros_like(u)), updates, trains, rate)
        keep = lambda new, old: None if new is None else jax.tree.map(jnp.where, trains, new, old)
        groups = g._replace(b1_power=b1_g, b2_power=b2_g)
        out = OptState(
            state.count + 1, shape, h, state.b1_power, state.b2_power, keep(mu, state.mu), keep(nu, state.nu)
        )
        return updates, out._replace(groups=groups)


def optimizer_spec(spec: Mapping[str, Any]) -> dict:
    """An optimizer spec with the defaults filled in, its schedule too."""
    full = {**OPTIMIZER_DEFAULTS, **dict(spec)}
    full["schedule"] = schedule_spec(full.get("schedule"))
    return full


def hparams_of(spec: Mapping[str, Any]) -> OptHParams:
    """The spec's OptHParams as Python floats (scale 1): a run's values for TrainerOptimizer.with_hparams, whichever
    optimizer the spec names (a sweep stacks each run's on the run axis)."""
    o = optimizer_spec(spec)
    return OptHParams(
        float(o["learning_rate"]), 1.0, float(o["b1"]), float(o["b2"]), float(o["weight_decay"]), float(o["momentum"])
    )


def make_optimizer(spec: Mapping[str, Any], steps_per_epoch: int, total_epochs: int) -> Optimizer:
    """The `Optimizer` of an optimizer spec (the config's `optimizer` section); ValueError naming a bad key."""
    o = optimizer_spec(spec)
    if o["name"] not in OPTIMIZERS:
        raise ValueError(f'config.optimizer.name = "{o["name"]}" is not a known optimizer. Use one of {OPTIMIZERS}.')
    if not o["learning_rate"] > 0:
        raise ValueError(
            f"config.optimizer.learning_rate = {o['learning_rate']!r}. The learning rate must be positive."
        )
    clip_norm = float(o["clip_norm"])
    if clip_norm < 0:
        raise ValueError(f"config.optimizer.clip_norm = {clip_norm!r}. Use 0 (off) or a positive global norm.")
    shape = make_schedule(o["schedule"], 1.0, steps_per_epoch, total_epochs)
    return Optimizer(o["name"], shape, tuple(hparams_of(o)), clip_norm, momentum=float(o["momentum"]) != 0.0)


def evaluation_state(tx, state):
    """`state` (a TrainState) as evaluation sees it: its parameters replaced by the optimizer's `eval_params`
    where it has them (TrainerOptimizer), and its model state by `eval_model_state` where it has that (SWA's
    statistics recomputed for its average), else `state` itself (the same object: nothing is traced for it)."""
    eval_params = getattr(tx, "eval_params", None)
    if eval_params is None:
        return state
    state = state._replace(params=eval_params(state.opt_state, state.params))
    eval_model_state = getattr(tx, "eval_model_state", None)
    if eval_model_state is None:
        return state
    return state._replace(model_state=eval_model_state(state.opt_state, state.model_state))


def evaluation_states(tx, states):
    """evaluation_state of runs' states (a leading run axis), as the host computes it for the final states and
    `jaxepochs.load`: one function, so the two agree to the bit."""
    if getattr(tx, "eval_params", None) is None:
        return states
    return jax.vmap(functools.partial(evaluation_state, tx))(states)


def learning_rate_of(opt_state: OptState, plateau_state: PlateauState | None = None) -> jax.Array:
    """The rate the last update applied (the built-in Optimizer's state; the trainer asks its optimizer's
    `learning_rate`: TrainerOptimizer): after an epoch, the value at its last step, plateau scale included (before
    any update: the first step's rate).

    With `plateau_state`, the rate of that same step under plateau_state's scale instead of the scale it ran
    with (after `plateau_update`: the rate the plateau decision gives that step).
    """
    h = opt_state.hparams
    scale = h.scale if plateau_state is None else plateau_state.scale
    return h.learning_rate * opt_state.shape * scale


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner"], meta_fields=["settings"])
@dataclasses.dataclass(frozen=True)
class PlateauState:
    """optax's ReduceLROnPlateauState (advanced once per epoch) and the static settings that made it."""

    inner: optax.contrib.ReduceLROnPlateauState
    settings: tuple[tuple[str, Any], ...]  # reduce_on_plateau's keyword arguments, hashable

    @property
    def scale(self) -> jax.Array:
        """The multiplier of the learning rate: factor ** reductions, floored at min_learning_rate."""
        return self.inner.scale


def plateau_init(spec: Mapping[str, Any]) -> PlateauState | None:
    """The reduce_on_plateau state of an optimizer spec (scale 1), or None when its schedule is another one."""
    o = optimizer_spec(spec)
    s = o["schedule"]
    if s["name"] != "reduce_on_plateau":
        return None
    validate_schedule(s, math.inf)  # make_optimizer checks warmup_epochs against the run's epochs
    min_scale = s["min_learning_rate"] / o["learning_rate"]
    if min_scale > 1:
        raise ValueError(
            f"config.optimizer.schedule.min_learning_rate = {s['min_learning_rate']!r} is above "
            f"optimizer.learning_rate ({o['learning_rate']!r}). Use a floor below the learning rate."
        )
    settings = (
        ("factor", float(s["factor"])),
        ("patience", int(s["patience"])),
        ("rtol", float(s["rtol"])),
        ("atol", float(s["atol"])),
        ("cooldown", int(s["cooldown"])),
        ("accumulation_size", 1),  # one value per epoch: every value is a decision
        ("min_scale", float(min_scale)),
    )
    inner = optax.contrib.reduce_on_plateau(**dict(settings)).init(jnp.zeros((), jnp.float32))
    return PlateauState(inner, settings)


def plateau_update(plateau_state: PlateauState, value: jax.typing.ArrayLike) -> PlateauState:
    """Feeds one epoch's monitored value to reduce_on_plateau. Pure; call once per epoch, after evaluation."""
    tx = optax.contrib.reduce_on_plateau(**dict(plateau_state.settings))
    _, inner = tx.update(jnp.zeros((), jnp.float32), plateau_state.inner, value=value)
    return dataclasses.replace(plateau_state, inner=inner)


def with_plateau_scale(opt_state: OptState, plateau_state: PlateauState | None) -> OptState:
    """`opt_state` (the built-in Optimizer's) whose next updates apply the plateau's scale; unchanged shapes and
    dtypes. Pure. (The trainer calls its optimizer's `with_plateau_scale`: TrainerOptimizer.)"""
    return opt_state if plateau_state is None else _with_scale(opt_state, plateau_state.scale)


def _with_scale(opt_state: OptState, scale: jax.typing.ArrayLike) -> OptState:
    h = opt_state.hparams
    return opt_state._replace(hparams=h._replace(scale=jnp.asarray(scale, h.scale.dtype).reshape(h.scale.shape)))
