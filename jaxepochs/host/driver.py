"""The host loop of runs and sweeps: call the run program, read its rows, checkpoint on the cadence.

On an asynchronous backend (GPU, TPU) the next call is dispatched before the last one's rows are read (its carry
is the last call's output, still on the device, and a halted run stays halted inside the program), so logging and
checkpointing overlap the device's next call and the device does not wait for the host. XLA's CPU client runs a
call in the dispatching thread: there the next call follows the host's work. The host meets the run once per
call; `Pace` sizes the calls. Nothing here runs per batch or per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxepochs.host import ctrl_c, devices
from jaxepochs.host.cadence import Pace, Periodic


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What the host loop needs of a config: its epochs, the pace of its calls, the checkpoints' cadence and
    the epochs to profile. Built once, after validation."""

    epochs: int  # the run's last epoch
    epochs_per_call: int  # 0: paced by `host_interval_seconds`
    host_interval_seconds: float
    checkpointing: bool  # checkpoint.enabled
    max_to_keep: int
    every_epochs: int
    every_seconds: float
    every_steps: int  # a streamed run's checkpoints inside an epoch
    profile_epochs: tuple[int, ...] = ()
    keep_best: int = 0  # a run's checkpoints of its k best epochs by the monitor, kept beside the latest


class Outcome(NamedTuple):
    carry: Any  # after the last call whose rows were consumed
    last_epoch: int  # the last epoch those rows cover
    halted: bool  # every run had halted (early stopping or a non-finite loss)
    host_seconds: float  # the host's bookkeeping per epoch (reading rows, logging, saving), beside the device


class WriteFailed(Exception):
    """`consume` failed to write (OSError): the outcome to save before the error is raised."""

    def __init__(self, outcome: Outcome, error: OSError):
        super().__init__(str(error))
        self.outcome, self.error = outcome, error


class _Call(NamedTuple):
    first_epoch: int
    count: int  # epochs asked for (fewer run if every run halts)
    carry: Any
    rows: Any
    ready_at: float | None  # when the call returned with its results ready (XLA's CPU client runs a program
    # with a loop in the dispatching thread); None when it ran asynchronously (ready when read)


def _is_ready(value) -> bool:
    return getattr(value, "is_ready", lambda: True)()


def drive(
    call: Callable[[Any, int, int], tuple[Any, Any]],
    carry,
    first_epoch: int,
    last_epoch: int,
    *,
    pace: Pace,
    checkpoints: Periodic,
    consume: Callable[[Any, int, float, Any], bool],
    save: Callable[[Any, int], None],
    interrupted: Callable[[], bool],
    overlap: bool = True,
) -> Outcome:
    """Runs epochs first_epoch..last_epoch by calls of `call(carry, first, count) -> (carry, rows)`.

    `consume(rows, first_epoch, seconds_per_epoch, carry)` takes each call's rows (fetched to the host) and the
    carry after them (on the device), and says whether every run has halted; `save(carry, epoch)` runs when
    `checkpoints` is due after a call (not after the last: the caller saves the outcome). Stops after the call
    in flight when `interrupted()`. `overlap`: dispatch the next call before reading the last. Not on CPU: XLA's
    CPU client runs some calls in the dispatching thread and some in its own, so a call dispatched ahead could
    finish before the last one's rows were read and their seconds would mix; and the host's work takes the same
    cores anyway.
    """
    # Past one process, every decision the host makes from its clock or a signal is process 0's (`agree`), so
    # every process calls the same programs and saves the same checkpoints.
    asked_to_stop = lambda: bool(devices.agree((int(interrupted()),))[0])
    if first_epoch > last_epoch or asked_to_stop():  # a Ctrl-C before the first call: train nothing more
        return Outcome(carry, first_epoch - 1, False, 0.0)

    def dispatch(from_carry, first: int) -> _Call:
        count = devices.agree((pace.next(first, last_epoch, checkpoints),))[0]
        new_carry, rows = call(from_carry, first, count)
        return _Call(first, count, new_carry, rows, time.perf_counter() if _is_ready(rows.ran) else None)

    # A call's seconds: from the previous call's results to its own (the device is busy in between).
    previous_ready, host_seconds, epochs_done = time.perf_counter(), 0.0, 0
    pending = dispatch(carry, first_epoch)
    while True:
        following = pending.first_epoch + pending.count
        going_on = following <= last_epoch and not asked_to_stop()
        # Asynchronous backends get the next call before this one's rows are read, so the host's work overlaps
        # the device's (if every run halts in this call, the next runs no epoch). A call that returned finished
        # ran in this thread: nothing would overlap, so the next one waits for the host's work.
        ahead = dispatch(pending.carry, following) if going_on and overlap and pending.ready_at is None else None
        rows = devices.fetch(pending.rows)  # a few numbers per run and epoch
        arrived = time.perf_counter()
        ready = pending.ready_at or arrived
        ran, seconds = int(rows.ran), ready - previous_ready
        pace.observe(ran, seconds)
        last_done = pending.first_epoch + ran - 1
        failed: OSError | None = None
        try:
            halted = consume(rows, pending.first_epoch, seconds / max(ran, 1), pending.carry)
        except OSError as error:  # a full disk, say: the caller saves this call's carry before anything closes
            failed = error
        if devices.agree((int(failed is not None),))[0]:  # past one process: only process 0 writes the rows
            failed = failed or OSError(errno.EIO, "process 0 could not write the run's outputs (see its output)")
            raise WriteFailed(Outcome(pending.carry, last_done, False, 0.0), failed) from failed
        going_on = going_on and not (halted or asked_to_stop())
        if going_on and devices.agree((int(checkpoints.due(last_done)),))[0]:
            save(pending.carry, last_done)
            checkpoints.done(last_done)
        host_seconds += time.perf_counter() - arrived
        epochs_done += ran
        if not going_on:
            return Outcome(pending.carry, last_done, halted, host_seconds / max(epochs_done, 1))
        pending, previous_ready = ahead or dispatch(pending.carry, following), ready


def train_loop(
    loop: LoopSpec,
    call,
    carry,
    first_epoch: int,
    *,
    limit: int,
    consume,
    save,
    interrupted: Callable[[], bool],
    checkpointing: bool,
    final_epoch: Callable[[Outcome], int],
    profile_dir: pathlib.Path | None = None,
    checkpoints: Periodic | None = None,
    overlap: bool = True,
    boundaries: frozenset[int] = frozenset(),
) -> Outcome:
    """`drive` at the config's pace and checkpoint cadence, then the final checkpoint (`save(carry,
    final_epoch(outcome))`): the loop of runs and sweeps alike. The caller holds the Ctrl-C handler
    (`stop_on_ctrl_c`) around it, and around the outputs that follow. `limit`: the program's most epochs per call.

    When `consume` cannot write (a full disk), the carry of the epochs it was given is still saved (if the disk
    takes it) before the OSError is raised: nothing trained is lost that can be kept.

    train.profile_epochs: each named epoch runs as a call of its own, traced by jax.profiler into `profile_dir`.
    `boundaries`: further epochs a call must start at (a pruned sweep's rungs end a call)."""
    checkpoints = checkpoints or cadence_of(loop, checkpointing)
    profiled = set(loop.profile_epochs) if profile_dir is not None else set()
    boundaries = {e for epoch in profiled for e in (epoch, epoch + 1)} | set(boundaries)
    pace = Pace(loop.epochs_per_call, loop.host_interval_seconds, limit, boundaries=boundaries)
    if profiled:
        call = _profiled(call, profiled, profile_dir)
    try:
        outcome = drive(
            call,
            carry,
            first_epoch,
            loop.epochs,
            pace=pace,
            checkpoints=checkpoints,
            consume=consume,
            save=save,
            interrupted=interrupted,
            # Not past one process: whether a call returned ready is each process's own, and the dispatch ahead
            # would pair the processes' broadcasts differently.
            overlap=overlap and jax.default_backend() != "cpu" and not devices.multi_process(),
        )
    except WriteFailed as failed:
        with contextlib.suppress(Exception):  # the disk may refuse the checkpoint too: the write's error counts
            save(failed.outcome.carry, final_epoch(failed.outcome))
        raise failed.error from None
    save(outcome.carry, final_epoch(outcome))
    return outcome


def cadence_of(loop: LoopSpec, enabled: bool, steps_per_epoch: int = 0, step: int = 0) -> Periodic:
    """The checkpoints' cadence: at epoch ends by `every_epochs` or `every_seconds`, and inside a streamed
    epoch by `every_steps` or `every_seconds`, counted from optimizer step `step`."""
    return Periodic(loop.every_epochs, loop.every_seconds, enabled=enabled, every_steps=loop.every_steps,
                    steps_per_epoch=steps_per_epoch, step=step)  # fmt: skip


def _profiled(call, epochs: set[int], directory: pathlib.Path):
    """`call`, with a call that starts at one of `epochs` (it runs that epoch alone: Pace's boundaries) traced by
    jax.profiler: WORKDIR/profile/plugins/profile/<time>/ holds the XSpace (TensorBoard's profile plugin) and
    perfetto_trace.json.gz (ui.perfetto.dev)."""

    def profiled_call(carry, first: int, count: int):
        if first not in epochs:
            return call(carry, first, count)
        jax.profiler.start_trace(str(directory), create_perfetto_trace=True)
        try:
            out = call(carry, first, count)
            jax.block_until_ready(out)
        finally:
            jax.profiler.stop_trace()
        return out

    return profiled_call


EXIT_ON_SECOND_CTRL_C = False  # the `jaxepochs` command sets it; in a notebook, a KeyboardInterrupt instead


@contextlib.contextmanager
def stop_on_ctrl_c(say: Callable[[str], None]):
    """Ctrl-C asks the run to stop after the call in flight, then save its checkpoint and write its outputs; a
    second Ctrl-C aborts. Yields a function that says whether a stop was asked. Held from the moment a run
    touches its workdir until its outputs are written, so one Ctrl-C at any moment ends with both."""
    requested: list[bool] = [True] if ctrl_c.pressed() else []  # pressed while the run was compiling, say

    def on_sigint(signum, frame):
        if requested and EXIT_ON_SECOND_CTRL_C:
            say("Ctrl-C again: aborted without saving; the checkpoints written before are intact.")
            os._exit(130)  # at once: raised inside a checkpoint write, KeyboardInterrupt makes orbax log errors
        if requested:
            raise KeyboardInterrupt
        requested.append(True)
        say("Ctrl-C: stopping after the epochs in flight, then saving (press again to abort without saving).")

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    try:
        yield lambda: bool(requested)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
