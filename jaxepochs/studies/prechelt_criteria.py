"""Prechelt's stopping criteria evaluated on recorded curves: every criterion at every threshold, for every run,
from the same per-epoch errors, without training again (the engine of issue #34's study).

    stops = stopping_epochs(val_error_RT, train_error_RT)        # {"GL1": [R], ..., "UP8": [R]}
    table = measures(stops, val_error_RT, test_error_RT)           # per criterion: Prechelt's measures

Each criterion is the trainer's own rule (core/early_stopping.py's GL_alpha, PQ_alpha, UP_s, strips of k = 5
epochs), scanned over a run's curve and vmapped over the runs and over the class's thresholds: the stopping epoch
a criterion gives here is the one `jaxepochs run` with that early-stopping rule would stop at (tested). A run that
no criterion stops ends at its last recorded epoch, as Prechelt's runs end at his 3000-epoch limit.

The 14 criteria of "Automatic early stopping using cross validation: quantifying the criteria" (Neural Networks
11, 1998): GL_1, GL_2, GL_3, GL_5; PQ_0.5, PQ_0.75, PQ_1, PQ_2, PQ_3; UP_2, UP_3, UP_4, UP_6, UP_8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxepochs.core.early_stopping import EarlyStopping

CRITERIA = {
    "gl": (1.0, 2.0, 3.0, 5.0),
    "pq": (0.5, 0.75, 1.0, 2.0, 3.0),
    "up": (2, 3, 4, 6, 8),
}
STRIP = 5  # k: Prechelt's strip length for PQ and UP


def criterion_name(rule: str, threshold: float) -> str:
    """ "GL1", "PQ0.75", "UP4"."""
    return f"{rule.upper()}{threshold:g}"


def _stops(rule: str, thresholds, val_error_rt, train_error_rt) -> np.ndarray:
    """[C, R] the epoch (1-based) each threshold of `rule` stops each run at; 0 where it never stops."""
    tracker = EarlyStopping(monitor="val_error", mode="min", rule=rule, k=STRIP)
    base = tracker.hparams()

    def one(threshold, values_t, train_t):
        hparams = base._replace(alpha=jnp.float32(threshold)) if rule != "up" else base
        hparams = hparams._replace(strips=jnp.int32(threshold)) if rule == "up" else hparams
        final, _ = tracker.run(values_t, train_t if rule == "pq" else None, hparams)
        return jnp.where(final.should_stop, final.stop_epoch, 0)

    per_run = jax.vmap(one, in_axes=(None, 0, 0))
    per_threshold = jax.vmap(per_run, in_axes=(0, None, None))
    dtype = jnp.int32 if rule == "up" else jnp.float32
    return np.asarray(per_threshold(jnp.asarray(thresholds, dtype), val_error_rt, train_error_rt))


def stopping_epochs(val_error_rt, train_error_rt) -> dict[str, np.ndarray]:
    """Each criterion's stopping epoch [R] for runs whose validation and training errors per epoch are
    `val_error_rt` and `train_error_rt` ([R, T]); the last epoch T where a criterion never fires."""
    val = jnp.asarray(val_error_rt, jnp.float32)
    train = jnp.asarray(train_error_rt, jnp.float32)
    last = val.shape[1]
    out = {}
    for rule, thresholds in CRITERIA.items():
        stops = _stops(rule, thresholds, val, train)
        for threshold, row in zip(thresholds, stops, strict=True):
            out[criterion_name(rule, threshold)] = np.where(row > 0, row, last).astype(np.int64)
    return out


def measures(
    stops: dict[str, np.ndarray], val_error_rt, test_error_rt, floor: float = 0.0
) -> dict[str, dict[str, float]]:
    """Per criterion, over the runs: the mean stopping epoch, the training time relative to the fastest
    criterion (each run's epochs against that run's fewest over the criteria, averaged), the test error at the
    stop, and the generalisation loss relative to the best reachable (each run's test error at its stop against
    its test error at the epoch of its lowest validation error, the best a stopping rule could pick from the
    validation curve; as a fraction, averaged), and how often the criterion stopped at an epoch whose test
    error is within 1% of that best. `floor`: the smallest error the relative measures divide by (a classifier's
    test error can near 0: one test example wholly wrong is a sensible unit)."""
    val, test = np.asarray(val_error_rt, np.float64), np.asarray(test_error_rt, np.float64)
    runs = np.arange(val.shape[0])
    fastest = np.min(np.stack(list(stops.values())), axis=0)
    best_test = test[runs, np.argmin(val, axis=1)]
    relative_to = np.maximum(best_test, floor)
    out = {}
    for name, epoch in stops.items():
        at_stop = test[runs, epoch - 1]
        out[name] = {
            "mean_stop_epoch": float(np.mean(epoch)),
            "relative_time": float(np.mean(epoch / fastest)),
            "test_error": float(np.mean(at_stop)),
            "generalisation_loss": float(np.mean((at_stop - best_test) / relative_to)),
            "near_best_fraction": float(np.mean(at_stop <= 1.01 * best_test)),
            "error_floor": float(floor),
        }
    return out
