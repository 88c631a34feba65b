"""Learning-rate schedules written in epochs, built by optax in steps, and the optimizers that apply them.

The user writes every length in epochs (fractions allowed); the trainer passes `steps_per_epoch` and the run's
epochs, and each length becomes `epochs_to_steps(epochs, steps_per_epoch)` = round(epochs * steps_per_epoch)
steps (halves round up). optax builds every schedule and does all optimizer math.

`make_optimizer` wraps the whole optimizer (gradient clipping included) in `optax.inject_hyperparams`, so the
learning rate is an array in the state: `opt_state.hyperparams["learning_rate"]` is the rate the last update
applied (before the first update, the first step's rate). After an epoch of S steps, e.g. the k-th (1-based),
it is `schedule(k * S - 1)`: the value at the epoch's last step. The schedule's peak `learning_rate` and the
reduce_on_plateau scale are arrays in that state too, so runs that differ only in them share one program.

reduce_on_plateau (`optax.contrib.reduce_on_plateau`) sees one monitored value per epoch. Its state lives
outside the per-step optimizer; the trainer advances it once per epoch and copies its scale into `opt_state`:

    tx = make_optimizer(config.optimizer, steps_per_epoch, config.train.epochs)
    opt_state = tx.init(params)
    plateau_state = plateau_init(config.optimizer)  # None unless schedule.name == "reduce_on_plateau"
    for epoch in ...:
        ...every step: updates, opt_state = tx.update(grads, opt_state, params)  (unchanged)
        lr = learning_rate_of(opt_state)  # the rate of the epoch's last step, plateau scale included
        if plateau_state is not None:
            value = row[config.optimizer.schedule.monitor]  # e.g. the epoch's val_loss
            plateau_state = plateau_update(plateau_state, value)
            opt_state = with_plateau_scale(opt_state, plateau_state)  # same shapes and dtypes: no recompile

Both plateau functions are pure and work under `jax.jit`; checkpoint `plateau_state` with `opt_state`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
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
_KEY = "optimizer.schedule."


def schedule_config() -> ml_collections.ConfigDict:
    """The keys of `optimizer.schedule`, with their defaults. Every length is in epochs; fractions allowed."""
    s = ml_collections.ConfigDict()
    s.name = "constant"  # one of SCHEDULES
    s.warmup_epochs = 0.0  # linear ramp from 0 (constant, warmup_cosine, step, exponential, reduce_on_plateau)
    s.decay_epochs = 0.0  # warmup_cosine, one_cycle*: where the decay ends; 0 = at the end of training
    s.final_fraction = 0.0  # warmup_cosine: decays to learning_rate * final_fraction
    s.boundaries_epochs = ()  # step: the rate is multiplied by `factor` at each of these epochs
    s.factor = 0.1  # step and reduce_on_plateau: the multiplier at each reduction
    s.rate_per_epoch = 0.95  # exponential: learning_rate * rate_per_epoch ** (step / steps_per_epoch)
    s.pct_start = 0.3  # one_cycle*: fraction of the cycle spent rising to learning_rate
    s.div_factor = 25.0  # one_cycle*: starts at learning_rate / div_factor
    s.final_div_factor = 1e4  # one_cycle*: ends at learning_rate / (div_factor * final_div_factor)
    s.patience = 10  # reduce_on_plateau: epochs without improvement before reducing (the patience-th one)
    s.cooldown = 0  # reduce_on_plateau: epochs after a reduction during which none can happen
    s.min_learning_rate = 0.0  # reduce_on_plateau: absolute floor of the reduced rate
    s.rtol = 1e-4  # reduce_on_plateau: an improvement is value < (1 - rtol) * best - atol
    s.atol = 0.0
    s.monitor = "val_loss"  # reduce_on_plateau: the per-epoch metric it watches (one of MONITORS)
    return s


def optimizer_config() -> ml_collections.ConfigDict:
    """The keys of the `optimizer` section, with their defaults."""
    o = ml_collections.ConfigDict()
    o.name = "adam"  # one of OPTIMIZERS
    o.learning_rate = 1e-2  # the peak rate; schedules scale it
    o.momentum = 0.9  # sgd only
    o.b1 = 0.9  # adam, adamw: decay of the first moment
    o.b2 = 0.999  # adam, adamw: decay of the second moment
    o.weight_decay = 1e-4  # adamw only
    o.clip_norm = 0.0  # clip gradients to this global norm before the optimizer; 0 = off
    o.schedule = schedule_config()
    return o


def _schedule_section(opt_or_schedule_cfg: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The schedule section, defaults filled in (configs from before schedules existed have none)."""
    full = schedule_config()
    if opt_or_schedule_cfg is not None:
        full.update(opt_or_schedule_cfg.to_dict())
    return full


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """round(epochs * steps_per_epoch), halves rounded up: 0.5 epoch of 10 steps is 5 steps, 0.25 is 3."""
    return math.floor(epochs * steps_per_epoch + 0.5)


def validate_schedule(cfg: ml_collections.ConfigDict, total_epochs: int) -> None:
    """Raises ValueError naming the `optimizer.schedule` key and the fix, for a schedule that cannot run."""
    s = _schedule_section(cfg)

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
    schedule_cfg: ml_collections.ConfigDict, learning_rate: float, steps_per_epoch: int, total_epochs: int
) -> optax.Schedule:
    """The step-indexed optax schedule of `optimizer.schedule` (reduce_on_plateau: its constant part)."""
    s = _schedule_section(schedule_cfg)
    validate_schedule(s, total_epochs)
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


class ScheduleState(NamedTuple):
    """The learning rate's state inside `inject_hyperparams`: rate = learning_rate * shape(count) * scale."""

    count: jax.Array  # int32 [] updates taken
    learning_rate: jax.Array  # float32 [] the peak rate the schedule's shape multiplies
    scale: jax.Array  # float32 [] reduce_on_plateau's multiplier; 1 for every other schedule
    shape: jax.Array  # float32 [] shape(count) of the last update (before any, of the first)


class EpochSchedule(optax.schedules.StatefulSchedule):
    """A step-indexed schedule of peak 1 (`shape`) times a peak rate and a plateau scale held in the state."""

    def __init__(self, shape: optax.Schedule, learning_rate: float):
        self.shape = shape
        self.learning_rate = learning_rate

    def _shape_at(self, count: jax.Array) -> jax.Array:
        return jnp.asarray(self.shape(count), jnp.float32)

    def init(self) -> ScheduleState:
        count = jnp.zeros((), jnp.int32)
        lr = jnp.asarray(self.learning_rate, jnp.float32)
        return ScheduleState(count, lr, jnp.ones((), jnp.float32), self._shape_at(count))

    def update(self, state: ScheduleState, **extra_args) -> ScheduleState:
        del extra_args
        return state._replace(count=optax.safe_increment(state.count), shape=self._shape_at(state.count))

    def __call__(self, state: ScheduleState, **extra_args) -> jax.Array:
        del extra_args
        return state.learning_rate * self._shape_at(state.count) * state.scale


def _clipped(tx: optax.GradientTransformation, clip_norm: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm > 0 else tx


def _adam(learning_rate, b1, b2, clip_norm):
    return _clipped(optax.adam(learning_rate, b1=b1, b2=b2), clip_norm)


def _adamw(learning_rate, b1, b2, weight_decay, clip_norm):
    return _clipped(optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay), clip_norm)


def _sgd(learning_rate, momentum, clip_norm):
    return _clipped(optax.sgd(learning_rate, momentum=momentum), clip_norm)


def make_optimizer(
    opt_cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_epochs: int
) -> optax.GradientTransformation:
    """adam/adamw/sgd with the epoch schedule and optional clipping, inside `optax.inject_hyperparams`.

    `opt_state.hyperparams` holds learning_rate (the rate the last update applied), and momentum (sgd) or
    weight_decay (adamw). With `clip_norm` > 0 gradients are clipped to that global norm first.
    """
    o = opt_cfg
    if o.name not in OPTIMIZERS:
        raise ValueError(f'config.optimizer.name = "{o.name}" is not a known optimizer. Use one of {OPTIMIZERS}.')
    if not o.learning_rate > 0:
        raise ValueError(f"config.optimizer.learning_rate = {o.learning_rate!r}. The learning rate must be positive.")
    clip_norm = float(o.get("clip_norm", 0.0))
    if clip_norm < 0:
        raise ValueError(f"config.optimizer.clip_norm = {clip_norm!r}. Use 0 (off) or a positive global norm.")
    shape = make_schedule(o.get("schedule"), 1.0, steps_per_epoch, total_epochs)
    lr = EpochSchedule(shape, float(o.learning_rate))
    inject = functools.partial(optax.inject_hyperparams, static_args="clip_norm")
    betas = {"b1": float(o.get("b1", 0.9)), "b2": float(o.get("b2", 0.999))}
    if o.name == "adam":
        return inject(_adam)(learning_rate=lr, **betas, clip_norm=clip_norm)
    if o.name == "adamw":
        return inject(_adamw)(learning_rate=lr, **betas, weight_decay=o.weight_decay, clip_norm=clip_norm)
    return inject(_sgd)(learning_rate=lr, momentum=o.momentum, clip_norm=clip_norm)


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


def plateau_init(opt_cfg: ml_collections.ConfigDict) -> PlateauState | None:
    """The reduce_on_plateau state of `optimizer` (scale 1), or None when the schedule is another one."""
    s = _schedule_section(opt_cfg.get("schedule"))
    if s.name != "reduce_on_plateau":
        return None
    validate_schedule(s, math.inf)  # make_optimizer checks warmup_epochs against the run's epochs
    min_scale = s.min_learning_rate / opt_cfg.learning_rate
    if min_scale > 1:
        raise ValueError(
            f"config.{_KEY}min_learning_rate = {s.min_learning_rate!r} is above optimizer.learning_rate "
            f"({opt_cfg.learning_rate!r}). Use a floor below the learning rate."
        )
    settings = (
        ("factor", float(s.factor)),
        ("patience", int(s.patience)),
        ("rtol", float(s.rtol)),
        ("atol", float(s.atol)),
        ("cooldown", int(s.cooldown)),
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


def _schedule_state(opt_state) -> ScheduleState:
    return opt_state.hyperparams_states["learning_rate"]


def with_plateau_scale(opt_state, plateau_state: PlateauState | None):
    """`opt_state` whose next updates apply the plateau's scale; unchanged shapes and dtypes. Pure."""
    if plateau_state is None:
        return opt_state
    old = _schedule_state(opt_state)
    new = old._replace(scale=jnp.asarray(plateau_state.scale, old.scale.dtype).reshape(old.scale.shape))
    return opt_state._replace(hyperparams_states={**opt_state.hyperparams_states, "learning_rate": new})


def learning_rate_of(opt_state, plateau_state: PlateauState | None = None) -> jax.Array:
    """The rate the last update applied: after an epoch, the value at its last step, plateau scale included.

    With `plateau_state`, the rate of that same step under plateau_state's scale instead of the scale it ran
    with (after `plateau_update`: the rate the plateau decision gives that step), in either call order.
    """
    if plateau_state is None:
        return opt_state.hyperparams["learning_rate"]
    s = _schedule_state(opt_state)
    return s.learning_rate * s.shape * plateau_state.scale
