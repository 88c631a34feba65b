"""Early stopping as a pure state machine: Keras 3's EarlyStopping, Prechelt's GL/PQ/UP, a divergence guard.

`EarlyStopping` holds Python config; `init()` gives an `EarlyStoppingState` of arrays and
`update(state, value)` the next one, so it runs under `jax.jit`, inside `lax.scan` over an epoch axis and
under `jax.vmap` over runs. Epochs are 1-based everywhere and 0 means "none"; once `should_stop` is set,
`update` returns the state unchanged.

The default rule ("patience") is Keras 3's `keras.callbacks.EarlyStopping.on_epoch_end` (checked against keras
3.15.1), for every sequence of values:

- epochs before `start_from_epoch` (1-based: epochs 1..start_from_epoch) are not monitored at all;
- every monitored epoch first adds 1 to `wait`; the first monitored value is always an improvement (Keras
  starts from `best = None`, not from +-inf; a NaN first value becomes the best and nothing improves on it);
- an improvement is `value + min_delta < best` in min mode and `value - min_delta > best` in max mode, in
  float32 (as Keras's JAX backend compares; the rounding of the sum can decide); NaN never improves;
- an improvement records the best value and epoch and resets `wait` to 0 only if it also improves, by the same
  test, on `baseline` (when one is given); an improving epoch never stops;
- a non-improving epoch stops when `wait >= patience` (and the epoch is not the first).

Keras reports 0-based epochs; here `stop_epoch = stopped_epoch + 1` and `best_epoch = best_epoch + 1`.

An epoch without the monitored value (validation every n epochs: `update(..., observed=False)`) still counts:
patience stays in epochs, as Keras's does with a validation value every epoch (not in validation checks, as
Lightning's does). With validation every 5 epochs and patience 10, a best at epoch 5 and nothing better at 10
and 15 stops at epoch 15. Rules and the divergence guard fire only on observed epochs; Prechelt's strips end
every k epochs, and a strip end is measured only where it is observed.

Mode "auto" follows Keras 3, which asks the compiled metric for its direction: a "val_" (or here "train_")
prefix is dropped, "loss" is minimized, the names of Keras's metrics that go up ("acc", "accuracy", "auc",
"precision", ...) are maximized, its error metrics ("mse", "mae", ...) minimized, and any other name is an
error that asks for mode="min" or mode="max".

Numeric hyperparameters live in `EarlyStoppingHParams` (built from the config by `hparams()`); `update` takes
an optional `hparams` pytree, so min_delta, patience, baseline, start_from_epoch, alpha, strips and the
divergence threshold may be traced or vmapped.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

MODES = ("auto", "min", "max")
RULES = ("patience", "gl", "pq", "up")
# index = EarlyStoppingState.stop_reason; "callback": the host wrote a user callback's stop (host/callbacks.py);
# "pruned": a pruned sweep's rung halted the run (sweep/prune.py). Both are written by the host, between calls.
STOP_REASONS = ("none", "patience", "gl", "pq", "up", "divergence", "callback", "pruned")
NO_STOP, PATIENCE, GL, PQ, UP, DIVERGENCE, CALLBACK, PRUNED = range(len(STOP_REASONS))
HOST_STOPS = (CALLBACK, PRUNED)  # stops the host writes: they halt a run with early stopping off too
TRAINER_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
DEFAULT_ALPHA = {"gl": 5.0, "pq": 0.5}  # GL_5 and PQ_0.5, within the ranges Prechelt (1998) evaluates

# Keras 3 metric names by direction (`Metric._direction`), as registered strings and default names.
MAX_METRICS = frozenset(
    {
        "acc",
        "accuracy",
        "binary_accuracy",
        "categorical_accuracy",
        "sparse_categorical_accuracy",
        "top_k_categorical_accuracy",
        "sparse_top_k_categorical_accuracy",
        "auc",
        "precision",
        "recall",
        "f1_score",
        "fbeta_score",
        "r2_score",
        "cosine_similarity",
        "pearson_correlation",
        "concordance_correlation",
        "iou",
        "mean_iou",
        "binary_iou",
        "one_hot_iou",
        "one_hot_mean_iou",
    }
)
MIN_METRICS = frozenset(
    {
        "loss",
        "mse",
        "mae",
        "mape",
        "msle",
        "mean_squared_error",
        "mean_absolute_error",
        "mean_absolute_percentage_error",
        "mean_squared_logarithmic_error",
        "root_mean_squared_error",
        "log_cosh_error",
        "binary_crossentropy",
        "categorical_crossentropy",
        "sparse_categorical_crossentropy",
        "kl_divergence",
        "poisson",
        "hinge",
        "squared_hinge",
        "categorical_hinge",
    }
)


class EarlyStoppingState(NamedTuple):
    epoch: jax.Array  # int32 [] updates seen: the 1-based epoch of the latest update
    best_value: jax.Array  # float32 [] best monitored value so far (+-inf while best_epoch == 0)
    best_epoch: jax.Array  # int32 [] epoch of best_value; 0 until an epoch is monitored
    wait: jax.Array  # int32 [] Keras's `wait`: monitored epochs since the last reset
    should_stop: jax.Array  # bool []
    stop_epoch: jax.Array  # int32 [] epoch at which a rule fired; 0 while running
    stop_reason: jax.Array  # int32 [] index into STOP_REASONS; 0 ("none") while running
    train_k: jax.Array  # float32 [k] ring buffer of the last k monitored training errors (PQ)
    strip_value: jax.Array  # float32 [] monitored value at the end of the last strip; NaN before one (UP)
    up_strips: jax.Array  # int32 [] strips in a row whose end value is worse than the previous strip's (UP)


class EarlyStoppingHParams(NamedTuple):
    """The numeric hyperparameters; any may be traced, and batched under `jax.vmap`."""

    min_delta: jax.Array  # float32 [] >= 0
    patience: jax.Array  # int32 []
    baseline: jax.Array  # float32 [] used only where use_baseline
    use_baseline: jax.Array  # bool []
    start_from_epoch: jax.Array  # int32 [] epochs 1..start_from_epoch are not monitored
    alpha: jax.Array  # float32 [] GL_alpha / PQ_alpha threshold
    strips: jax.Array  # int32 [] s of UP_s
    divergence_threshold: jax.Array  # float32 [] +inf (min) / -inf (max): no threshold


def infer_mode(monitor: str) -> str:
    """Keras 3's "auto": "min" or "max" from the metric's name, with any "val_"/"train_" prefix dropped (or a
    further evaluation set's name: "shifted_loss")."""
    for name in (monitor.removeprefix("val_").removeprefix("train_"), monitor.partition("_")[2]):
        if name in MAX_METRICS:
            return "max"
        if name in MIN_METRICS:
            return "min"
    raise ValueError(
        f'Cannot infer whether monitor "{monitor}" should be minimized or maximized; pass mode="min" or '
        f'mode="max". Valid modes: {", ".join(MODES)}.'
    )


def validate_monitor(name: str, available: Sequence[str] = TRAINER_METRICS) -> str:
    """Returns `name` if it is one of `available`; else a ValueError listing the valid names."""
    if name not in available:
        raise ValueError(f'Unknown monitor "{name}". Valid monitors: {", ".join(available)}.')
    return name


def stop_reason_name(code: Any) -> str:
    """The name of a `stop_reason` code (a Python int or a scalar array)."""
    return STOP_REASONS[int(code)]


def _choice(kind: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f'Unknown {kind} "{value}". Valid {kind}s: {", ".join(valid)}.')


def _nonnegative_int(name: str, value: Any, least: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """When to stop training, by Keras's patience rule or one of Prechelt's criteria, plus a divergence guard.

    rule="patience": Keras 3's EarlyStopping (see the module docstring), with min_delta, patience, baseline
    and start_from_epoch.

    Prechelt, "Early Stopping -- But When?" (1998), for errors (min mode). With E_va(t) the monitored
    validation error, E_opt(t) = min over t' <= t of E_va(t') (`best_value`) and strips of k epochs (a strip
    ends at every k-th monitored epoch):

    rule="gl", GL_alpha: generalization loss GL(t) = 100 * (E_va(t) / E_opt(t) - 1); stop at the first epoch
        with GL(t) > alpha. Only validation errors enter GL. E.g. E_va = 1.0, 0.8, 0.7, 0.72, 0.75:
        E_opt(5) = 0.7, GL(4) = 2.86, GL(5) = 7.14, so GL_5 stops at epoch 5 (GL_2 at epoch 4).
    rule="pq", PQ_alpha: training progress P_k(t) = 1000 * (sum of the strip's training errors / (k * the
        strip's lowest training error) - 1); stop at the first strip end with GL(t) / P_k(t) > alpha.
        `update` then takes the training error too. E.g. k = 5, E_tr = 1.2, 1.1, 1.0, 0.95, 0.9 | 0.89,
        0.885, 0.88, 0.88, 0.88 and E_va = 1.0, 0.9, 0.85, 0.87, 0.9 | 0.9 x 5: at epoch 5 GL = 5.88,
        P_5 = 144.4, ratio 0.04; at epoch 10 GL = 5.88, P_5 = 3.41, ratio 1.73 > 0.5, so PQ_0.5 stops at
        epoch 10 (GL_5 at epoch 5).
    rule="up", UP_s: stop when the error at the end of a strip is higher than at the end of the previous
        strip, s strips in a row. E.g. k = 2, E_va = 1.0, 0.9 | 0.8, 0.85 | 0.86, 0.87 | 0.9, 0.95: the strip
        ends 0.9, 0.85, 0.87, 0.95 rise at epochs 6 and 8, so UP_1 stops at epoch 6 and UP_2 at epoch 8. In
        max mode "higher" reads "lower". min_delta does not enter UP.

    All rules keep best_value, best_epoch and wait as Keras does (for restore_best). E_opt is best_value,
    which is the lowest error when min_delta = 0. If E_opt = 0, GL is inf for any E_va > 0; if P_k = 0 (no
    training progress), GL / P_k is inf once GL > 0.

    Divergence guard, on top of any rule and also during the start_from_epoch warm-up: stop_on_nonfinite stops
    at a NaN or +-inf value; divergence_threshold stops at a value above it (min mode) or below it (max mode).

    `known_monitors`, when given, checks `monitor` with `validate_monitor`.
    """

    monitor: str = "val_loss"
    mode: str = "auto"
    min_delta: float = 0.0
    patience: int = 0
    baseline: float | None = None
    start_from_epoch: int = 0
    restore_best: bool = False
    rule: str = "patience"
    alpha: float | None = None  # GL / PQ threshold; None: DEFAULT_ALPHA[rule]
    k: int = 5  # strip length (PQ, UP)
    strips: int = 1  # s of UP_s
    stop_on_nonfinite: bool = False
    divergence_threshold: float | None = None
    known_monitors: Sequence[str] | None = None

    def __post_init__(self):
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"monitor must be a non-empty metric name; got {self.monitor!r}.")
        if self.known_monitors is not None:
            validate_monitor(self.monitor, tuple(self.known_monitors))
        _choice("mode", self.mode, MODES)
        _choice("rule", self.rule, RULES)
        _nonnegative_int("patience", self.patience)
        _nonnegative_int("start_from_epoch", self.start_from_epoch)
        _nonnegative_int("k", self.k, least=1)
        _nonnegative_int("strips", self.strips, least=1)
        if not (isinstance(self.min_delta, numbers.Real) and 0 <= self.min_delta < math.inf):
            raise ValueError(f"min_delta must be a finite number >= 0; got {self.min_delta!r}.")
        if self.alpha is not None and not (isinstance(self.alpha, numbers.Real) and self.alpha >= 0):
            raise ValueError(f"alpha must be a number >= 0; got {self.alpha!r}.")
        direction = self.direction  # raises for an "auto" monitor whose direction is unknown
        if self.rule in ("gl", "pq") and direction != "min":
            raise ValueError(
                f'rule="{self.rule}" measures errors and needs mode "min"; monitor "{self.monitor}" is '
                'maximized. Valid rules for mode "max": patience, up.'
            )

    @property
    def direction(self) -> str:
        """`mode`, with "auto" resolved from the monitor's name: "min" or "max"."""
        return infer_mode(self.monitor) if self.mode == "auto" else self.mode

    @property
    def needs_train_value(self) -> bool:
        return self.rule == "pq"

    def hparams(self) -> EarlyStoppingHParams:
        """This config's numeric hyperparameters as arrays: the default `hparams` of `update`."""
        sign = 1.0 if self.direction == "min" else -1.0
        threshold = sign * math.inf if self.divergence_threshold is None else self.divergence_threshold
        alpha = DEFAULT_ALPHA.get(self.rule, 0.0) if self.alpha is None else self.alpha
        return EarlyStoppingHParams(
            min_delta=jnp.asarray(self.min_delta, jnp.float32),
            patience=jnp.asarray(self.patience, jnp.int32),
            baseline=jnp.asarray(0.0 if self.baseline is None else self.baseline, jnp.float32),
            use_baseline=jnp.asarray(self.baseline is not None),
            start_from_epoch=jnp.asarray(self.start_from_epoch, jnp.int32),
            alpha=jnp.asarray(alpha, jnp.float32),
            strips=jnp.asarray(self.strips, jnp.int32),
            divergence_threshold=jnp.asarray(threshold, jnp.float32),
        )

    def init(self) -> EarlyStoppingState:
        """The state before the first epoch."""
        zero = jnp.zeros((), jnp.int32)
        worst = math.inf if self.direction == "min" else -math.inf
        return EarlyStoppingState(
            epoch=zero,
            best_value=jnp.asarray(worst, jnp.float32),
            best_epoch=zero,
            wait=zero,
            should_stop=jnp.zeros((), bool),
            stop_epoch=zero,
            stop_reason=zero,
            train_k=jnp.full((self.k,), jnp.nan, jnp.float32),
            strip_value=jnp.asarray(jnp.nan, jnp.float32),
            up_strips=zero,
        )

    def _better(self, value: jax.Array, reference: jax.Array, min_delta: jax.Array) -> jax.Array:
        """Keras's `_is_improvement`, in its arithmetic so float32 rounding agrees; NaN: False."""
        if self.direction == "min":
            return value + min_delta < reference
        return value - min_delta > reference

    def update(
        self,
        state: EarlyStoppingState,
        value: Any,
        train_value: Any = None,
        hparams: EarlyStoppingHParams | None = None,
        observed: Any = True,
    ) -> EarlyStoppingState:
        """The state after one more epoch whose monitored value is `value` (and training error `train_value`,
        needed by rule "pq"). Pure: jit-, scan- and vmap-safe. A stopped state is returned unchanged.

        `observed` (a bool, may be traced) False is an epoch without the monitored value (validation not due):
        `value` is ignored, the epoch counts (patience stays in epochs: `wait` goes up by one once a best exists
        and the epoch is monitored), the training error still enters PQ's strip (it exists every epoch), and
        nothing else changes: no improvement, no strip end measured (PQ, UP), no rule and no divergence fires."""
        if train_value is None and self.needs_train_value:
            raise ValueError('rule="pq" needs the training error: update(state, value, train_value).')
        h = self.hparams() if hparams is None else hparams
        value = jnp.asarray(value, jnp.float32)
        minimize = self.direction == "min"
        observed = jnp.asarray(observed, bool)
        epoch = state.epoch + 1
        active = epoch > h.start_from_epoch
        seen = epoch - h.start_from_epoch  # monitored epochs including this one (when active)

        # Keras 3 on_epoch_end.
        improved = (state.best_epoch == 0) | self._better(value, state.best_value, h.min_delta)
        beats_baseline = ~h.use_baseline | self._better(value, h.baseline, h.min_delta)
        wait = jnp.where(improved & beats_baseline, 0, state.wait + 1)
        best_value = jnp.where(improved, value, state.best_value)
        best_epoch = jnp.where(improved, epoch, state.best_epoch)
        # An unobserved epoch: no value, so no improvement; the wait for one counts it once a best exists.
        wait = jnp.where(observed, wait, jnp.where(state.best_epoch > 0, state.wait + 1, state.wait))
        best_value = jnp.where(observed, best_value, state.best_value)
        best_epoch = jnp.where(observed, best_epoch, state.best_epoch)

        # Prechelt: GL every epoch, P_k and UP at strip ends.
        train_k = state.train_k
        if train_value is not None:
            train_k = train_k.at[(seen - 1) % self.k].set(jnp.asarray(train_value, jnp.float32))
        strip_end = seen % self.k == 0
        gl = 100.0 * (value / best_value - 1.0)
        progress = 1000.0 * (train_k.sum() / (self.k * train_k.min()) - 1.0)
        worse = value > state.strip_value if minimize else value < state.strip_value
        measured = strip_end & observed  # a strip end without a validation value is not measured
        up_strips = jnp.where(measured, jnp.where(worse, state.up_strips + 1, 0), state.up_strips)
        strip_value = jnp.where(measured, value, state.strip_value)

        fired = {
            "patience": ~improved & (wait >= h.patience) & (epoch > 1),  # Keras's `epoch > 0`
            "gl": gl > h.alpha,
            "pq": strip_end & (gl / progress > h.alpha),
            "up": strip_end & (up_strips >= h.strips),
        }[self.rule] & active
        diverged = value > h.divergence_threshold if minimize else value < h.divergence_threshold
        if self.stop_on_nonfinite:
            diverged = diverged | ~jnp.isfinite(value)
        fired, diverged = fired & observed, diverged & observed  # no value this epoch: nothing to judge
        stop = fired | diverged
        reason = jnp.where(diverged, DIVERGENCE, jnp.where(fired, RULES.index(self.rule) + 1, NO_STOP))

        keep = lambda new, old: jnp.where(active, new, old)
        new = EarlyStoppingState(
            epoch=epoch,
            best_value=keep(best_value, state.best_value),
            best_epoch=keep(best_epoch, state.best_epoch),
            wait=keep(wait, state.wait),
            should_stop=stop,
            stop_epoch=jnp.where(stop, epoch, 0),
            stop_reason=reason.astype(jnp.int32),
            train_k=keep(train_k, state.train_k),
            strip_value=keep(strip_value, state.strip_value),
            up_strips=keep(up_strips, state.up_strips),
        )
        return jax.tree.map(lambda old, nxt: jnp.where(state.should_stop, old, nxt), state, new)

    def run(
        self,
        values_t: Any,
        train_values_t: Any = None,
        hparams: EarlyStoppingHParams | None = None,
    ) -> tuple[EarlyStoppingState, EarlyStoppingState]:
        """Scans `update` over a [T] sequence from `init()`: (final state, each epoch's state [T, ...])."""
        xs = (
            jnp.asarray(values_t, jnp.float32),
            None if train_values_t is None else jnp.asarray(train_values_t),
        )

        def body(state, x):
            state = self.update(state, x[0], x[1], hparams)
            return state, state

        return jax.lax.scan(body, self.init(), xs)
