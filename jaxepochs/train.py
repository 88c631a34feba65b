"""The host loop: compile the epoch once, run it `train.epochs` times, log, and write the run's outputs.

The host touches each epoch once: it dispatches the compiled training epoch and the validation pass, then
fetches a handful of scalars. Everything per batch runs on the device.
"""

from __future__ import annotations

import functools
import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxepochs import config as config_lib
from jaxepochs import data as data_lib
from jaxepochs import epoch as epoch_lib
from jaxepochs import models, optim, report

RUN_FILES = ("metrics.jsonl", "summary.json")  # their presence means the workdir holds a run


class WorkdirError(ValueError):
    """The workdir already holds a run."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the outputs of the last good epoch were written before raising."""


class TrainResult(NamedTuple):
    state: epoch_lib.TrainState  # after the last good epoch
    history: list[dict]  # one row per epoch, as in metrics.jsonl
    summary: dict  # as in summary.json


class CompiledRun(NamedTuple):
    """The run's compiled programs; calling them never traces or compiles again."""

    train_epoch: Any  # (state, x_n, y_n, epoch) -> (state, Metrics)
    evaluate: dict[str, Any]  # split name -> (params, x_n, y_n) -> Metrics
    compile_seconds: float


def init_state(model, tx, seed: int, example_x) -> epoch_lib.TrainState:
    """Parameters, optimizer state, step 0 and the run key, from `seed`: one compiled program, not one per op."""

    @jax.jit
    def init(seed, x_1f):
        init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))  # raw uint32[2]: checkpointable
        params = models.init_params(model, init_key, x_1f)
        return epoch_lib.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), run_key)

    return init(jnp.asarray(seed, jnp.uint32), jnp.asarray(example_x[:1]))


def compile_run(state, model, tx, splits: dict[str, tuple], batch_size: int, eval_batch_size: int) -> CompiledRun:
    """Lowers and compiles the training epoch and one evaluation pass per held-out split (their shapes differ)."""
    apply_fn = lambda params, x: model.apply({"params": params}, x)
    start = time.perf_counter()
    x_train, y_train = splits["train"]
    train_fn = jax.jit(functools.partial(epoch_lib.train_epoch, apply_fn=apply_fn, tx=tx, batch_size=batch_size))
    compiled_train = train_fn.lower(state, x_train, y_train, jnp.asarray(1, jnp.int32)).compile()
    evaluate = {}
    for name, (x, y) in splits.items():
        if name == "train" or x.shape[0] == 0:
            continue
        eval_fn = jax.jit(
            functools.partial(epoch_lib.eval_epoch, apply_fn=apply_fn, batch_size=min(eval_batch_size, x.shape[0]))
        )
        evaluate[name] = eval_fn.lower(state.params, x, y).compile()
    return CompiledRun(compiled_train, evaluate, time.perf_counter() - start)


def prepare_workdir(workdir: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    used = [name for name in RUN_FILES if (workdir / name).exists()]
    if used and not overwrite:
        raise WorkdirError(
            f"{workdir} already holds a run ({', '.join(used)}). Choose a new --workdir, or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (workdir / name).unlink(missing_ok=True)
    return workdir


def _check_shapes(config, dataset: data_lib.Dataset) -> None:
    n_train = dataset.train.y.shape[0]
    if config.train.batch_size > n_train:
        raise config_lib.ConfigError(
            f"config.train.batch_size = {config.train.batch_size} is larger than the {n_train} training "
            f"examples of {dataset.name} (after holding out validation). Use batch_size <= {n_train}."
        )


def _best_epoch(history: list[dict]) -> tuple[int, str]:
    key = "val_loss" if history and "val_loss" in history[0] else "train_loss"
    finite = [row for row in history if row.get(key) is not None and math.isfinite(row[key])]
    if not finite:
        return 0, key
    return min(finite, key=lambda row: row[key])["epoch"], key


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    quiet: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Trains `config` for `train.epochs` epochs, writing config.json, metrics.jsonl, summary.json, curves.png."""
    run_start = time.perf_counter()
    config = config_lib.validate(config)
    dataset = data_lib.load_dataset(config, quiet)
    _check_shapes(config, dataset)
    workdir = prepare_workdir(workdir, overwrite)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    model = models.make_model(config.model, dataset.num_classes)
    tx = optim.make_optimizer(config.optimizer)
    try:
        state = init_state(model, tx, config.seed, dataset.train.x)
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(
            f"model.name={config.model.name} cannot take {dataset.name}'s inputs of shape "
            f"{dataset.train.x.shape[1:]}: {e}"
        ) from e
    splits = {
        name: (jnp.asarray(split.x), jnp.asarray(split.y))
        for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))
    }
    batch_size = config.train.batch_size
    compiled = compile_run(state, model, tx, splits, batch_size, config.train.eval_batch_size)
    steps_per_epoch = epoch_lib.steps_per_epoch(dataset.train.y.shape[0], batch_size)

    history: list[dict] = []
    stop_reason = "completed"
    log = report.MetricsLog(workdir / "metrics.jsonl")
    progress = report.Progress(config.train.epochs, quiet)
    x_train, y_train = splits["train"]
    try:
        for epoch in range(1, config.train.epochs + 1):
            epoch_start = time.perf_counter()
            new_state, train_totals = compiled.train_epoch(state, x_train, y_train, jnp.asarray(epoch, jnp.int32))
            val_totals = (
                compiled.evaluate["val"](new_state.params, *splits["val"]) if "val" in compiled.evaluate else None
            )
            train_totals = jax.device_get(train_totals)  # waits for the training pass only
            train_seconds = time.perf_counter() - epoch_start
            val_totals, lr = jax.device_get((val_totals, optim.learning_rate(new_state.opt_state)))
            row = {"epoch": epoch, "steps": epoch * steps_per_epoch, **train_totals.means("train")}
            if val_totals is not None:
                row.update(val_totals.means("val"))
            row["learning_rate"] = float(lr)
            row["train_seconds"] = train_seconds
            if not math.isfinite(row["train_loss"]):
                stop_reason = "non_finite_loss"
                progress.message(f"epoch {epoch}: training loss is {row['train_loss']}; stopping.")
                break
            state = new_state
            row["seconds"] = time.perf_counter() - epoch_start
            log.write(row)
            history.append(row)
            progress.update(row)
    finally:
        log.close()
        progress.close()

    final = {}
    for name in ("val", "test"):
        if name in compiled.evaluate:
            final.update(jax.device_get(compiled.evaluate[name](state.params, *splits[name])).means(name))
    best_epoch, best_key = _best_epoch(history)
    summary = {
        "dataset": dataset.name,
        "model": config.model.name,
        "num_train_examples": int(dataset.train.y.shape[0]),
        "num_val_examples": int(dataset.val.y.shape[0]),
        "num_test_examples": int(dataset.test.y.shape[0]),
        "num_parameters": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "epochs_completed": len(history),
        "best_epoch": best_epoch,
        "best_epoch_metric": best_key,
        "stopped_epoch": len(history) + 1 if stop_reason != "completed" else 0,
        "stop_reason": stop_reason,
        **final,
        "compile_seconds": compiled.compile_seconds,
        "train_seconds": sum(row["train_seconds"] for row in history),
        "total_seconds": time.perf_counter() - run_start,
        "platform": jax.devices()[0].platform,
    }
    report.write_json(workdir / "summary.json", summary)
    report.plot_curves(history, workdir / "curves.png", f"{dataset.name} {config.model.name}")
    if not quiet:
        progress.message(
            f"test_loss {summary.get('test_loss', float('nan')):.4f}  "
            f"test_accuracy {summary.get('test_accuracy', float('nan')):.4f}  "
            f"({summary['total_seconds']:.1f} s, outputs in {workdir})"
        )
    if stop_reason == "non_finite_loss":
        raise NonFiniteLossError(
            f"Training loss became non-finite in epoch {len(history) + 1}; the run stopped and kept the state of "
            f"epoch {len(history)} (outputs in {workdir}). Lower optimizer.learning_rate or add gradient clipping."
        )
    return TrainResult(state, history, summary)
