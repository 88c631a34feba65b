"""When the host acts: one cadence object for checkpoints (runs and sweeps alike), and the pace of the calls.

`Periodic` is CLU's `PeriodicAction` for epochs: due every `every_epochs` epochs, or, with 0, once
`every_seconds` have passed since it last ran; `request()` makes it due after the next call, on demand.
`Pace` chooses how many epochs the next compiled call runs: a fixed number, or as many as take about
`interval` seconds, measured from the calls so far; never past the last epoch or the next due checkpoint.
"""

from __future__ import annotations

import math
import time


class Periodic:
    """Due every `every_epochs` epochs (counted from epoch 0), or with 0 every `every_seconds` seconds; inside a
    streamed epoch (`due_inside`), every `every_steps` optimizer steps, or with 0 every `every_seconds`. One
    object for both, so a checkpoint inside an epoch and one at its end share the clock."""

    def __init__(self, every_epochs: int = 0, every_seconds: float = 0.0, *, enabled: bool = True, clock=None,
                 every_steps: int = 0, steps_per_epoch: int = 0, step: int = 0):  # fmt: skip
        self.every_epochs = every_epochs
        self.every_seconds = every_seconds
        self.every_steps = every_steps
        self.steps_per_epoch = steps_per_epoch  # epoch e ends at step e * steps_per_epoch
        self.enabled = enabled
        self._clock = clock or time.monotonic
        self._last_time = self._clock()
        self._last_step = step
        self._requested = False

    def due(self, epoch: int) -> bool:
        """Whether to act after `epoch` (1-based) is done."""
        if not self.enabled:
            return False
        if self._requested:
            return True
        if self.every_epochs:
            return epoch % self.every_epochs == 0
        return self._clock() - self._last_time >= self.every_seconds

    def due_inside(self, step: int) -> bool:
        """Whether to act inside an epoch, after optimizer step `step` (a streamed epoch's chunk)."""
        if not self.enabled:
            return False
        if self.every_steps:
            return step - self._last_step >= self.every_steps
        return self._clock() - self._last_time >= self.every_seconds

    def done(self, epoch: int | None = None, step: int | None = None) -> None:
        """Records that the action ran now: after `epoch` ended, or at optimizer `step` inside an epoch."""
        self._last_time = self._clock()
        self._requested = False
        if step is not None or epoch is not None:
            self._last_step = step if step is not None else epoch * self.steps_per_epoch

    def request(self) -> None:
        self._requested = True

    def epochs_left(self, epoch: int) -> int | None:
        """Epochs after `epoch` until the next due one, by the epoch count (None when time decides)."""
        if not self.enabled or not self.every_epochs:
            return None
        return self.every_epochs - epoch % self.every_epochs

    def seconds_left(self) -> float | None:
        """Seconds until it is due by time (None when the epoch count decides)."""
        if not self.enabled or self.every_epochs:
            return None
        return max(0.0, self.every_seconds - (self._clock() - self._last_time))


class Pace:
    """Epochs per call: `fixed` (> 0), or chosen so that a call takes about `interval` seconds, from the seconds
    per epoch of the last call (the first call runs one epoch; each call at most `growth` times the last)."""

    def __init__(self, fixed: int, interval: float, limit: int, growth: int = 8, boundaries=()):
        self.fixed = fixed
        self.boundaries = sorted(boundaries)  # epochs a call must start at (a profiled epoch and the one after)
        self.interval = interval
        self.limit = limit  # the program's K: the most epochs one call can run
        self.growth = growth
        self.seconds_per_epoch: float | None = None
        self._last = 1

    def observe(self, epochs: int, seconds: float) -> None:
        if epochs > 0 and seconds > 0:
            self.seconds_per_epoch = seconds / epochs

    def next(self, first_epoch: int, last_epoch: int, checkpoints: Periodic) -> int:
        """How many epochs to run from `first_epoch`."""
        if self.fixed:
            count = self.fixed
        elif self.seconds_per_epoch is None:
            count = 1
        else:
            count = min(round(self.interval / self.seconds_per_epoch), self._last * self.growth)
        count = min(max(count, 1), self.limit, last_epoch - first_epoch + 1)
        left = checkpoints.epochs_left(first_epoch - 1)
        if left is not None:
            count = min(count, left)
        seconds = checkpoints.seconds_left()
        if seconds is not None and self.seconds_per_epoch:
            count = min(count, max(1, math.ceil(seconds / self.seconds_per_epoch)))
        after = [b for b in self.boundaries if b > first_epoch]
        if after:
            count = min(count, after[0] - first_epoch)
        self._last = max(count, 1)
        return self._last
