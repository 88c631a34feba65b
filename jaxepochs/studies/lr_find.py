"""`jaxepochs lr-find --config X --workdir DIR`: the learning-rate range test, and K constant rates beside it.

The classical test (Smith 2015, "Cyclical learning rates", section 3.3; Lightning's `Tuner.lr_find` defaults):
`steps` optimizer steps from the run's initialisation (its seed, its warm start) with the rate of step i

    min_lr * (max_lr / min_lr) ** (i / (steps - 1))

on batches of the device-resident training split drawn in the run's own shuffled order (epoch 1's whole
batches, then epoch 2's, ...: the first steps see what the run's first steps see). It is ONE compiled program:
a `lax.scan` over the steps whose body sets the optimizer state's learning rate (an array there,
core/optim.OptHParams) to the step's rate and takes the run's own `train_step`; the config's optimizer (adam,
sgd...) with its schedule replaced by that rate. The scan runs every step: divergence is found afterwards on the
host, exactly as Lightning stops its loop, by smoothing the losses (an exponential moving average, beta 0.98,
bias-corrected as Lightning does: see `smooth`) and cutting the curve at the first step (after the first) whose
smoothed loss is above 4x the best smoothed loss before it, or is not finite; that step is the curve's last
point (a diverged run's later steps were computed, and are dropped). The suggestion is Lightning's: the rate at
the steepest descent of the smoothed loss per step (per unit of log rate: the rates are log-spaced), skipping
the first 10 points and the last.

The "beyond": K constant rates, log-spaced over the range the classical test did not diverge in (by default the
three decades below its last rate before divergence, never below min_lr), each trained for E whole epochs from
the same initialisation, as one vmapped program: the sweep's (`jaxepochs sweep` over optimizer.learning_rate,
a traced value), so each rate's numbers are those of `jaxepochs run` at that rate. Their suggestion is the rate
with the lowest validation loss after E epochs.

Writes lr_find.json, lr_find.png and the sweep's own outputs in DIR/constant_rates/.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.data import lock
from jaxepochs.host import config as config_lib
from jaxepochs.host import report, setup
from jaxepochs.host import run as run_lib
from jaxepochs.host import workdir as workdir_lib
from jaxepochs.studies import lr_find_plot
from jaxepochs.sweep import run as sweep_run

MIN_LR, MAX_LR, STEPS, RATES, EPOCHS = 1e-8, 1.0, 100, 8, 2  # Lightning's lr_find defaults; K rates, E epochs
BETA = 0.98  # the smoothing of the loss (Lightning's _LRCallback)
DIVERGENCE = 4.0  # a smoothed loss above this times the best stops the curve (Lightning's early_stop_threshold)
SKIP_BEGIN, SKIP_END = 10, 1  # points the suggestion ignores (Lightning's suggestion())
MIN_STEPS = 20  # fewer leave nothing to smooth past the skipped points
DECADES = 3  # the constant rates' default range: this many decades below the last rate before divergence
CONSTANT = {"optimizer.schedule.name": "constant", "optimizer.schedule.warmup_epochs": "0.0"}


class LrFindError(ValueError):
    """An lr-find argument that cannot run; raised before anything compiles."""


class RangeTest(NamedTuple):
    rates: np.ndarray  # float64 [steps] every step's rate
    losses: np.ndarray  # float64 [steps] every step's training loss (the batch's, before its update)
    smoothed: np.ndarray  # float64 [steps]
    kept: int  # the curve's points: up to and including the step where it stopped
    stop_reason: str  # "diverged", "non_finite" or "completed" (reached max_lr)
    suggestion: int | None  # the suggested step (an index below `kept`), or None with too few points
    seconds: float  # the whole test: set-up, compile and run
    compile_seconds: float


def check_arguments(min_lr: float, max_lr: float, steps: int, rates: int, epochs: int, rates_range=None) -> None:
    """LrFindError naming the flag and the fix, before anything is read or compiled."""
    if not min_lr > 0:
        raise LrFindError(f"--min {min_lr!r}: the smallest rate must be positive; use e.g. --min 1e-8.")
    if not max_lr > min_lr:
        raise LrFindError(f"--max {max_lr!r} must be above --min {min_lr!r}; use e.g. --min 1e-8 --max 1.")
    if steps < MIN_STEPS:
        raise LrFindError(f"--steps {steps}: too few to smooth the loss; use --steps {MIN_STEPS} or more (e.g. 100).")
    if rates < 2:
        raise LrFindError(f"--rates {rates}: the constant-rate comparison needs 2 rates or more (e.g. --rates 8).")
    if epochs < 1:
        raise LrFindError(f"--epochs {epochs}: train each constant rate for 1 epoch or more (e.g. --epochs 2).")
    if rates_range is not None and not 0 < rates_range[0] < rates_range[1]:
        raise LrFindError(f"--rates-range {rates_range[0]!r} {rates_range[1]!r}: give LOW HIGH with 0 < LOW < HIGH.")


def check_config(config, epochs: int) -> None:
    """ConfigError, before anything trains, for settings lr-find cannot honour: profiling (its range test is one
    program, not epochs), and unfreezing epochs past the --epochs its constant rates train."""
    if config.train.profile_epochs:
        raise config_lib.ConfigError(
            f"config.train.profile_epochs = {tuple(config.train.profile_epochs)}: lr-find does not profile. Leave "
            "it at () here, and profile a `jaxepochs run`."
        )
    late = max(config.finetune.unfreeze_epochs, default=0)
    if late > epochs:
        raise config_lib.ConfigError(
            f"--epochs {epochs}: config.finetune.unfreeze_epochs = {tuple(config.finetune.unfreeze_epochs)} "
            f"unfreezes a group at epoch {late}, after the constant rates' last epoch. Give --epochs {late} or more."
        )


def exponential_rates(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """Step i's rate: min_lr * (max_lr / min_lr) ** (i / (steps - 1)), from min_lr to max_lr."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))


def smooth(losses: np.ndarray, beta: float = BETA) -> np.ndarray:
    """The exponential moving average of the losses, bias-corrected as Lightning's _LRCallback does it: divided by
    1 - beta ** (step + 1) where its step (the trainer's global step) counts from 1, i.e. 1 - beta ** (i + 2) at
    0-based point i. Its curve therefore starts at about half the first loss and rises to the loss's level over
    some 30 points, and with it its suggestion and its divergence test (the best point so far may be that low
    first one). Kept because it is the arithmetic whose suggestions users of Lightning know, and it does the
    suggestion a service: measured on MNIST-1D (a 16-unit MLP, batch 64, adam or sgd, 1e-8 to 1 and 1e-5 to
    10), the textbook correction 1 - beta ** (i + 1) made the first points as noisy as the batches, and one
    easy batch at step 12 became the "steepest descent" (suggesting 8e-8 or 4e-5); with this one the suggestion
    fell where the loss falls (0.05 to 0.08 for adam)."""
    out, average = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out[i] = average / (1 - beta ** (i + 2))
    return out


def divergence(smoothed: np.ndarray, threshold: float = DIVERGENCE) -> tuple[int, str]:
    """(points kept, reason): the curve up to the first point after the first whose smoothed loss is above
    `threshold` times the best before it, or not finite (Lightning's test; it keeps the point that stops it)."""
    best = smoothed[0]
    for i in range(1, len(smoothed)):
        if not np.isfinite(smoothed[i]):
            return i + 1, "non_finite"
        if smoothed[i] > threshold * best:
            return i + 1, "diverged"
        best = min(best, smoothed[i])
    return len(smoothed), "completed"


def suggest(smoothed: np.ndarray, skip_begin: int = SKIP_BEGIN, skip_end: int = SKIP_END) -> int | None:
    """The index of the steepest descent of the smoothed curve (np.gradient over the points, Lightning's
    suggestion()), past the first `skip_begin` points and before the last `skip_end`; None with fewer than 2."""
    window = smoothed[skip_begin : len(smoothed) - skip_end]
    finite = np.flatnonzero(np.isfinite(window))
    if len(finite) < 2:
        return None
    return int(finite[np.argmin(np.gradient(window[finite]))]) + skip_begin


def range_program(task, tx, batch_size: int, steps: int, shuffle: bool = True, augment=None, accumulate: int = 1):
    """losses(state, data_n, rates_s) -> float32 [steps]: the range test's scan. Step i trains on the i-th whole
    batch of the run's epoch order (wrapping into later epochs) at rate rates_s[i], written into the optimizer
    state's learning rate; its loss is the batch's before the update."""

    def losses(state: epoch_lib.TrainState, data_n, rates_s):
        n = epoch_lib.num_examples(data_n)
        whole = n // batch_size
        epochs = -(-steps // whole)
        shuffle_key = jax.random.fold_in(state.key, epoch_lib.SHUFFLE_STREAM)
        order = lambda e: epoch_lib.batch_indices(shuffle_key, e, n, batch_size, shuffle)[0][:whole]
        idx_sb = jax.vmap(order)(jnp.arange(1, epochs + 1)).reshape(-1, batch_size)[:steps]

        def body(state, inputs):
            idx_b, rate = inputs
            hparams = tx.hparams(state.opt_state)._replace(learning_rate=rate)
            state = state._replace(opt_state=tx.with_hparams(state.opt_state, hparams))
            state, metrics = epoch_lib.train_step(
                state, epoch_lib.take(data_n, idx_b), task=task, tx=tx, augment=augment, accumulate=accumulate
            )
            return state, metrics.mean("loss")

        return jax.lax.scan(body, state, (idx_sb, rates_s))[1]

    return losses


def range_test(config, min_lr: float = MIN_LR, max_lr: float = MAX_LR, steps: int = STEPS, quiet: bool = True):
    """The classical range test of `config` (a validated experiment config): a RangeTest."""
    start = time.perf_counter()
    # One device (a 100-step test gains nothing from a mesh); the schedule is the test's own.
    config = config_lib.apply_overrides(config, {**CONSTANT, "mesh.data": "1"})
    run_lib.use_compilation_cache(config.train.compilation_cache_dir)
    run = run_lib.set_up(config, quiet)
    if run.dataset.streamed:
        raise config_lib.ConfigError(
            "lr-find trains on the training split on the device, and this one would be streamed (data.stream, "
            "train.steps_per_epoch or the device budget). Set data.stream = False, or use a smaller dataset."
        )
    x_1 = setup.first_example(run.dataset.train)
    carry = setup.init_carries(run.pieces, [config], [run.pieces.tx.defaults], x_1)
    state = jax.tree.map(lambda a: a[0], carry.state)
    program = range_program(run.pieces.task, run.pieces.tx, config.train.batch_size, steps, config.train.shuffle,
                            run.pieces.hooks.augment, config.train.accumulate_steps)  # fmt: skip
    rates = exponential_rates(min_lr, max_lr, steps)
    rates_s = jnp.asarray(rates, jnp.float32)
    compiling = time.perf_counter()
    compiled = jax.jit(program).lower(state, run.splits["train"], rates_s).compile()
    compile_seconds = time.perf_counter() - compiling
    losses = np.asarray(jax.device_get(compiled(state, run.splits["train"], rates_s)), np.float64)
    smoothed = smooth(losses)
    kept, reason = divergence(smoothed)
    suggestion = suggest(smoothed[:kept])
    return RangeTest(rates, losses, smoothed, kept, reason, suggestion, time.perf_counter() - start, compile_seconds)


def constant_rate_values(test: RangeTest, k: int, rates_range=None) -> np.ndarray:
    """K log-spaced rates: over `rates_range` (low, high), else the DECADES decades below the range test's last
    rate before it stopped (its max where it did not), never below its first rate."""
    if rates_range is not None:
        low, high = rates_range
    else:
        last = test.kept - 1 if test.stop_reason == "completed" else max(test.kept - 2, 0)
        high = float(test.rates[last])
        low = max(float(test.rates[0]), high / 10**DECADES)
        low = low if low < high else high / 10**DECADES
    return np.geomspace(low, high, k)


def constant_rates(config, rates: np.ndarray, epochs: int, workdir: pathlib.Path, quiet: bool = True) -> list[dict]:
    """Each rate trained for `epochs` epochs with a constant schedule, as one sweep (one vmapped program): per rate
    its final training loss, validation metrics and whether it diverged."""
    base = config_lib.apply_overrides(
        config, {**CONSTANT, "train.epochs": str(epochs), "early_stopping.enabled": "False",
                 "checkpoint.enabled": "False"}
    )  # fmt: skip
    grid = [{"optimizer.learning_rate": repr(float(rate))} for rate in rates]
    result = sweep_run.sweep(base, grid, workdir, quiet=True, restart=True)
    names = sorted(result.histories)  # r0, r1, ...: the grid's order
    out = []
    for rate, name in zip(rates, names, strict=True):
        history = result.histories[name]
        last = history[-1] if history else {}
        diverged = result.summaries[name]["stop_reason"] == "non_finite_loss" or len(history) < epochs
        row = {"learning_rate": float(rate), "epochs_completed": len(history), "diverged": diverged}
        row.update({k: _finite([v])[0] for k, v in last.items() if k.startswith(("train_", "val_"))})
        out.append(row)
    return out


def best_constant(rows: list[dict]) -> tuple[int | None, str]:
    """(index of the best rate, the metric that chose it): the lowest val_loss (train_loss without a validation
    split) among the rates that did not diverge."""
    metric = "val_loss" if any("val_loss" in row for row in rows) else "train_loss"
    values = [math.inf if row["diverged"] or row.get(metric) is None else row[metric] for row in rows]
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]
    return (min(finite, key=lambda i: values[i]) if finite else None), metric


def _finite(values) -> list:
    """JSON's numbers: non-finite values as null."""
    return [float(v) if np.isfinite(v) else None for v in values]


def range_fields(test: RangeTest, min_lr: float, max_lr: float) -> dict:
    """lr_find.json's "range_test": the curve up to where it stopped, why, and the suggestion."""
    k = test.kept
    stopped = {
        "diverged": f"smoothed loss above {DIVERGENCE:g}x its best at step {k - 1} (rate {test.rates[k - 1]:.3g})",
        "non_finite": f"loss not finite at step {k - 1} (rate {test.rates[k - 1]:.3g})",
        "completed": f"reached max_lr {max_lr:g} without diverging",
    }[test.stop_reason]
    suggested = None if test.suggestion is None else float(test.rates[test.suggestion])
    return {
        "min_lr": min_lr,
        "max_lr": max_lr,
        "steps": len(test.rates),
        "beta": BETA,
        "divergence_threshold": DIVERGENCE,
        "learning_rates": _finite(test.rates[:k]),
        "losses": _finite(test.losses[:k]),
        "smoothed_losses": _finite(test.smoothed[:k]),
        "stopped_at_step": k - 1 if test.stop_reason != "completed" else None,
        "stop_reason": test.stop_reason,
        "stopped_because": stopped,
        "suggestion_step": test.suggestion,
        "suggested_learning_rate": suggested,
        "seconds": test.seconds,
        "compile_seconds": test.compile_seconds,
    }


def lr_find(
    config,
    workdir: str | pathlib.Path,
    *,
    min_lr: float = MIN_LR,
    max_lr: float = MAX_LR,
    steps: int = STEPS,
    rates: int = RATES,
    epochs: int = EPOCHS,
    rates_range: tuple[float, float] | None = None,
    quiet: bool = False,
) -> dict:
    """The range test and the K constant rates of `config`; writes lr_find.json and lr_find.png into `workdir`
    (the sweep's outputs into workdir/constant_rates) and returns lr_find.json's dict. Prints the suggestions
    unless `quiet`."""
    check_arguments(min_lr, max_lr, steps, rates, epochs, rates_range)
    start = time.perf_counter()
    workdir = workdir_lib.as_workdir(workdir)
    # The workdir's lock, as a run's: a second lr-find or a live run there is refused at once, before the data is
    # read or anything compiles; held until the outputs are written.
    lock.check_free(workdir, "workdir")
    workdir_lib.check_kind(workdir, "lr-find")  # a run's, a sweep's or a study's workdir is refused
    config = config_lib.validate(config)
    check_config(config, epochs)
    with lock.hold(workdir, "workdir"):
        workdir_lib.claim(workdir, "lr-find")
        test = range_test(config, min_lr, max_lr, steps, quiet=True)
        values = constant_rate_values(test, rates, rates_range)
        swept = time.perf_counter()
        rows = constant_rates(config, values, epochs, workdir / "constant_rates")
        best, metric = best_constant(rows)
        result = {
            "config": config.experiment.module if "experiment" in config else None,
            "optimizer": config.optimizer.name,
            "batch_size": config.train.batch_size,
            "range_test": range_fields(test, min_lr, max_lr),
            "constant_rates": {
                "epochs": epochs,
                "learning_rates": [float(v) for v in values],
                "runs": rows,
                "selected_by": metric,
                "suggested_learning_rate": None if best is None else rows[best]["learning_rate"],
                "seconds": time.perf_counter() - swept,
            },
            "total_seconds": time.perf_counter() - start,
        }
        result["suggested_learning_rate"] = result["range_test"]["suggested_learning_rate"]
        result["suggested_learning_rate_constant"] = result["constant_rates"]["suggested_learning_rate"]
        workdir.mkdir(parents=True, exist_ok=True)
        report.write_text(workdir / "lr_find.json", json.dumps(result, indent=2) + "\n")
        lr_find_plot.plot(result, workdir / "lr_find.png", SKIP_BEGIN)
        if not quiet:
            print(summary_lines(result, workdir))
        return result


def summary_lines(result: dict, workdir: pathlib.Path) -> str:
    """The two lines the command prints: each suggestion and where it came from."""
    r, c = result["range_test"], result["constant_rates"]
    classical = "none (too few points before it stopped)"
    if r["suggested_learning_rate"] is not None:
        classical = f"{r['suggested_learning_rate']:.3g} (steepest descent of the smoothed loss)"
    where = r["stopped_because"]
    constant = "none (every rate diverged)"
    if c["suggested_learning_rate"] is not None:
        best = next(row for row in c["runs"] if row["learning_rate"] == c["suggested_learning_rate"])
        constant = f"{c['suggested_learning_rate']:.3g} (lowest {c['selected_by']} {best[c['selected_by']]:.4f})"
    lows, highs = c["learning_rates"][0], c["learning_rates"][-1]
    epochs = f"{c['epochs']} epoch{'s' if c['epochs'] != 1 else ''}"
    return (
        f"lr-find: range test, {r['steps']} steps from {r['min_lr']:g} to {r['max_lr']:g} ({where}): suggested "
        f"learning rate {classical}\n"
        f"lr-find: {len(c['runs'])} constant rates {lows:.3g}..{highs:.3g} for {epochs} in one vmapped "
        f"program: suggested learning rate {constant}  ({result['total_seconds']:.1f} s, outputs in {workdir})"
    )
