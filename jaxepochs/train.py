"""The host loop: compile the epoch once, run it `train.epochs` times, log, checkpoint, and write the outputs.

The host touches each epoch once: it dispatches the compiled training epoch and the validation pass, fetches a
handful of scalars, advances early stopping and reduce-on-plateau (tiny compiled updates), and now and then
starts an asynchronous checkpoint. Everything per batch runs on the device.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import pathlib
import shutil
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxepochs import checkpoint as checkpoint_lib
from jaxepochs import config as config_lib
from jaxepochs import data as data_lib
from jaxepochs import early_stopping as early_stopping_lib
from jaxepochs import epoch as epoch_lib
from jaxepochs import models, multi_epoch, report, schedules

RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "run.json")
TIMING_KEYS = ("train_seconds", "seconds")  # the only fields of a metrics row that differ between equal runs
RESUMABLE_KEYS = ("train.epochs", "checkpoint.", "data.data_dir", "train.compilation_cache_dir")  # may change


class WorkdirError(ValueError):
    """The workdir holds a run that this one cannot continue."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the last good epoch was checkpointed and the outputs written."""


class TrainResult(NamedTuple):
    state: epoch_lib.TrainState  # after the last good epoch (the best one's parameters with restore_best)
    history: list[dict]  # one row per epoch, as in metrics.jsonl
    summary: dict  # as in summary.json


class CompiledRun(NamedTuple):
    """The run's compiled programs; calling them never traces or compiles again."""

    train_epoch: Any  # (state, x_n, y_n, epoch) -> (state, Metrics)
    evaluate: dict[str, Any]  # split name -> (params, x_n, y_n) -> Metrics
    compile_seconds: float
    run_epochs: Any = None  # train.epochs_per_call > 1: multi_epoch's (carry, splits, first, last) program


def use_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory`, unless it is "" or a cache is already set (by
    the user, the environment or an earlier run in this process). Programs that took 0.2 s or more to compile
    are kept; XLA keys them by program and backend, so a stale entry is never used."""
    if not directory or jax.config.jax_compilation_cache_dir:
        return
    path = pathlib.Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a cache only saves time: say so and compile without one
        print(
            f'jaxepochs: train.compilation_cache_dir = "{directory}" cannot be created ({e}); compiling without '
            'a cache. Point it at a writable directory, or set it to "" to silence this.',
            file=sys.stderr,
        )
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _init(model, tx, seed, x_1f) -> epoch_lib.TrainState:
    params, run_key = _init_params(model, seed, x_1f)  # the run key: raw uint32[2], checkpointable
    return epoch_lib.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), run_key)


def _init_params(model, seed, x_1f):
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    return models.init_params(model, init_key, x_1f), run_key


def init_params_program(model):
    """(seed uint32[], x_1f) -> (params, run key), jitted: the program of a run's parameters (and a sweep's, per
    run)."""
    return jax.jit(functools.partial(_init_params, model))


def init_state(model, tx, seed: int, example_x) -> epoch_lib.TrainState:
    """Parameters, optimizer state, step 0 and the run key, from `seed` (the values of `_init`). Two compiled
    programs: the parameters' depends on the model alone, so runs that differ in learning rate or schedule
    (whose first rate is a constant in the optimizer's init) find it in the compilation cache; on CPU it is the
    costly one (the random initialisers' threefry: about 3 s for the MNIST-1D MLP)."""
    params, run_key = init_params_program(model)(jnp.asarray(seed, jnp.uint32), jnp.asarray(example_x[:1]))
    return epoch_lib.TrainState(params, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32), run_key)


def compile_run(
    state,
    model,
    tx,
    splits: dict[str, tuple],
    batch_size: int,
    eval_batch_size: int,
    multi: dict | None = None,
    shuffle: bool = True,
) -> CompiledRun:
    """Lowers and compiles the training epoch and one evaluation pass per held-out split (their shapes differ);
    with `multi` (multi_epoch.make_run_epochs' tracker, may_stop, epochs_per_call, test_every, log_test, and
    the carry to compile for), the many-epoch program instead of the training epoch."""
    apply_fn = lambda params, x: model.apply({"params": params}, x)
    start = time.perf_counter()
    eval_sizes = {
        name: min(eval_batch_size, x.shape[0]) for name, (x, _) in splits.items() if name != "train" and x.shape[0]
    }
    evaluate = {}
    for name, size in eval_sizes.items():
        eval_fn = jax.jit(functools.partial(epoch_lib.eval_epoch, apply_fn=apply_fn, batch_size=size))
        evaluate[name] = eval_fn.lower(state.params, *splits[name]).compile()
    one = jnp.asarray(1, jnp.int32)
    if multi is not None:
        fused_sizes = {name: size for name, size in eval_sizes.items() if name == "val" or multi["log_test"]}
        run_epochs = multi_epoch.make_run_epochs(
            apply_fn=apply_fn,
            tx=tx,
            batch_size=batch_size,
            eval_batch_sizes=fused_sizes,
            tracker=multi["tracker"],
            may_stop=multi["may_stop"],
            epochs_per_call=multi["epochs_per_call"],
            test_every=multi["test_every"],
            shuffle=shuffle,
        )
        used = {name: splits[name] for name in ("train", *fused_sizes)}
        compiled = jax.jit(run_epochs).lower(multi["carry"], used, one, one).compile()
        return CompiledRun(None, evaluate, time.perf_counter() - start, compiled)
    x_train, y_train = splits["train"]
    train_fn = jax.jit(
        functools.partial(epoch_lib.train_epoch, apply_fn=apply_fn, tx=tx, batch_size=batch_size, shuffle=shuffle)
    )
    compiled_train = train_fn.lower(state, x_train, y_train, one).compile()
    return CompiledRun(compiled_train, evaluate, time.perf_counter() - start)


def prepare_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, restart: bool) -> bool:
    """Makes `workdir` ready; True when it holds a run of the same config to resume."""
    used = any((workdir / name).exists() for name in (*RUN_FILES, "config.json", checkpoint_lib.CHECKPOINT_DIR))
    if used and restart:
        shutil.rmtree(workdir / checkpoint_lib.CHECKPOINT_DIR, ignore_errors=True)
        for name in (*RUN_FILES, "config.json"):
            (workdir / name).unlink(missing_ok=True)
        used = False
    if used:
        if not (workdir / "config.json").exists():
            raise WorkdirError(
                f"{workdir} holds run outputs but no config.json, so it cannot be resumed. Use a new --workdir, "
                "or --restart (restart=True) to discard them."
            )
        old = config_lib.flatten(json.loads((workdir / "config.json").read_text()))
        new = config_lib.flatten(json.loads(config.to_json_best_effort()))
        # A key that the run's jaxepochs did not have yet resumes at its default (the behaviour it had then).
        defaults = config_lib.flatten(json.loads(config_lib.base_config().to_json_best_effort()))
        old.update({k: v for k, v in new.items() if k not in old and defaults.get(k, object()) == v})
        differing = [
            k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS)
        ]
        if differing:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing[:8])
            raise WorkdirError(
                f"{workdir} holds a run with another config ({shown}). Use a new --workdir, or --restart "
                "(restart=True) to discard that run. Only train.epochs, checkpoint.* and data.data_dir may change "
                "when resuming."
            )
        if not config.checkpoint.enabled:
            raise WorkdirError(
                f"{workdir} holds a run, and checkpoint.enabled=False cannot resume it. Enable checkpoints, use a "
                "new --workdir, or --restart (restart=True) to start over."
            )
        if not (workdir / checkpoint_lib.CHECKPOINT_DIR).exists():
            raise WorkdirError(
                f"{workdir} holds a run without checkpoints to resume from. Use a new --workdir, or --restart "
                "(restart=True) to start over."
            )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    return used


def _check_shapes(config, dataset: data_lib.Dataset) -> None:
    n_train = dataset.train.y.shape[0]
    if config.model.name == "transformer" and np.issubdtype(dataset.train.x.dtype, np.integer):
        vocab = config.model.vocab_size or dataset.num_classes + 1
        top = max(int(dataset.train.x.max()), int(dataset.test.x.max()))
        if top >= vocab:
            raise config_lib.ConfigError(
                f"{dataset.name} has token ids up to {top}, but the transformer's vocabulary is 0..{vocab - 1}. "
                f"Set model.vocab_size to at least {top + 1}."
            )
    if config.train.batch_size > n_train:
        raise config_lib.ConfigError(
            f"config.train.batch_size = {config.train.batch_size} is larger than the {n_train} training "
            f"examples of {dataset.name} (after holding out validation). Use batch_size <= {n_train}."
        )


def _tracker(config, has_validation: bool) -> tuple[early_stopping_lib.EarlyStopping, bool]:
    """The early-stopping rule, and whether it may stop the run; disabled, it only tracks the best epoch."""
    if config.early_stopping.enabled:
        return config_lib.make_early_stopping(config.early_stopping, has_validation), True
    # Never stops (a stopped state freezes, and the best epoch must keep being tracked).
    monitor = "val_loss" if has_validation else "train_loss"
    return early_stopping_lib.EarlyStopping(monitor=monitor, patience=2**30, stop_on_nonfinite=False), False


def load(workdir: str | pathlib.Path, epoch: int | str | None = None) -> epoch_lib.TrainState:
    """The train state of a run's checkpoint: the newest (None), "best" (its best epoch's parameters) or epoch N."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "run.json").exists():
        raise WorkdirError(f"{workdir} holds no jaxepochs run (no run.json); pass the --workdir of a run.")
    config = config_lib.validate(ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())))
    run = json.loads((workdir / "run.json").read_text())
    model = models.make_model(config.model, run["num_classes"])
    tx = schedules.make_optimizer(config.optimizer, run["steps_per_epoch"], config.train.epochs)
    state = init_state(model, tx, config.seed, np.zeros([1, *run["input_shape"]], np.float32))
    tracker, _ = _tracker(config, run["num_val_examples"] > 0)
    like = checkpoint_lib.arrays_of(state, _control(tracker, config), state.params)
    ckpt = checkpoint_lib.Checkpointer(workdir)
    try:
        saved = ckpt.epochs()
        if not saved:
            raise WorkdirError(f"{workdir} has no checkpoints.")
        chosen = saved[-1] if epoch in (None, "best") else int(epoch)
        if chosen not in saved:
            raise WorkdirError(f"{workdir} has no checkpoint of epoch {epoch}; it has epochs {saved}.")
        arrays, _ = ckpt.restore(chosen, like)
    finally:
        ckpt.close()
    state = arrays["train"]
    return state._replace(params=arrays["best_params"]) if epoch == "best" else state


def _control(tracker, config) -> dict:
    return {"early_stopping": tracker.init(), "plateau": schedules.plateau_init(config.optimizer)}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    quiet: bool = False,
    restart: bool = False,
    plot: bool = True,
) -> TrainResult:
    """Trains `config` for `train.epochs` epochs in `workdir`, resuming a run already there.

    Writes config.json, run.json, metrics.jsonl, summary.json, curves.png (unless `plot` is False: a sweep
    draws its own) and checkpoints/.
    """
    run_start = time.perf_counter()
    config = config_lib.validate(config)
    use_compilation_cache(config.train.compilation_cache_dir)
    dataset = data_lib.load_dataset(config, quiet)
    _check_shapes(config, dataset)
    workdir = pathlib.Path(workdir)
    resuming = prepare_workdir(workdir, config, restart)
    progress = report.Progress(config.train.epochs, quiet)

    batch_size = config.train.batch_size
    steps_per_epoch = epoch_lib.steps_per_epoch(dataset.train.y.shape[0], batch_size)
    has_validation = dataset.val.y.shape[0] > 0
    report.write_json(
        workdir / "run.json",
        {
            "steps_per_epoch": steps_per_epoch,
            "num_classes": dataset.num_classes,
            "input_shape": list(dataset.train.x.shape[1:]),
            "num_val_examples": int(dataset.val.y.shape[0]),
        },
    )
    model = models.make_model(config.model, dataset.num_classes)
    tx = schedules.make_optimizer(config.optimizer, steps_per_epoch, config.train.epochs)
    try:  # the state's shapes, traced without compiling: model errors surface here, before any thread starts
        abstract_state = jax.eval_shape(
            functools.partial(_init, model, tx), jnp.asarray(config.seed, jnp.uint32), dataset.train.x[:1]
        )
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(
            f"model.name={config.model.name} cannot take {dataset.name}'s inputs of shape "
            f"{dataset.train.x.shape[1:]}: {e}"
        ) from e
    tracker, may_stop = _tracker(config, has_validation)
    control = _control(tracker, config)
    splits = {
        name: (jnp.asarray(split.x), jnp.asarray(split.y))
        for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))
    }
    epochs_per_call = config.train.epochs_per_call
    multi = None
    if epochs_per_call > 1:
        multi = {
            "tracker": tracker,
            "may_stop": may_stop,
            "epochs_per_call": epochs_per_call,
            "test_every": config.train.test_every,
            "log_test": config.train.log_test,
            "carry": multi_epoch.Carry.start(abstract_state, control["early_stopping"], abstract_state.params),
        }
    history: list[dict] = []
    ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint.max_to_keep) if config.checkpoint.enabled else None
    # The epoch programs compile in a second thread while the initialisation's program compiles and runs here:
    # XLA's compiles overlap (a cold MNIST-1D MLP run on 2 CPU cores: 7.9 s -> 7.2 s, the mean of 5 pairs).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        compiling = pool.submit(
            compile_run,
            abstract_state,
            model,
            tx,
            splits,
            batch_size,
            config.train.eval_batch_size,
            multi,
            config.train.shuffle,
        )
        state = init_state(model, tx, config.seed, dataset.train.x)
        best_params = state.params
        if resuming and ckpt is not None:
            try:
                restored = ckpt.restore_latest(checkpoint_lib.arrays_of(state, control, best_params), progress.message)
            except checkpoint_lib.CheckpointError:
                ckpt.close()
                raise
            if restored is not None:
                done, arrays, meta = restored
                state, control, best_params = arrays["train"], arrays["control"], arrays["best_params"]
                history = meta["history"]
                progress.message(f"Resuming {workdir} from the checkpoint of epoch {done}.")
        compiled = compiling.result()
    scalar = np.float32(0)  # the per-epoch control updates, compiled before the first epoch too

    def tracker_step(es_state, value, train_value):
        # Also packs what the host reads into one int32[3]: one transfer, not one per field (~0.3 ms on CPU).
        es_state = tracker.update(es_state, value, train_value)
        return es_state, jnp.stack([es_state.best_epoch, es_state.should_stop.astype(jnp.int32), es_state.stop_reason])

    tracker_update = jax.jit(tracker_step).lower(control["early_stopping"], scalar, scalar).compile()
    if control["plateau"] is not None:
        plateau_update = jax.jit(schedules.plateau_update).lower(control["plateau"], scalar).compile()
    monitor = tracker.monitor
    plateau_monitor = config.optimizer.schedule.monitor

    def save(epoch: int) -> None:
        if ckpt is not None and epoch > 0:
            meta = {"epoch": epoch, "history": list(history)}  # a copy: orbax writes it later
            ckpt.save(epoch, checkpoint_lib.arrays_of(state, control, best_params), meta)

    stop_reason, aborted = "completed", False
    stop_requested: list[bool] = []

    def on_sigint(signum, frame):  # Ctrl-C: finish the epoch in flight, checkpoint it, stop; twice: abort
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(True)
        progress.message("Ctrl-C: stopping after this epoch (press again to abort without saving).")

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    log = report.MetricsLog(workdir / "metrics.jsonl")
    for row in history:  # rows past the resumed checkpoint are dropped: they will be recomputed identically
        log.write(row)
    progress.skip(len(history))
    x_train, y_train = splits["train"]
    log_test = config.train.log_test and "test" in compiled.evaluate
    last_save = time.perf_counter()
    host_seconds: list[float] = []  # per epoch: the host's work between an epoch's results and the next's
    try:
        first_epoch = len(history) + 1
        if compiled.run_epochs is not None:  # train.epochs_per_call > 1: many epochs per compiled call
            fused = ("train", *(("val",) if has_validation else ()), *(("test",) if log_test else ()))
            fused_splits = {name: splits[name] for name in fused}
            epoch, saved_epoch = first_epoch, len(history)
            already_stopped = may_stop and bool(control["early_stopping"].should_stop)
            while epoch <= config.train.epochs and not already_stopped:
                call_start = time.perf_counter()
                carry = multi_epoch.Carry.start(state, control["early_stopping"], best_params)
                carry, rows = compiled.run_epochs(
                    carry, fused_splits, jnp.asarray(epoch, jnp.int32), jnp.asarray(config.train.epochs, jnp.int32)
                )
                rows = jax.device_get(rows)
                seconds = (time.perf_counter() - call_start) / max(int(rows.ran), 1)
                state, best_params = carry.state, carry.best_params
                control = {**control, "early_stopping": carry.es_state}
                new_rows, non_finite = multi_epoch.call_rows(rows, epoch, steps_per_epoch)
                for row in new_rows:
                    row["train_seconds"] = row["seconds"] = seconds
                    log.write(row)
                    history.append(row)
                    progress.update(row)
                if non_finite:
                    stop_reason = "non_finite_loss"
                    progress.message(f"epoch {len(history) + 1}: training loss is not finite; stopping.")
                epoch = len(history) + 1
                if stop_reason == "non_finite_loss":
                    break
                if may_stop and bool(carry.es_state.should_stop):
                    stop_reason = early_stopping_lib.stop_reason_name(int(carry.es_state.stop_reason))
                    break
                if stop_requested:
                    stop_reason = "interrupted"
                    break
                every = config.checkpoint.every_epochs
                # Checkpoints fall at call boundaries: every_epochs counts from the last save.
                due = (
                    len(history) - saved_epoch >= every
                    if every
                    else time.perf_counter() - last_save >= config.checkpoint.every_seconds
                )
                if due:
                    save(len(history))
                    last_save, saved_epoch = time.perf_counter(), len(history)
        else:
            # Epoch e+1 is dispatched as soon as epoch e's stop decision is known, before e is logged and
            # checkpointed, so that bookkeeping overlaps the device's next epoch. The decision itself (metrics,
            # NaN check, early stopping, plateau) comes first: on CPU, programs run in dispatch order, so a device
            # call made after e+1's dispatch would wait for all of e+1.

            def dispatch(epoch: int, from_state) -> dict:
                new_state, train_totals = compiled.train_epoch(
                    from_state, x_train, y_train, jnp.asarray(epoch, jnp.int32)
                )
                test_due = log_test and (epoch % config.train.test_every == 0 or epoch == config.train.epochs)
                return {
                    "epoch": epoch,
                    "state": new_state,
                    "train": train_totals,
                    "val": compiled.evaluate["val"](new_state.params, *splits["val"]) if has_validation else None,
                    "test": compiled.evaluate["test"](new_state.params, *splits["test"]) if test_due else None,
                    "lr": schedules.learning_rate_of(new_state.opt_state),
                }

            resumed_stopped = may_stop and bool(control["early_stopping"].should_stop)
            last_done = time.perf_counter()  # when the previous epoch's results were in (here: the start)
            pending = (
                dispatch(first_epoch, state) if first_epoch <= config.train.epochs and not resumed_stopped else None
            )
            while pending is not None:
                epoch = pending["epoch"]
                train_totals = jax.device_get(pending["train"])  # waits for the training pass only
                train_done = time.perf_counter()
                val_totals, test_totals, lr = jax.device_get((pending["val"], pending["test"], pending["lr"]))
                row = report.metrics_row(epoch, epoch * steps_per_epoch, train_totals, val_totals, test_totals, lr)
                if not math.isfinite(row["train_loss"]):
                    stop_reason = "non_finite_loss"
                    progress.message(f"epoch {epoch}: training loss is {row['train_loss']}; stopping.")
                    break
                state = pending["state"]
                es_state, es_host = tracker_update(
                    control["early_stopping"], np.float32(row[monitor]), np.float32(row["train_loss"])
                )
                best_epoch, should_stop, stop_code = (int(v) for v in jax.device_get(es_host))
                if best_epoch == epoch:
                    best_params = state.params
                control = {**control, "early_stopping": es_state}
                if control["plateau"] is not None:
                    plateau = plateau_update(control["plateau"], np.float32(row[plateau_monitor]))
                    state = state._replace(opt_state=schedules.with_plateau_scale(state.opt_state, plateau))
                    control = {**control, "plateau": plateau}
                if may_stop and should_stop:
                    stop_reason = early_stopping_lib.stop_reason_name(stop_code)
                elif stop_requested:
                    stop_reason = "interrupted"
                decided = time.perf_counter()
                going_on = stop_reason == "completed" and epoch < config.train.epochs
                pending = dispatch(epoch + 1, state) if going_on else None
                row["train_seconds"] = train_done - last_done
                row["seconds"] = decided - last_done  # results to results: the device's epoch and the host's gap
                log.write(row)
                history.append(row)
                progress.update(row)
                every = config.checkpoint.every_epochs
                since_save = time.perf_counter() - last_save
                due = epoch % every == 0 if every else since_save >= config.checkpoint.every_seconds
                if due and going_on:
                    save(epoch)
                    last_save = time.perf_counter()
                host_seconds.append(time.perf_counter() - decided)  # bookkeeping beside the next epoch
                last_done = decided
    except KeyboardInterrupt:  # a second Ctrl-C: the state may be half-updated, so it is not saved
        aborted = True
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
        log.close()
        progress.close()
        if not aborted:
            save(len(history))  # the last good epoch: at the end, at a stop, at Ctrl-C, before a NaN
        if ckpt is not None:
            ckpt.close()
    if stop_reason == "interrupted":
        progress.message(
            f"Interrupted after epoch {len(history)}; checkpoint saved in {workdir}. Run the same command again "
            "to resume."
        )
        raise KeyboardInterrupt

    es_state = control["early_stopping"]
    restored_best = bool(config.early_stopping.enabled and config.early_stopping.restore_best and history)
    if restored_best:
        state = state._replace(params=best_params)
        progress.message(f"Restored the parameters of epoch {int(es_state.best_epoch)}, the best by {monitor}.")
    final = {}
    for name in ("val", "test"):
        if name in compiled.evaluate:
            final.update(jax.device_get(compiled.evaluate[name](state.params, *splits[name])).means(name))
    best_epoch = int(es_state.best_epoch)
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
        "best_epoch_metric": monitor,
        "best_value": float(es_state.best_value) if best_epoch else None,
        "stopped_epoch": int(es_state.stop_epoch) if stop_reason not in ("completed", "non_finite_loss") else 0,
        "stop_reason": stop_reason,
        "restored_best": restored_best,
        **final,
        "compile_seconds": compiled.compile_seconds,
        "train_seconds": sum(row["train_seconds"] for row in history),
        # Median per epoch: logging and checkpointing after the next epoch is dispatched, beside it.
        "host_seconds_per_epoch": float(np.median(host_seconds)) if host_seconds else 0.0,
        "total_seconds": time.perf_counter() - run_start,
        "platform": jax.devices()[0].platform,
    }
    if stop_reason == "non_finite_loss":
        summary["non_finite_epoch"] = len(history) + 1
        summary["stopped_epoch"] = len(history) + 1
    report.write_json(workdir / "summary.json", summary)
    if plot:
        report.plot_curves(history, workdir / "curves.png", f"{dataset.name} {config.model.name}")
    if stop_reason not in ("completed", "non_finite_loss"):
        progress.message(f"Stopped early at epoch {summary['stopped_epoch']} ({stop_reason}); best epoch {best_epoch}.")
    progress.message(
        f"test_loss {summary.get('test_loss', float('nan')):.4f}  "
        f"test_accuracy {summary.get('test_accuracy', float('nan')):.4f}  "
        f"({summary['total_seconds']:.1f} s, outputs in {workdir})"
    )
    if stop_reason == "non_finite_loss":
        raise NonFiniteLossError(
            f"Training loss became non-finite in epoch {len(history) + 1}; the run stopped and kept the state and "
            f"checkpoint of epoch {len(history)} (outputs in {workdir}). Lower optimizer.learning_rate or set "
            "optimizer.clip_norm."
        )
    return TrainResult(state, history, summary)
