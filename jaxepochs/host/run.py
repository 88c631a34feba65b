"""`train_and_evaluate(config, workdir)`: a run as a short sequence of named stages around the run program.

    set up (config, data, model, optimizer: every error before anything compiles) -> prepare the workdir ->
    compile the run program (beside the initialisation) -> restore or initialise the carry -> train (the
    host loop: calls of K epochs, rows logged, checkpoints on their cadence) -> finish (final evaluation,
    summary.json, curves.png)

A run is the run program on a batch of one run (core/program.py): the same program a sweep vmaps, so a sweep
member computes what its solo run computes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import layout as layout_lib
from jaxepochs.core import program as program_lib
from jaxepochs.core import stream as stream_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.data import lock
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import devices, driver, finetune, report, setup, streamed, writers
from jaxepochs.host import hooks as hooks_lib
from jaxepochs.host import workdir as workdir_lib
from jaxepochs.host.workdir import WorkdirError

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


class Programs(NamedTuple):
    """A run's run program, compiled: calling it never traces or compiles again."""

    run_epochs: Any  # driver's call(carry, first epoch, count) -> (carry, EpochRows); None with 0 epochs
    seconds: float
    streamed: streamed.Programs | None = None  # a streamed run's chunk programs (they compile at first use)


class Setup(NamedTuple):
    config: ml_collections.ConfigDict
    dataset: data_lib.Dataset
    pieces: setup.Pieces
    spec: program_lib.RunSpec
    splits: dict  # the program's splits on the device: train, and val / test where evaluated every epoch
    held_out: dict  # every non-empty held-out split on the device, for the final evaluation
    # (a streamed run: both hold the host's Splits, read a chunk at a time)
    chunk_steps: int = 0  # a streamed run's training batches per chunk (streamed.chunk_steps), else 0
    layout: Any = None  # core/layout.Layout where the run spans devices (its batches over "data"), else None


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


def set_up(config: ml_collections.ConfigDict, quiet: bool, fresh: bool = True) -> Setup:
    """The data, model, task, optimizer, early stopping and the run program's spec: every error a config or an
    experiment module's hook can cause is raised here, before anything compiles. `fresh`: the run may start
    afresh (no checkpoint to resume), so init.from_workdir's source is read and checked now."""
    if config.logging.mlflow:
        writers.import_mlflow()  # not installed: said now, with the pip command
    hooks = hooks_lib.load_hooks(config)
    dataset = setup.load_data(config, hooks, quiet)
    setup.check_shapes(config, dataset)
    if dataset.streamed and config.train.profile_epochs:
        raise config_lib.ConfigError(
            f"config.train.profile_epochs = {tuple(config.train.profile_epochs)}: profiling traces whole-epoch "
            "calls, and this run's epochs are streamed in chunks. Profile with data.stream = False (data that fits "
            "the device), or use jax.profiler around the run yourself."
        )
    has_val = data_lib.count(dataset.val) > 0
    steps = streamed.steps_per_epoch(config, data_lib.count(dataset.train))
    chunk = streamed.chunk_steps(config, dataset, steps) if dataset.streamed else 0  # ConfigError if too large
    layout = devices.run_layout(config, dataset.streamed, lambda text: None if quiet else devices.warn(text))
    pieces = setup.make_pieces(config, dataset, hooks, steps, has_val)
    if fresh:  # a resumed run restores its own checkpoint: the source run may have gone
        pieces = setup.with_warm_start(pieces, config, setup.first_example(dataset.train))
    held_out = {name: getattr(dataset, name) for name in ("val", "test") if data_lib.count(getattr(dataset, name))}
    sizes = setup.eval_sizes(config, {name: data_lib.count(split) for name, split in held_out.items()})
    every_epoch = {name: size for name, size in sizes.items() if name == "val" or config.train.log_test}
    spec = setup.run_spec(config, pieces, every_epoch, layout=layout)
    if dataset.streamed:
        return Setup(config, dataset, pieces, spec, {"train": dataset.train, **held_out}, held_out, chunk, layout)
    on_device = functools.partial(setup.on_device, layout=layout)
    splits = {"train": on_device(dataset.train), **{k: on_device(held_out[k]) for k in every_epoch}}
    held_out = {name: splits.get(name) or on_device(split) for name, split in held_out.items()}
    return Setup(config, dataset, pieces, spec, splits, held_out, layout=layout)


def compile_programs(run: Setup, abstract_carry) -> Programs:
    """Lowers and compiles the run program (unless there are no epochs)."""
    start = time.perf_counter()
    one = jnp.asarray(1, jnp.int32)
    run_epochs = None
    if run.dataset.streamed:
        return Programs(None, 0.0, streamed.make_programs(run.spec))
    if run.config.train.epochs > 0:
        es_h = setup.es_hparams([run.pieces.tracker])
        program = program_lib.make_run_epochs(run.spec)
        if run.layout is None:
            lowered = jax.jit(program).lower(abstract_carry, run.splits, es_h, one, one, one)
        else:
            es_h = devices.put(es_h, run.layout.replicated())
            lowered = setup.jit_on(run.layout, program, abstract_carry).lower(
                abstract_carry, run.splits, es_h, one, one, one
            )
        # On a mesh the epoch numbers go in as replicated global scalars (every process's same values).
        put = np.asarray if run.layout is None else functools.partial(devices.put, shardings=run.layout.replicated())
        run_epochs = functools.partial(_call_with, lowered.compile(), run.splits, es_h, run.config.train.epochs, put)
    return Programs(run_epochs, time.perf_counter() - start)


def final_metrics(run: Setup, state) -> tuple[dict, float]:
    """Every held-out split's metrics of `state` (a TrainState, no run axis), and the seconds its program took to
    compile. It compiles here, at the end, not before the first epoch: 0.3 s that the first epoch no longer
    waits for."""
    start = time.perf_counter()
    if run.dataset.streamed:
        programs = streamed.make_programs(run.spec)
        sizes = setup.eval_sizes(run.config, {name: data_lib.count(split) for name, split in run.held_out.items()})
        spec = dataclasses.replace(run.spec, eval_batch_sizes=sizes)
        examples = run.chunk_steps * run.config.train.batch_size
        return streamed.final_metrics(programs, spec, state, run.held_out, examples), 0.0
    sizes = setup.eval_sizes(run.config, {name: epoch_lib.num_examples(d) for name, d in run.held_out.items()})
    evaluate = jax.jit(program_lib.make_evaluate(dataclasses.replace(run.spec, eval_batch_sizes=sizes)))
    state_r = setup.with_run_axis(state)
    if run.layout is not None:  # where training kept it: split over "data" with shard_params
        state_r = devices.put(state_r, layout_lib.carry_shardings(run.layout, state_r))
    compiled = evaluate.lower(state_r, run.held_out).compile()
    seconds = time.perf_counter() - start
    totals = devices.fetch(compiled(state_r, run.held_out))
    return {k: v for name, split in totals.items() for k, v in _first(split).means(name).items()}, seconds


def _call_with(compiled, splits, es_hparams, last_epoch: int, put, carry, first_epoch: int, count: int):
    """The driver's call(carry, first, count): the run program on the run's splits, up to its last epoch; `put`
    places each epoch number where the program takes it."""
    as_int = lambda value: put(np.asarray(value, np.int32))
    return compiled(carry, splits, es_hparams, as_int(first_epoch), as_int(count), as_int(last_epoch))


def start_carry(run: Setup, abstract_carry, resuming: bool, ckpt, progress) -> tuple[Any, list[dict]]:
    """The carry (run axis 1) and history to continue from: the newest good checkpoint's, or a fresh one."""
    if resuming and ckpt is not None:
        like = checkpoint_lib.arrays_of(setup.without_run_axis(abstract_carry))
        restored = ckpt.restore_latest(like, progress.message)
        if restored is not None:
            done, arrays, meta = restored
            halted = run.pieces.may_stop and bool(arrays["early_stopping"].should_stop)
            progress.message(f"Resuming {ckpt.directory.parent} from the checkpoint of epoch {done}.")
            carry = setup.with_run_axis(checkpoint_lib.carry_of(arrays, np.asarray(halted)))
            return setup.place_carry(run.layout, carry, abstract_carry), meta["history"]
    x_1 = setup.first_example(run.dataset.train)
    carry = setup.init_carries(run.pieces, [run.config], [run.pieces.tx.defaults], x_1)
    return setup.place_carry(run.layout, carry, abstract_carry), []


def chance_loss(run: Setup) -> float | None:
    """The loss of a uniform guess for the run's task, where it is known (the divergence warning's reference)."""
    return report.chance_loss(run.config.task, run.dataset.num_classes, run.pieces.hooks.loss_fn is not None)


class Trained(NamedTuple):
    carry: Any  # run axis 1, after the last good epoch
    non_finite_epoch: int | None
    interrupted: bool  # Ctrl-C stopped it before its last epoch
    host_seconds: float


def _consumer(run: Setup, history: list[dict], log, progress, non_finite: list[int]):
    """consume(rows, first_epoch, seconds per epoch, extra fields) -> whether the run halted: a call's rows into
    the history, metrics.jsonl and the progress line, the non-finite epoch noted, divergence warned once."""
    watch_divergence = run.config.early_stopping.divergence_threshold is None
    chance = chance_loss(run)
    warned = [report.diverged_epoch(history, chance) is not None]  # a resumed run said so before

    examples = examples_per_epoch(run)

    def consume(rows, first_epoch: int, seconds: float, extra: dict | None = None) -> bool:
        new, bad = report.run_rows(rows, first_epoch, run.pieces.steps_per_epoch)
        tx = run.pieces.tx
        speed = {"examples_per_second": examples / seconds} if seconds > 0 else {}
        memory = report.peak_memory()  # once a call: its peak so far
        for row in new:
            row.update({"seconds": seconds, **speed, **memory, **(extra or {})})
            if tx.group_names:
                row.update(finetune.rate_columns(row["epoch"], row["learning_rate"], tx.group_names,
                                                 tx.trainable_from, tx.rate_scale))  # fmt: skip
        history.extend(new)  # before the writes: if the disk refuses them, the checkpoint still holds these epochs
        non_finite.extend([bad] if bad else [])
        log.write_rows(new)
        for row in new:
            progress.update(row)
        if bad:
            progress.message(f"epoch {bad}: training loss is not finite; stopping.")
        diverged = report.diverged_epoch(history, chance) if watch_divergence and not warned[0] else None
        if diverged:
            warned[0] = True
            progress.message(report.divergence_warning(history, diverged, chance))
        return bool(rows.halted[0])

    return consume


def examples_per_epoch(run: Setup) -> int:
    """The training examples an epoch trains on: the split (the padded last batch's real rows), or
    train.steps_per_epoch whole batches of a stream read round and round."""
    if run.config.train.steps_per_epoch:
        return run.config.train.steps_per_epoch * run.config.train.batch_size
    return data_lib.count(run.dataset.train)


def _saver(ckpt, history: list[dict]):
    def save(carry, epoch: int) -> None:
        if ckpt is not None and epoch > 0:
            arrays = checkpoint_lib.arrays_of(setup.without_run_axis(devices.fetch(carry)))
            ckpt.save(epoch, arrays, {"epoch": epoch, "history": list(history)})  # a copy: orbax writes it later

    return save


def train(run: Setup, programs: Programs, carry, history: list[dict], workdir: pathlib.Path, ckpt, progress, stop):
    """The host loop of a run: calls of the run program, each call's rows logged, checkpoints on their cadence,
    and the last good epoch checkpointed at the end, at a stop, at Ctrl-C (`stop()` says one came), before a
    non-finite loss and when metrics.jsonl cannot be written."""
    config = run.config
    log = _metrics_log(workdir, config, history)  # rows past the resumed checkpoint are recomputed
    progress.skip(len(history))
    non_finite: list[int] = []
    consume = _consumer(run, history, log, progress, non_finite)
    try:
        outcome = driver.train_loop(
            config,
            programs.run_epochs,
            carry,
            len(history) + 1,
            limit=run.spec.epochs_per_call,
            consume=consume,
            save=_saver(ckpt, history),
            interrupted=stop,
            checkpointing=ckpt is not None,
            final_epoch=lambda outcome: len(history),  # the last good epoch: not a non-finite one
            profile_dir=workdir / "profile",
        )
    finally:
        log.close()
        progress.close()
    stopped_by_user = stop() and len(history) < config.train.epochs and not (non_finite or outcome.halted)
    return Trained(outcome.carry, non_finite[0] if non_finite else None, stopped_by_user, outcome.host_seconds)


def train_streamed(run: Setup, programs: Programs, position, history, workdir, ckpts, progress, stop) -> Trained:
    """A streamed run's host loop (host/streamed.py): epochs in chunks, each epoch's row logged with the seconds
    the host waited for its input, checkpoints at epoch ends and inside epochs, the last good epoch checkpointed
    at the end; Ctrl-C inside an epoch saves the position there."""
    config, (ckpt, ckpt_in) = run.config, ckpts
    log = _metrics_log(workdir, config, history)
    progress.skip(len(history))
    non_finite: list[int] = []
    consume = _consumer(run, history, log, progress, non_finite)
    save = _saver(ckpt, history)

    def save_in_epoch(at: streamed.Position) -> None:
        if ckpt_in is not None:
            step = (at.epoch - 1) * run.pieces.steps_per_epoch + at.step
            meta = {"epoch": at.epoch, "step": at.step, "history": list(history)}
            ckpt_in.save(step, streamed.position_arrays(at), meta)

    def consume_epoch(rows, epoch: int, seconds: float, waited: float) -> bool:
        extra = {"input_wait_seconds": waited}
        if epoch == position.epoch and position.step and seconds > 0:  # resumed inside it: its later steps only
            left = (run.pieces.steps_per_epoch - position.step) / run.pieces.steps_per_epoch
            extra["examples_per_second"] = examples_per_epoch(run) * left / seconds
        return consume(rows, epoch, seconds, extra)

    per_chunk = run.chunk_steps
    examples = per_chunk * config.train.batch_size
    held = streamed.held_out_for_training(config, run.spec, run.held_out, examples)
    loop = streamed.Loop(
        programs.streamed, run.spec, setup.es_hparams([run.pieces.tracker]), run.dataset.train, held,
        run.pieces.steps_per_epoch, per_chunk, stream_lib.zero_sums(run.spec, 1), config.train.epochs,
    )  # fmt: skip
    key = setup.without_run_axis(position.start).state.key
    order = streamed.BatchOrder(key, data_lib.count(run.dataset.train), config.train.batch_size,
                                config.train.shuffle, run.pieces.steps_per_epoch)  # fmt: skip
    carry, inside, latest = position.start, False, {"carry": position.start}
    done_steps = (position.epoch - 1) * run.pieces.steps_per_epoch + position.step
    try:
        if position.epoch <= config.train.epochs:
            carry, inside = streamed.train_epochs(
                loop, position, order, consume=consume_epoch, save=save, save_in_epoch=save_in_epoch, stop=stop,
                cadence=streamed.cadences(config, ckpt is not None, done_steps), latest=latest,
            )  # fmt: skip
    except (OSError, streamed.ReadError) as error:  # the epochs logged are saved before anything closes
        with contextlib.suppress(Exception):
            save(latest["carry"], len(history))
        if isinstance(error, OSError):
            raise error from None
        raise data_lib.DataError(
            f"{error}. The run saved its last finished epoch and its position inside the "
            "epoch; fix the data and run the same command again to resume."
        ) from error
    finally:
        log.close()
        progress.close()
    save(carry, len(history))
    halted = bool(np.asarray(jax.device_get(carry.halted))[0])
    stopped_by_user = stop() and len(history) < config.train.epochs and not (non_finite or halted)
    return Trained(carry, non_finite[0] if non_finite else None, stopped_by_user or inside, 0.0)


def finish(run: Setup, trained: Trained, history: list[dict], timings: dict) -> tuple:
    """The final evaluation and the summary: (the state the run ends with, summary.json's dict)."""
    config, dataset = run.config, run.dataset
    carry = setup.without_run_axis(devices.fetch(trained.carry))
    es_state = carry.es_state
    # The best epoch's parameters, where an epoch was monitored (start_from_epoch may leave none).
    restored_best = bool(config.early_stopping.enabled and config.early_stopping.restore_best and es_state.best_epoch)
    state = carry.state._replace(params=carry.best_params) if restored_best else carry.state
    final, compile_seconds = final_metrics(run, state)
    reason = report.stop_reason(es_state, run.pieces.may_stop, trained.non_finite_epoch, trained.interrupted)
    summary = {
        "dataset": dataset.name,
        "model": config.model.name if run.pieces.hooks.get_model is None else type(run.pieces.source.module).__name__,
        "num_train_examples": data_lib.count(dataset.train),
        "num_val_examples": data_lib.count(dataset.val),
        "num_test_examples": data_lib.count(dataset.test),
        "num_parameters": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
        "batch_size": config.train.batch_size,
        "steps_per_epoch": run.pieces.steps_per_epoch,
        "epochs_completed": len(history),
        **report.stopping_fields(es_state, run.pieces.tracker.monitor, reason, trained.non_finite_epoch),
        "restored_best": restored_best,
        **report.divergence_fields(history, chance_loss(run)),
        **final,
        "compile_seconds": timings["compile"] + compile_seconds,
        "train_seconds": sum(row["seconds"] for row in history),
        "host_seconds_per_epoch": trained.host_seconds,  # logging and checkpointing, beside the device's next call
        "streamed": dataset.streamed,
        **({"input_wait_fraction": _input_wait_fraction(history)} if dataset.streamed else {}),
        "total_seconds": time.perf_counter() - timings["start"],
        "platform": jax.devices()[0].platform,
        **devices.describe(run.layout),
        "compute_dtype": config.train.compute_dtype,
        **({"initialised_from": run.pieces.warm.summary()} if run.pieces.warm is not None else {}),
        "accumulate_steps": config.train.accumulate_steps,
    }
    return jax.tree.map(jnp.asarray, state), summary


def _input_wait_fraction(history: list[dict]) -> float:
    """The fraction of a streamed run's training seconds that the host waited for its input."""
    seconds = sum(row["seconds"] for row in history)
    return sum(row.get("input_wait_seconds", 0.0) for row in history) / seconds if seconds else 0.0


def _first(totals: epoch_lib.Metrics) -> epoch_lib.Metrics:
    return jax.tree.map(lambda a: np.asarray(a)[0], totals)


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


def _prepare(workdir: pathlib.Path, config, restart: bool, say, run: Setup) -> bool:
    """The workdir made ready for the run (resumed or fresh) and run.json written: whether it resumes."""
    resuming = workdir_lib.prepare_workdir(workdir, config, restart, say)
    write_run_json(workdir, run)
    return resuming


class _NoLog:
    """metrics.jsonl where another process writes it."""

    def write_rows(self, rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


def _metrics_log(workdir: pathlib.Path, config, history: list[dict]):
    """metrics.jsonl and the writers of config.logging (process 0's; the others write nothing)."""
    if not devices.is_primary():
        return _NoLog()
    return writers.open_logs(report.MetricsLog(workdir / "metrics.jsonl", history), workdir, config, history)


def write_run_json(workdir: pathlib.Path, run: Setup) -> None:
    """The shapes `load` needs to rebuild the run's state without its data."""
    d = run.dataset
    report.write_json(
        workdir / "run.json",
        {
            "steps_per_epoch": run.pieces.steps_per_epoch,
            "num_classes": d.num_classes,
            "inputs": jax.tree.map(lambda a: [list(a.shape[1:]), str(a.dtype)], d.train.x),
            "label_shape": list(d.train.y.shape[1:]),
            "label_dtype": str(d.train.y.dtype),
            "num_val_examples": data_lib.count(d.val),
        },
    )


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
    draws its own) and checkpoints/. Holds the workdir's lock throughout (a second process is refused), and from
    the moment it touches the workdir a Ctrl-C stops the run at the next call's end, saves it, writes its
    outputs, then raises KeyboardInterrupt.
    """
    timings = {"start": time.perf_counter()}
    workdir = workdir_lib.as_workdir(workdir)
    primary = devices.is_primary()  # process 0 writes the outputs and the checkpoints' arrays
    devices.on_primary(lambda: lock.check_free(workdir, "workdir"))
    devices.on_primary(lambda: workdir_lib.check_kind(workdir, "run"))  # a sweep's, lr-find's, a study's: refused
    config = config_lib.validate(config)
    devices.check_same_config(config)
    use_compilation_cache(config.train.compilation_cache_dir)
    fresh = restart or not workdir_lib.checkpointed_epochs(workdir)
    run = set_up(config, quiet or not primary, fresh)
    with lock.hold(workdir, "workdir") if primary else contextlib.nullcontext():
        progress = report.Progress(config.train.epochs, quiet or not primary)
        with driver.stop_on_ctrl_c(progress.message) as stop:
            resuming = devices.on_primary(lambda: _prepare(workdir, config, restart, progress.message, run))
            resuming = bool(devices.agree((int(bool(resuming)),))[0])  # the others wait for process 0's workdir
            trained, history = _train_in(run, workdir, resuming, progress, stop, timings)
            state, summary = finish(run, trained, history, timings)
            if primary:
                report.write_json(workdir / "summary.json", summary)
            if plot and primary:
                report.plot_curves(history, workdir / "curves.png", f"{run.dataset.name} {config.model.name}", summary)
            _report_end(summary, workdir, progress)
            if primary:
                status = "KILLED" if stop() else "FAILED" if trained.non_finite_epoch else "FINISHED"
                writers.finish_mlflow(workdir, config, status)
            if stop():
                _say_interrupted(trained, history, workdir, config, progress)
                raise KeyboardInterrupt
    if trained.non_finite_epoch:
        raise NonFiniteLossError(
            f"Training loss became non-finite in epoch {trained.non_finite_epoch}; the run stopped and kept the "
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


def _train_in(run: Setup, workdir: pathlib.Path, resuming: bool, progress, stop, timings: dict):
    """Compiles, restores or initialises, and trains: (Trained, history). The checkpoints are written before it
    returns (or raises)."""
    config = run.config
    abstract_carry = setup.abstract_carry(run.pieces, config, setup.first_example(run.dataset.train))
    with checkpoint_lib.opened(workdir, config.checkpoint.max_to_keep, config.checkpoint.enabled) as ckpt:
        # The programs compile in a second thread while the initialisation compiles and runs here: XLA's
        # compiles overlap (a cold MNIST-1D MLP run on 2 CPU cores: 7.9 s -> 7.2 s, the mean of 5 pairs).
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            started, compiling = time.monotonic(), pool.submit(compile_programs, run, abstract_carry)
            carry, history = start_carry(run, abstract_carry, resuming, ckpt, progress)
            programs = progress.wait_compiling(compiling, started)
        timings["compile"] = programs.seconds
        if not run.dataset.streamed:
            return train(run, programs, carry, history, workdir, ckpt, progress, stop), history
        with checkpoint_lib.opened(workdir, 2, ckpt is not None, name=checkpoint_lib.IN_EPOCH_DIR) as ckpt_in:
            position = _position(run, abstract_carry, carry, history, resuming, ckpt_in, progress)
            history[:] = position[1]
            trained = train_streamed(run, programs, position[0], history, workdir, (ckpt, ckpt_in), progress, stop)
    return trained, history


def _position(run: Setup, abstract_carry, carry, history: list[dict], resuming: bool, ckpt_in, progress):
    """Where a streamed run goes on from: a checkpoint inside the epoch after its last epoch checkpoint, or the
    start of that epoch. Returns (Position, history)."""
    zero = jax.tree.map(np.asarray, stream_lib.zero_sums(run.spec, 1))
    if resuming and ckpt_in is not None:
        like = setup.without_run_axis(abstract_carry)
        sums_like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), zero)
        say = progress.message
        found = streamed.restore_position(ckpt_in, like, sums_like, len(history), run.pieces.steps_per_epoch, say)
        if found is not None:
            position, saved_history = found
            return position, saved_history
    return streamed.Position(carry, carry, zero, len(history) + 1, 0), history


def _say_interrupted(trained: Trained, history: list[dict], workdir: pathlib.Path, config, progress) -> None:
    if not trained.interrupted:
        progress.message(f"Ctrl-C: the run had finished epoch {len(history)}; its checkpoint and outputs are saved.")
        return
    saved = (
        f"checkpoint and outputs saved in {workdir}. Run the same command again to resume."
        if config.checkpoint.enabled
        else f"outputs saved in {workdir}; checkpoint.enabled is False, so there is nothing to resume from."
    )
    progress.message(f"Interrupted after epoch {len(history)}; {saved}")


def _shapes_of(run: dict) -> data_lib.Dataset:
    """A dataset of two zero examples shaped as the run's (run.json), to rebuild its model and state from."""
    is_leaf = lambda spec: isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], str)
    inputs = run.get("inputs", [run.get("input_shape"), run.get("input_dtype", "float32")])
    x = jax.tree.map(lambda spec: np.zeros([2, *spec[0]], spec[1]), inputs, is_leaf=is_leaf)
    split = data_lib.Split(x, np.zeros([2, *run.get("label_shape", [])], run.get("label_dtype", "int32")))
    empty = data_lib.take(split, slice(0, 0))
    return data_lib.Dataset(
        "run.json", split, empty if not run["num_val_examples"] else split, split, run["num_classes"]
    )


def _open_checkpoints(workdir: pathlib.Path, tries: int = 5) -> checkpoint_lib.Checkpointer:
    """The workdir's checkpoints, read while a live run may be rotating them: orbax lists the directories, then
    reads each one's time, and one deleted in between (max_to_keep) is a FileNotFoundError; list again."""
    for attempt in range(tries):
        try:
            return checkpoint_lib.Checkpointer(workdir)
        except FileNotFoundError:
            if attempt == tries - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def load(workdir: str | pathlib.Path, epoch: int | str | None = None) -> epoch_lib.TrainState:
    """The train state of a run's checkpoint: the newest (None), "best" (its best epoch's parameters) or epoch N."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "run.json").exists():
        raise WorkdirError(f"{workdir} holds no jaxepochs run (no run.json); pass the --workdir of a run.")
    try:
        config = config_lib.from_json((workdir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{workdir / 'config.json'} is damaged ({e}); the run there cannot be read.") from None
    run = json.loads((workdir / "run.json").read_text())
    dataset = _shapes_of(run)
    hooks = hooks_lib.load_hooks(config)
    pieces = setup.make_pieces(config, dataset, hooks, run["steps_per_epoch"], run["num_val_examples"] > 0)
    x_1 = setup.first_example(dataset.train)
    like = checkpoint_lib.arrays_of(setup.without_run_axis(setup.abstract_carry(pieces, config, x_1)))
    ckpt = _open_checkpoints(workdir)
    try:
        saved = ckpt.epochs()
        if not saved:
            raise WorkdirError(f"{workdir} has no checkpoints.")
        chosen = saved[-1] if epoch in (None, "best") else int(epoch)
        if chosen not in saved:
            raise WorkdirError(f"{workdir} has no checkpoint of epoch {epoch}; it has epochs {saved}.")
        try:
            arrays, _ = ckpt.restore(chosen, like)
        except checkpoint_lib.CheckpointError as e:
            others = [e for e in saved if e != chosen]
            raise checkpoint_lib.CheckpointError(f"{e}. Its other checkpoints: epochs {others}.") from None
    finally:
        ckpt.close()
    state = arrays["train"]
    has_best = int(arrays["early_stopping"].best_epoch) > 0  # no epoch monitored yet: the last is the best known
    return state._replace(params=arrays["best_params"]) if epoch == "best" and has_best else state
