"""Optimizers and learning-rate schedules written in epochs: pure functions of plain values (no config objects).

The user writes every length in epochs (fractions allowed); the trainer passes `steps_per_epoch` and the run's
epochs, and each length becomes `epochs_to_steps(epochs, steps_per_epoch)` = round(epochs * steps_per_epoch)
steps (halves round up). optax builds every schedule's shape (peak 1); the optimizer multiplies it by the peak
rate and reduce_on_plateau's scale.

`make_optimizer` returns adam, adamw or sgd (momentum) with gradient clipping, whose state holds every number a
sweep may vary as an array (`OptHParams`: the peak rate, the plateau scale, Adam's betas, weight decay,
momentum), so runs that differ only in them share one compiled program and `jax.vmap` batches them. One counter
drives the schedule and Adam's bias correction; the schedule is evaluated once per step. (It replaced
`optax.inject_hyperparams`, whose three counters and rebuilt inner optimizer cost about 0.45 us per step at
batch size 1 on CPU, and whose `b ** count` rounds differently batched and unbatched: a sweep member parted from
its solo run in the 7th digit.)

    tx = make_optimizer(spec, steps_per_epoch, epochs)   # spec: name, learning_rate, ..., schedule: {...}
    opt_state = tx.init(params)                          # OptState; opt_state.hparams may be replaced per run
    updates, opt_state = tx.update(grads, opt_state, params)
    learning_rate_of(opt_state)                          # the rate the last update applied

reduce_on_plateau (`optax.contrib.reduce_on_plateau`) sees one monitored value per epoch: `plateau_init`,
`plateau_update` (pure) and `with_plateau_scale`, which writes its scale into the optimizer's state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = (
    "constant",
    "warmup_cosine",
    "one_cycle",
    "one_cycle_linear",
    "step",
    "exponential",
    "reduce_on_plateau",
)
OPTIMIZERS = ("adam", "adamw", "sgd")
MONITORS = ("val_loss", "train_loss")  # reduce_on_plateau minimizes: a loss, not an accuracy
ADAM_EPS = 1e-8  # optax.adam's default
_KEY = "optimizer.schedule."

# The keys of a schedule spec (the config's `optimizer.schedule`), with their defaults. Lengths are in epochs.
SCHEDULE_DEFAULTS = {
    "name": "constant",  # one of SCHEDULES
    "warmup_epochs": 0.0,  # linear ramp from 0 (constant, warmup_cosine, step, exponential, reduce_on_plateau)
    "decay_epochs": 0.0,  # warmup_cosine, one_cycle*: where the decay ends; 0 = at the end of training
    "final_fraction": 0.0,  # warmup_cosine: decays to learning_rate * final_fraction
    "boundaries_epochs": (),  # step: the rate is multiplied by `factor` at each of these epochs
    "factor": 0.1,  # step and reduce_on_plateau: the multiplier at each reduction
    "rate_per_epoch": 0.95,  # exponential: learning_rate * rate_per_epoch ** (step / steps_per_epoch)
    "pct_start": 0.3,  # one_cycle*: fraction of the cycle spent rising to learning_rate
    "div_factor": 25.0,  # one_cycle*: starts at learning_rate / div_factor
    "final_div_factor": 1e4,  # one_cycle*: ends at learning_rate / (div_factor * final_div_factor)
    "patience": 10,  # reduce_on_plateau: epochs without improvement before reducing (the patience-th one)
    "cooldown": 0,  # reduce_on_plateau: epochs after a reduction during which none can happen
    "min_learning_rate": 0.0,  # reduce_on_plateau: absolute floor of the reduced rate
    "rtol": 1e-4,  # reduce_on_plateau: an improvement is value < (1 - rtol) * best - atol
    "atol": 0.0,
    "monitor": "val_loss",  # reduce_on_plateau: the per-epoch metric it watches (one of MONITORS)
}
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


def schedule_spec(spec: Mapping[str, Any] | None) -> dict:
    """A schedule spec with the defaults filled in (an `optimizer` section from before schedules has none)."""
    return {**SCHEDULE_DEFAULTS, **(dict(spec) if spec is not None else {})}


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """round(epochs * steps_per_epoch), halves rounded up: 0.5 epoch of 10 steps is 5 steps, 0.25 is 3."""
    return math.floor(epochs * steps_per_epoch + 0.5)


def _namespace(spec: dict) -> types.SimpleNamespace:
    return types.SimpleNamespace(**spec)


def validate_schedule(spec: Mapping[str, Any] | None, total_epochs: float) -> None:
    """Raises ValueError naming the `optimizer.schedule` key and the fix, for a schedule that cannot run."""
    s = _namespace(schedule_spec(spec))

    def fail(key: str, problem: str, fix: str) -> None:
        raise ValueError(f"config.{_KEY}{key} = {problem}. {fix}")

    if s.name not in SCHEDULES:
        fail("name", f'"{s.name}" is not a known schedule', f"Use one of {SCHEDULES}.")
    if not 0.0 <= s.warmup_epochs <= total_epochs:
        fail("warmup_epochs", f"{s.warmup_epochs!r}", f"Use 0 to train.epochs ({total_epochs}) epochs.")
    if s.name.startswith("one_cycle") and s.warmup_epochs > 0:
        fail(
            "warmup_epochs",
            f"{s.warmup_epochs!r}",
            "one_cycle rises over pct_start of the cycle; set it to 0.",
        )
    if s.decay_epochs < 0:
        fail("decay_epochs", f"{s.decay_epochs!r}", "Use 0 (decay until the end of training) or more epochs.")
    if s.name == "warmup_cosine":
        decay_end = s.decay_epochs or total_epochs
        if total_epochs > 0 and decay_end <= s.warmup_epochs:
            fail(
                "decay_epochs",
                f"{s.decay_epochs!r} (decay ends at epoch {decay_end}, warmup at {s.warmup_epochs})",
                "The decay must end after the warmup: lower warmup_epochs or raise decay_epochs.",
            )
        if not 0.0 <= s.final_fraction <= 1.0:
            fail("final_fraction", f"{s.final_fraction!r}", "Use a fraction of learning_rate in [0, 1].")
    if s.name.startswith("one_cycle"):
        if not 0.0 < s.pct_start < 1.0:
            fail("pct_start", f"{s.pct_start!r}", "Use a fraction of the cycle in (0, 1).")
        if not s.div_factor > 0 or not s.final_div_factor > 0:
            fail("div_factor/final_div_factor", f"{s.div_factor!r}/{s.final_div_factor!r}", "Both must be > 0.")
    if s.name == "step":
        bounds = tuple(s.boundaries_epochs)
        if not bounds:
            fail(
                "boundaries_epochs",
                "()",
                "Give the epochs at which to multiply the rate by factor, e.g. (30, 60).",
            )
        if bounds[0] <= 0 or any(b <= a for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
            fail("boundaries_epochs", f"{bounds}", "Boundaries must be positive and strictly increasing.")
    if s.name in ("step", "reduce_on_plateau") and not 0.0 < s.factor <= 1.0:
        fail("factor", f"{s.factor!r}", "Use a multiplier in (0, 1], e.g. 0.1.")
    if s.name == "exponential" and not s.rate_per_epoch > 0:
        fail("rate_per_epoch", f"{s.rate_per_epoch!r}", "Use a positive multiplier per epoch, e.g. 0.95.")
    if s.name == "reduce_on_plateau":
        if s.factor == 1.0:
            fail(
                "factor",
                "1.0",
                "reduce_on_plateau needs factor < 1; use schedule.name='constant' for no decay.",
            )
        if not isinstance(s.patience, int) or s.patience < 1:
            # optax counts epochs without improvement and reduces when the count equals patience; with 0 it
            # would reduce on every improvement instead.
            fail("patience", f"{s.patience!r}", "Use a whole number of epochs, 1 or more.")
        if not isinstance(s.cooldown, int) or s.cooldown < 0:
            fail("cooldown", f"{s.cooldown!r}", "Use a whole number of epochs, 0 or more.")
        if s.min_learning_rate < 0:
            fail("min_learning_rate", f"{s.min_learning_rate!r}", "Use 0 (no floor) or a positive rate.")
        if s.rtol < 0 or s.atol < 0 or s.rtol > 1 or (s.rtol == 0 and s.atol == 0):
            fail("rtol/atol", f"{s.rtol!r}/{s.atol!r}", "Use 0 <= rtol <= 1 and atol >= 0, not both 0.")
        if s.monitor not in MONITORS:
            fail("monitor", f'"{s.monitor}"', f"Use one of {MONITORS}.")


def _with_warmup(schedule: optax.Schedule, warmup_steps: int) -> optax.Schedule:
    """A linear ramp from 0 to schedule(warmup_steps), then `schedule` at its own (absolute) step."""
    if warmup_steps == 0:
        return schedule
    ramp = optax.linear_schedule(0.0, float(schedule(warmup_steps)), warmup_steps)
    return optax.join_schedules([ramp, lambda count: schedule(count + warmup_steps)], [warmup_steps])


def make_schedule(
    spec: Mapping[str, Any] | None, learning_rate: float, steps_per_epoch: int, total_epochs: int
) -> optax.Schedule:
    """The step-indexed optax schedule of `optimizer.schedule` (reduce_on_plateau: its constant part)."""
    validate_schedule(spec, total_epochs)
    s = _namespace(schedule_spec(spec))
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch = {steps_per_epoch!r}; it must be a positive integer.")
    to_steps = functools.partial(epochs_to_steps, steps_per_epoch=steps_per_epoch)
    warmup = to_steps(s.warmup_epochs)
    decay_end = to_steps(s.decay_epochs) if s.decay_epochs > 0 else total_epochs * steps_per_epoch
    lr = learning_rate
    if s.name == "warmup_cosine":
        # optax's decay_steps is the whole length, warmup included. With 0 epochs no step is ever taken.
        decay_steps = max(decay_end, warmup + 1)
        if total_epochs > 0 and decay_end <= warmup:
            raise ValueError(
                f"config.{_KEY}decay_epochs: the decay ends at step {decay_end}, not after the {warmup} "
                f"warmup steps ({steps_per_epoch} steps per epoch). Lengthen the decay or shorten the warmup."
            )
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, end_value=lr * s.final_fraction)
    if s.name == "one_cycle":
        return optax.cosine_onecycle_schedule(max(decay_end, 1), lr, s.pct_start, s.div_factor, s.final_div_factor)
    if s.name == "one_cycle_linear":
        return optax.linear_onecycle_schedule(
            max(decay_end, 1), lr, s.pct_start, div_factor=s.div_factor, final_div_factor=s.final_div_factor
        )
    if s.name == "step":
        bounds = [to_steps(b) for b in s.boundaries_epochs]
        if len(set(bounds)) != len(bounds):
            raise ValueError(
                f"config.{_KEY}boundaries_epochs = {tuple(s.boundaries_epochs)} fall on steps {bounds} at "
                f"{steps_per_epoch} steps per epoch; two share a step. Space them further apart."
            )
        schedule = optax.piecewise_constant_schedule(lr, {b: s.factor for b in bounds})
    elif s.name == "exponential":
        schedule = optax.exponential_decay(lr, transition_steps=steps_per_epoch, decay_rate=s.rate_per_epoch)
    else:  # constant, reduce_on_plateau
        schedule = optax.constant_schedule(lr)
    return _with_warmup(schedule, warmup)


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


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """adam, adamw or sgd with momentum, the schedule's shape and optional clipping by global norm; `init` and
    `update` as an optax GradientTransformation's. Every update applies learning_rate * shape(count) * scale."""

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
    """The spec's OptHParams as Python floats (scale 1)."""
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


def learning_rate_of(opt_state: OptState, plateau_state: PlateauState | None = None) -> jax.Array:
    """The rate the last update applied: after an epoch, the value at its last step, plateau scale included
    (before any update: the first step's rate).

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
            f"config.{_KEY}min_learning_rate = {s['min_learning_rate']!r} is above optimizer.learning_rate "
            f"({o['learning_rate']!r}). Use a floor below the learning rate."
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
    """`opt_state` whose next updates apply the plateau's scale; unchanged shapes and dtypes. Pure."""
    if plateau_state is None:
        return opt_state
    h = opt_state.hparams
    scale = jnp.asarray(plateau_state.scale, h.scale.dtype).reshape(h.scale.shape)
    return opt_state._replace(hparams=h._replace(scale=scale))
