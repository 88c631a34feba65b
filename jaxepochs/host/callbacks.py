"""The user's code at each epoch's end: the experiment module's `on_epoch_end` and `train_and_evaluate`'s
`callbacks=[...]`, called on the host after the call that trained the epoch.

    callback(row)          row: the epoch's row, as written to metrics.jsonl (a copy)
    callback(row, run)     run.params(): the parameters at the end of the call (fetched only when asked);
                           run.epoch: the last epoch of that call; run.workdir

Every row reaches every callback, in epoch order, after the rows are written. When several epochs share a call
(train.epochs_per_call), their callbacks run after the whole call, and `run.params()` are those of its last
epoch. A callback that returns True stops the run at the end of that call: `stop_reason: "callback"`, the
checkpoint and outputs as for any stop, and a rerun of the same command finds the run stopped (the stop is
written into the checkpoint's early-stopping state). A callback that raises stops the run the same way but
leaves it resumable: the checkpoint and outputs are written, then the error is raised. Unused, the host loop
calls nothing: a run without callbacks is the run it was.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxepochs.core import early_stopping as early_stopping_lib
from jaxepochs.core import optim
from jaxepochs.host import devices


class CallbackError(RuntimeError):
    """A callback raised: the run saved its checkpoint and outputs first, and resumes when run again."""


def _takes_run(name: str, function: Callable) -> bool:
    """Whether `function` takes (row, run) rather than (row); a ValueError naming it when it takes neither."""
    if not callable(function):
        raise ValueError(f"{name} is a {type(function).__name__}, not a function: pass callback(row) -> bool.")
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin: called with the row alone
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return True
    if not positional or len(required) > 2:
        raise ValueError(
            f"{name}{inspect.signature(function)} cannot be called as {name}(row) or {name}(row, run). Define it "
            f"as def {name}(row): ... (return True to stop the run), or def {name}(row, run): ... for "
            "run.params()."
        )
    return len(positional) >= 2


def check(functions: Sequence[Callable]) -> None:
    """train_and_evaluate's `callbacks`, checked before anything compiles: a list of callback(row) or
    callback(row, run) functions."""
    if callable(functions) or isinstance(functions, (str, bytes)) or not isinstance(functions, Sequence):
        raise ValueError(
            f"callbacks={functions!r} is not a list of functions: pass callbacks=[on_epoch_end], each called as "
            "callback(row) or callback(row, run)."
        )
    for function in functions:
        _takes_run(getattr(function, "__name__", type(function).__name__), function)


@dataclasses.dataclass
class RunAtCall:
    """What a callback sees of the run beside the row (its second argument)."""

    epoch: int  # the call's last epoch
    workdir: pathlib.Path
    _carry: Any
    _tx: Any
    _params: Any = None

    def params(self):
        """The parameters at the end of the call (an optimizer's evaluation point, e.g. schedule-free's average),
        as host arrays; fetched at the first ask."""
        if self._params is None:
            state = devices.fetch(optim.evaluation_states(self._tx, self._carry.state))
            self._params = jax.tree.map(lambda a: a[0], state.params)  # the run axis of a batch of one
        return self._params


class Callbacks:
    """A run's callbacks, and what they asked: a stop (at which epoch) or an error to raise after the outputs."""

    def __init__(self, functions: Sequence[Callable], tx, workdir: pathlib.Path):
        named = [(getattr(f, "__name__", type(f).__name__), f) for f in functions]
        self.functions = [(name, f, _takes_run(name, f)) for name, f in named]
        self.tx, self.workdir = tx, workdir
        self.stop_epoch = 0  # a callback returned True after this epoch's call
        self.error: tuple[str, int, BaseException] | None = None

    def __bool__(self) -> bool:
        return bool(self.functions)

    @property
    def stop_requested(self) -> bool:
        return bool(self.stop_epoch) or self.error is not None

    def after_call(self, rows: list[dict], carry) -> None:
        """Calls every callback with each of the call's rows, in order (skipped once one has raised)."""
        if not rows or self.error is not None:
            return
        run = RunAtCall(rows[-1]["epoch"], self.workdir, carry, self.tx)
        for row in rows:
            for name, function, takes_run in self.functions:
                try:
                    answer = function(dict(row), run) if takes_run else function(dict(row))
                except Exception as error:  # raised after the checkpoint and outputs: `raise_if_failed`
                    self.error = (name, row["epoch"], error)
                    return
                if answer is True:
                    self.stop_epoch = run.epoch
                elif answer not in (None, False):
                    self.error = (name, row["epoch"], TypeError(_bad_answer(name, answer)))
                    return

    def mark_stopped(self, carry):
        """`carry` with the callback's stop written into its early-stopping state and halted flag (so a rerun
        finds the run stopped), unless a stop came earlier; `carry` itself without a callback's stop."""
        if not self.stop_epoch or self.error is not None:
            return carry
        es = carry.es_state
        stopped = es.should_stop
        marked = es._replace(
            should_stop=jnp.logical_or(stopped, True),
            stop_reason=jnp.where(stopped, es.stop_reason, early_stopping_lib.CALLBACK).astype(es.stop_reason.dtype),
            stop_epoch=jnp.where(stopped, es.stop_epoch, self.stop_epoch).astype(es.stop_epoch.dtype),
        )
        return carry._replace(es_state=marked, halted=jnp.logical_or(carry.halted, True))

    def raise_if_failed(self, workdir: pathlib.Path) -> None:
        if self.error is None:
            return
        name, epoch, error = self.error
        raise CallbackError(
            f"The callback {name} raised at epoch {epoch}: {type(error).__name__}: {error}. The run stopped after "
            f"that call and saved its checkpoint and outputs in {workdir}; fix the callback and run the same "
            "command again to resume."
        ) from error


def _bad_answer(name: str, answer) -> str:
    return (
        f"{name} returned {answer!r} ({type(answer).__name__}); a callback returns True to stop the run, or None "
        "or False to go on."
    )
