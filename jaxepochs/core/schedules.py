"""Learning-rate schedules written in epochs: pure functions of plain values (no config objects).

The user writes every length in epochs (fractions allowed); the trainer passes `steps_per_epoch` and the run's
epochs, and each length becomes `epochs_to_steps(epochs, steps_per_epoch)` = round(epochs * steps_per_epoch)
steps (halves round up). optax builds every schedule's shape; the optimizer (core/optim.py) evaluates the shape of
peak 1 once per step and multiplies it by the peak rate and reduce_on_plateau's scale.

    validate_schedule(spec, total_epochs)                             # ValueError naming the key and the fix
    shape = make_schedule(spec, 1.0, steps_per_epoch, total_epochs)   # step -> multiplier of the peak rate

reduce_on_plateau is the constant schedule here; its per-epoch reductions are core/optim.py's `plateau_update`.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Mapping
from typing import Any

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
MONITORS = ("val_loss", "train_loss")  # reduce_on_plateau minimizes: a loss, not an accuracy
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
