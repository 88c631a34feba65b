"""The host's cadence (checkpoints every n epochs or t seconds, and on request; the pace of the calls) and its loop."""

from __future__ import annotations

import types

import pytest

from jaxepochs.host import driver
from jaxepochs.host.cadence import Pace, Periodic


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_periodic_by_epochs_is_due_on_multiples_and_tells_how_far_the_next_is():
    every3 = Periodic(every_epochs=3)
    assert [e for e in range(1, 10) if every3.due(e)] == [3, 6, 9]
    assert [every3.epochs_left(e) for e in (0, 1, 2, 3, 4)] == [3, 2, 1, 3, 2]
    assert every3.seconds_left() is None


def test_periodic_by_seconds_counts_from_the_last_action_and_can_be_requested():
    clock = Clock()
    periodic = Periodic(every_epochs=0, every_seconds=30.0, clock=clock)
    clock.now = 29.0
    assert not periodic.due(5) and periodic.seconds_left() == 1.0 and periodic.epochs_left(5) is None
    clock.now = 31.0
    assert periodic.due(6)
    periodic.done()
    assert not periodic.due(7)
    periodic.request()
    assert periodic.due(7)
    periodic.done()
    assert not periodic.due(8)
    assert not Periodic(every_epochs=1, enabled=False).due(1)


def test_fixed_pace_is_capped_by_the_last_epoch_and_the_next_checkpoint():
    pace = Pace(fixed=4, interval=0.5, limit=4)
    never = Periodic(enabled=False)
    assert [pace.next(first, 10, never) for first in (1, 5, 9)] == [4, 4, 2]
    every3 = Periodic(every_epochs=3)
    assert [pace.next(first, 10, every3) for first in (1, 4, 7, 10)] == [3, 3, 3, 1]


def test_automatic_pace_grows_to_the_interval_from_measured_epochs():
    pace = Pace(fixed=0, interval=0.5, limit=512)
    never = Periodic(enabled=False)
    assert pace.next(1, 1000, never) == 1  # nothing measured yet
    pace.observe(1, 0.01)  # 10 ms per epoch: 50 epochs make 0.5 s
    assert pace.next(2, 1000, never) == 8  # at most 8 times the last call
    assert pace.next(10, 1000, never) == 50
    assert pace.next(60, 80, never) == 21  # never past the last epoch
    pace.observe(10, 0.001)  # 0.1 ms per epoch: the program's limit
    assert pace.next(100, 10_000, never) == 168 and pace.next(300, 10_000, never) == 512
    clock = Clock()
    timed = Periodic(every_seconds=1.0, clock=clock)
    pace.observe(1, 0.0625)
    clock.now = 0.75  # 0.25 s to the checkpoint: 4 epochs of 1/16 s, though 8 would fill the interval
    assert pace.next(2000, 10_000, timed) == 4


class _Ran:
    """A call's `ran` as the driver sees it: the epochs run, and whether they were done when the call returned."""

    def __init__(self, epochs: int, ready: bool):
        self.epochs, self.ready = epochs, ready

    def is_ready(self) -> bool:
        return self.ready

    def __int__(self) -> int:
        return self.epochs


@pytest.mark.parametrize("ready", [False, True], ids=["asynchronous", "synchronous"])
def test_the_next_call_overlaps_the_host_only_where_calls_are_asynchronous(ready):
    """An asynchronous call (GPU, TPU) is followed by the next before its rows are read; a call that returned
    finished (XLA's CPU client runs it in the calling thread) is followed after the host's work."""
    events = []

    def call(carry, first, count):
        events.append(("dispatch", first))
        return carry, types.SimpleNamespace(ran=_Ran(count, ready))

    def consume(rows, first, seconds, carry):
        events.append(("read", first))
        return False

    outcome = driver.drive(
        call,
        "carry",
        1,
        3,
        pace=Pace(fixed=1, interval=0.5, limit=1),
        checkpoints=Periodic(enabled=False),
        consume=consume,
        save=lambda carry, epoch: None,
        interrupted=lambda: False,
    )
    assert outcome.last_epoch == 3 and not outcome.halted
    overlapped = [("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2), ("read", 3)]
    in_turn = [("dispatch", 1), ("read", 1), ("dispatch", 2), ("read", 2), ("dispatch", 3), ("read", 3)]
    assert events == (in_turn if ready else overlapped)
