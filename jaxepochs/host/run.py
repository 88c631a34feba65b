"""`train_and_evaluate(config, workdir)`: a run as a short sequence of named stages around the run program.

    set up (config, data, model, optimizer: every error before anything compiles) -> prepare the workdir ->
    compile the run program (beside the initialisation) -> restore or initialise the carry -> train (the
    host loop: calls of K epochs, rows logged, checkpoints on their cadence) -> finish (final evaluation,
    summary.json, curves.png)

A run is a batch of one run (host/batch.py's RunBatch, R = 1) through the program a sweep vmaps, so a sweep
member computes what its solo run computes; streamed epochs are calls of the same host loop (host/driver.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.data import lock
from jaxepochs.host import callbacks as callbacks_lib
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import compose as compose_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import ctrl_c, devices, driver, report, run_stream, saved_run, setup, specs, streamed, writers
from jaxepochs.host import hooks as hooks_lib
from jaxepochs.host import workdir as workdir_lib
from jaxepochs.host.batch import RunBatch

TIMING_KEYS = (
    "seconds",
    "examples_per_second",
    "peak_memory_bytes",
)  # a metrics row's fields that differ between equal runs


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the last good epoch was checkpointed and the outputs written."""


class TrainResult(NamedTuple):
    state: epoch_lib.TrainState  # after the last good epoch (the best one's parameters with restore_best)
    history: list[dict]  # one row per epoch, as in metrics.jsonl
    summary: dict  # as in summary.json


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a run's outputs say of its config, read once: summary.json's descriptive fields, its writers."""

    title: str  # curves.png's: the dataset and the model
    fields: dict  # summary.json's dataset, model, batch size, ...
    chance_loss: float | None  # the loss of a uniform guess, the divergence warning's reference, where known
    watch_divergence: bool  # early_stopping.divergence_threshold is unset: warn once instead
    examples_per_epoch: int  # the training split, or train.steps_per_epoch whole batches of a stream
    logging: writers.LogSpec  # the writers on, and what MLflow records


def use_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory`, unless it is "" or a cache is already set (by
    the user, the environment or an earlier run in this process). Programs that took 0.2 s (or the user's
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) to compile are kept; XLA keys them by program and backend."""
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
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


class Setup(NamedTuple):
    """A run, composed: its batch of one, what its outputs say, and the user's callbacks."""

    batch: RunBatch
    info: RunInfo
    callbacks: callbacks_lib.Callbacks | None = None

    @property
    def dataset(self) -> data_lib.Dataset:
        return self.batch.comp.dataset

    @property
    def pieces(self) -> setup.Pieces:
        return self.batch.comp.pieces

    @property
    def splits(self) -> dict:
        return self.batch.comp.splits([-1])


def set_up(config: ml_collections.ConfigDict, quiet: bool, fresh: bool = True) -> Setup:
    """The data, model, task, optimizer, early stopping and the run program's spec: every error a config or an
    experiment module's hook can cause is raised here, before anything compiles. `fresh`: the run may start
    afresh (no checkpoint to resume), so init.from_workdir's source is read and checked now."""
    writers.check_trackers(config.logging)  # mlflow or wandb on, not installed: said now, with the pip command
    hooks = hooks_lib.load_hooks(config)
    dataset = setup.load_data(config, hooks, quiet)
    if dataset.streamed and config.train.profile_epochs:
        raise config_lib.ConfigError(
            f"config.train.profile_epochs = {tuple(config.train.profile_epochs)}: profiling traces whole-epoch "
            "calls, and this run's epochs are streamed in chunks. Profile with data.stream = False (data that fits "
            "the device), or use jax.profiler around the run yourself."
        )
    say = lambda text: None if quiet else devices.warn(text)
    comp = compose_lib.compose(config, dataset, hooks, fresh=fresh, say=say)
    if dataset.streamed:  # ConfigError if a chunk is too large
        chunk = streamed.chunk_steps(config.train, config.data, dataset, comp.pieces.steps_per_epoch)
        comp = dataclasses.replace(comp, chunk_steps=chunk, stream_budget=streamed.budget(config.data)[0])
    batch = RunBatch(comp, [compose_lib.member(config, "r0", -1, comp.pieces, comp.has_val)])
    own_model = comp.pieces.hooks.get_model is not None
    model = type(comp.pieces.source.module).__name__ if own_model else config.model.name
    t = config.train
    fields = {"dataset": dataset.name, "model": model, "batch_size": t.batch_size,
              "compute_dtype": t.compute_dtype, "accumulate_steps": t.accumulate_steps}  # fmt: skip
    chance = report.chance_loss(config.task, dataset.num_classes, comp.pieces.hooks.loss_fn is not None)
    watch = config.early_stopping.divergence_threshold is None
    # The training examples an epoch trains on: the split (the padded last batch's real rows), or
    # train.steps_per_epoch whole batches of a stream read round and round.
    examples = t.steps_per_epoch * t.batch_size if t.steps_per_epoch else data_lib.count(comp.train)
    logging = specs.specs_of(config).logging
    info = RunInfo(f"{dataset.name} {model}", fields, chance, watch, examples, logging)
    return Setup(batch, info)


class Trained(NamedTuple):
    carry: Any  # run axis 1, after the last good epoch
    interrupted: bool  # Ctrl-C stopped it before its last epoch
    host_seconds: float


class Observer:
    """What a run does with each call's rows: metrics.jsonl and the writers, the progress line, the divergence
    warning (once)."""

    def __init__(self, run: Setup, log, progress, fields_of=None):
        self.run, self.log, self.progress, self.fields_of = run, log, progress, fields_of
        history = run.batch.histories["r0"]
        self.warned = report.diverged_epoch(history, run.info.chance_loss) is not None  # a resumed run said so

    def consume(self, rows, first_epoch: int, seconds: float, carry) -> bool:
        """The driver's consume: the call's rows taken, written, shown and given to the callbacks; whether the
        run halted."""
        batch, info = self.run.batch, self.run.info
        extra = self.fields_of(first_epoch) if self.fields_of is not None else {}
        fraction = extra.pop("steps_fraction", 1.0)  # a streamed epoch resumed inside it: its later steps only
        speed = {"examples_per_second": info.examples_per_epoch * fraction / seconds} if seconds > 0 else {}
        fields = {"seconds": seconds, **speed, **report.peak_memory(), **extra}
        new = batch.take_rows(rows, first_epoch, fields)["r0"]
        self.log.write_rows(new)
        for row in new:
            self.progress.update(row)
        bad = batch.non_finite.get("r0")
        if bad and bad >= first_epoch:
            self.progress.message(f"epoch {bad}: training loss is not finite; stopping.")
        history = batch.histories["r0"]
        diverged = report.diverged_epoch(history, info.chance_loss) if info.watch_divergence else None
        if diverged and not self.warned:
            self.warned = True
            self.progress.message(report.divergence_warning(history, diverged, info.chance_loss))
        if self.run.callbacks:
            self.run.callbacks.after_call(new, carry)
        return bool(np.all(rows.halted))


def train(run: Setup, call, carry, workdir: pathlib.Path, ckpt, progress, stop, **streaming) -> Trained:
    """The host loop of a run: calls of the run program (or of its streamed epochs), each call's rows logged,
    checkpoints on their cadence, and the last good epoch checkpointed at the end, at a stop, at Ctrl-C
    (`stop()` says one came), before a non-finite loss and when metrics.jsonl cannot be written."""
    batch = run.batch
    history = batch.histories["r0"]
    log = _metrics_log(workdir, run, history)  # rows past the resumed checkpoint are recomputed
    progress.skip(len(history))
    observer = Observer(run, log, progress, streaming.pop("fields_of", None))
    callbacks = run.callbacks or callbacks_lib.Callbacks((), None, workdir)  # none: nothing is called or marked
    try:
        outcome = driver.train_loop(
            batch.comp.loop, call, carry, batch.first_epoch(),
            limit=streaming.pop("limit", batch.comp.spec.epochs_per_call), consume=observer.consume,
            save=lambda carry, epoch: batch.save(ckpt, callbacks.mark_stopped(carry), epoch),
            interrupted=(lambda: stop() or callbacks.stop_requested) if callbacks else stop,
            checkpointing=ckpt is not None, final_epoch=lambda outcome: batch.last_good_epoch(),
            profile_dir=workdir / "profile", **streaming,
        )  # fmt: skip
    finally:
        log.close()
        progress.close()
    ended = len(history) < batch.comp.loop.epochs and not (batch.non_finite or outcome.halted)
    failed = callbacks.error is not None  # stopped like a Ctrl-C: resumable
    return Trained(callbacks.mark_stopped(outcome.carry), (stop() or failed) and ended, outcome.host_seconds)


def finish(run: Setup, trained: Trained, timings: dict) -> tuple:
    """The final evaluation and the summary: (the state the run ends with, summary.json's dict)."""
    batch, comp = run.batch, run.batch.comp
    start = time.perf_counter()
    ending = batch.finish(trained.carry, trained.interrupted, _final_evaluation(run))["r0"]
    history = batch.histories["r0"]
    fields = dict(ending.fields)
    restored_best = fields.pop("restored_best")
    summary = {
        **{k: run.info.fields[k] for k in ("dataset", "model")},
        "num_train_examples": data_lib.count(comp.dataset.train),
        "num_val_examples": data_lib.count(comp.dataset.val),
        "num_test_examples": data_lib.count(comp.dataset.test),
        "num_parameters": int(sum(np.size(p) for p in jax.tree.leaves(ending.state.params))),
        "batch_size": run.info.fields["batch_size"],
        "steps_per_epoch": comp.pieces.steps_per_epoch,
        "epochs_completed": len(history),
        **{k: v for k, v in fields.items() if not k.startswith(("val_", "test_"))},
        "restored_best": restored_best,
        **report.divergence_fields(history, run.info.chance_loss),
        **{k: v for k, v in fields.items() if k.startswith(("val_", "test_"))},
        "compile_seconds": timings["compile"] + time.perf_counter() - start,
        "train_seconds": sum(row["seconds"] for row in history),
        "host_seconds_per_epoch": trained.host_seconds,  # logging and checkpointing, beside the device's next call
        "streamed": comp.dataset.streamed,
        **({"input_wait_fraction": _input_wait_fraction(history)} if comp.dataset.streamed else {}),
        "total_seconds": time.perf_counter() - timings["start"],
        "platform": jax.devices()[0].platform,
        **devices.describe(comp.layout),
        "compute_dtype": run.info.fields["compute_dtype"],
        "meshes": batch.lineage()["meshes"],  # each mesh with the epochs it trained (a resumed run's, too)
        **({"initialised_from": batch.initialised_from} if batch.initialised_from is not None else {}),
        "accumulate_steps": run.info.fields["accumulate_steps"],
    }
    return jax.tree.map(jnp.asarray, ending.state), summary


def _final_evaluation(run: Setup):
    """evaluate(states) -> {split: Metrics [R]} of every non-empty held-out split: streamed, or on the device."""
    comp = run.batch.comp
    held_out = run_stream.held_out(comp)
    if comp.dataset.streamed:
        return lambda states: run_stream.final_metrics(run.batch, states, held_out)
    on_device = {name: setup.on_device(split) for name, split in held_out.items()}
    return run.batch.evaluator(on_device)


def _input_wait_fraction(history: list[dict]) -> float:
    """The fraction of a streamed run's training seconds that the host waited for its input."""
    seconds = sum(row["seconds"] for row in history)
    return sum(row.get("input_wait_seconds", 0.0) for row in history) / seconds if seconds else 0.0


def _report_end(summary: dict, workdir: pathlib.Path, progress) -> None:
    if summary["restored_best"]:
        progress.message(
            f"Restored the parameters of epoch {summary['best_epoch']}, the best by {summary['best_epoch_metric']}."
        )
    if summary["stop_reason"] not in ("completed", "non_finite_loss", "interrupted"):
        progress.message(
            f"Stopped early at epoch {summary['stopped_epoch']} ({summary['stop_reason']}); best epoch "
            f"{summary['best_epoch']}."
        )
    tested = "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("test_"))
    progress.message(f"{tested}  ({summary['total_seconds']:.1f} s, outputs in {workdir})")


def _metrics_log(workdir: pathlib.Path, run: Setup, history: list[dict]):
    """metrics.jsonl and the writers of config.logging (process 0's; the others write nothing)."""
    if not devices.is_primary():
        return writers.NullWriter()
    return writers.open_logs(report.MetricsLog(workdir / "metrics.jsonl", history), workdir, run.info.logging, history)


def write_run_json(workdir: pathlib.Path, run: Setup) -> None:
    """The shapes `load` needs to rebuild the run's state without its data."""
    saved_run.write_shapes(
        workdir / "run.json", run.dataset, run.pieces.steps_per_epoch, data_lib.count(run.dataset.val)
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    quiet: bool = False,
    restart: bool = False,
    plot: bool = True,
    callbacks: Sequence[Callable] = (),
) -> TrainResult:
    """Trains `config` for `train.epochs` epochs in `workdir`, resuming a run already there.

    Writes config.json, run.json, metrics.jsonl, summary.json, curves.png (unless `plot` is False: a sweep
    draws its own) and checkpoints/. Holds the workdir's lock throughout (a second process is refused), and from
    the moment it touches the workdir a Ctrl-C stops the run at the next call's end, saves it, writes its
    outputs, then raises KeyboardInterrupt. `callbacks`: functions called with each epoch's row (after the
    experiment module's on_epoch_end), which may stop the run (host/callbacks.py).
    """
    timings = {"start": time.perf_counter()}
    workdir = workdir_lib.as_workdir(workdir)
    primary = devices.is_primary()  # process 0 writes the outputs and the checkpoints' arrays
    devices.on_primary(lambda: lock.check_free(workdir, "workdir"))
    devices.on_primary(lambda: workdir_lib.check_kind(workdir, "run"))  # a sweep's, lr-find's, a study's: refused
    callbacks_lib.check(callbacks)
    config = config_lib.validate(config)
    devices.check_same_config(config.to_json_best_effort())
    use_compilation_cache(config.train.compilation_cache_dir)
    fresh = restart or not workdir_lib.checkpointed_epochs(workdir)
    run = set_up(config, quiet or not primary, fresh)
    hook = run.pieces.hooks.on_epoch_end
    run = run._replace(callbacks=callbacks_lib.Callbacks([*([hook] if hook else []), *callbacks],
                                                         run.batch.comp.spec.tx, workdir))  # fmt: skip
    ctrl_c.stop_if_pressed("the run")  # a Ctrl-C of the command's first seconds: nothing written yet
    with lock.hold(workdir, "workdir") if primary else contextlib.nullcontext():
        progress = report.Progress(config.train.epochs, quiet or not primary)
        with driver.stop_on_ctrl_c(progress.message) as stop:
            say = progress.message
            resuming = devices.on_primary(lambda: workdir_lib.prepare_workdir(workdir, config, restart, say))
            devices.on_primary(lambda: write_run_json(workdir, run))
            resuming = bool(devices.agree((int(bool(resuming)),))[0])  # the others wait for process 0's workdir
            trained = _train_in(run, workdir, resuming, progress, stop, timings)
            state, summary = finish(run, trained, timings)
            _write_outputs(run, trained, summary, workdir, progress, stop, plot)
    run.callbacks.raise_if_failed(workdir)
    history = run.batch.histories["r0"]
    if run.batch.non_finite:
        raise NonFiniteLossError(
            f"Training loss became non-finite in epoch {run.batch.non_finite['r0']}; the run stopped and kept the "
            f"state and checkpoint of epoch {len(history)} (outputs in {workdir}). Lower optimizer.learning_rate "
            "or set optimizer.clip_norm"
            + (
                f"; or check loss_fn in {run.pieces.hooks.module}, which may itself return NaN or inf (a log of 0, a "
                "division by 0)."
                if run.pieces.hooks.loss_fn is not None
                else "."
            )  # fmt: skip
        )
    return TrainResult(state, history, summary)


def _write_outputs(run: Setup, trained: Trained, summary: dict, workdir, progress, stop, plot: bool) -> None:
    """summary.json, curves.png, the end said, MLflow's run ended; Ctrl-C said and raised after them."""
    history, primary = run.batch.histories["r0"], devices.is_primary()
    if primary:
        report.write_json(workdir / "summary.json", summary)
    if plot and primary and run.info.logging.curves:
        report.plot_curves(history, workdir / "curves.png", run.info.title, summary)
    _report_end(summary, workdir, progress)
    if primary:
        status = "KILLED" if stop() else "FAILED" if run.batch.non_finite else "FINISHED"
        writers.finish_run(workdir, run.info.logging, history, summary, status)
    if stop():
        _say_interrupted(trained, history, workdir, run.batch.comp.loop.checkpointing, progress)
        raise KeyboardInterrupt


def _train_in(run: Setup, workdir: pathlib.Path, resuming: bool, progress, stop, timings: dict) -> Trained:
    """Compiles, restores or initialises, and trains. The checkpoints are written before it returns (or
    raises)."""
    loop = run.batch.comp.loop
    with checkpoint_lib.opened(workdir, loop.max_to_keep, loop.checkpointing, run.batch.keep_best()) as ckpt:
        if run.dataset.streamed:
            return run_stream.train_streamed(run, workdir, ckpt if resuming else None, ckpt, progress, stop,
                                             timings, train)  # fmt: skip
        call, carry, timings["compile"] = run.batch.prepare(ckpt if resuming else None, progress)
        ctrl_c.stop_if_nothing_trained(run.batch.last_good_epoch(), stop, progress.message)
        if resuming:
            _say_resumed(run.batch, ckpt, progress)
            run_stream.say_position_dropped(run.batch, workdir, progress)
        return train(run, call, carry, workdir, ckpt, progress, stop)


def _say_resumed(batch: RunBatch, ckpt, progress) -> None:
    done = batch.last_good_epoch()
    if done:
        progress.message(f"Resuming {ckpt.directory.parent} from the checkpoint of epoch {done}.")


def _say_interrupted(trained: Trained, history: list[dict], workdir: pathlib.Path, checkpointing: bool, progress):
    if not trained.interrupted:
        progress.message(f"Ctrl-C: the run had finished epoch {len(history)}; its checkpoint and outputs are saved.")
        return
    saved = (
        f"checkpoint and outputs saved in {workdir}. Run the same command again to resume."
        if checkpointing
        else f"outputs saved in {workdir}; checkpoint.enabled is False, so there is nothing to resume from."
    )
    progress.message(f"Interrupted after epoch {len(history)}; {saved}")
