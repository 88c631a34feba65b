"""Runs a sweep: per program group, chunks of runs stacked on a leading run axis and trained by the run program
(core/program.py: the program `jaxepochs run` trains one run with, vmapped over the chunk; sharded over the
devices when there are several), through the same host loop as a run, then the outputs.

Writes into the workdir: sweep.json (the specification, for resuming), sweep.jsonl (one row per run per
epoch), results.csv (one row per run), cv.csv with --cv, sweep.png, and checkpoints/ per chunk (honouring the
config's checkpoint section). A chunk of one run is the run's own program: the same numbers as `jaxepochs run`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import layout as layout_lib
from jaxepochs.core import optim
from jaxepochs.core import program as program_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.data import lock
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import devices, driver, finetune, report, setup, writers
from jaxepochs.host import hooks as hooks_lib
from jaxepochs.host import run as run_lib
from jaxepochs.host import workdir as workdir_lib
from jaxepochs.sweep import grid as sweep_lib
from jaxepochs.sweep import report as sweep_report


class SweepResult(NamedTuple):
    results: list[dict]  # one per run, as in results.csv, ranked best first
    histories: dict[str, list[dict]]  # run name -> its rows
    cv: list[dict]  # one per configuration with --cv: mean curve, recommended epochs, refit test metric
    compile_seconds: float
    seconds: float
    summaries: dict[str, dict]  # run name -> summary.json's stopping fields and final test metrics, as a run's


def _free_bytes() -> int:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))  # host memory (CPU)


def default_chunk(num_runs: int, params, batch_size: int, widest: int, data_bytes: int = 0) -> int:
    """Runs per program from free memory: per run, the parameters about five times (params, two optimizer
    moments, best params, gradients), the activations of a batch and `data_bytes` (the training split that each
    run's epoch permutes whole: its own copy), with half the free memory to spare."""
    param_bytes = sum(int(np.prod(p.shape)) * 4 for p in jax.tree.leaves(params))
    per_run = 5 * param_bytes + 3 * 4 * batch_size * max(widest, 1) + data_bytes
    return int(max(1, min(num_runs, _free_bytes() // 2 // max(per_run, 1))))


def _widest(params) -> int:
    return max(max(p.shape, default=1) for p in jax.tree.leaves(params))


class _Group:
    """The shared pieces of one program group: data, model, optimizer, tracker, and its compiled programs."""

    def __init__(self, runs: list[sweep_lib.Run], cv: int, quiet: bool):
        template = runs[0].config
        self.config, self.cv = template, cv
        hooks = hooks_lib.load_hooks(template)
        dataset = setup.load_data(template, hooks, quiet)
        if dataset.streamed:
            raise sweep_lib.SweepError(
                f"{dataset.name} would be streamed (it does not fit the device budget, or data.stream or "
                "train.steps_per_epoch asks for it), and sweeps train device-resident data only for now. Sweep with "
                "data.stream = False where the data fits the device, or train the runs one by one with "
                "`jaxepochs run`."
            )
        self.dataset = dataset
        n_train = data_lib.count(dataset.train)
        if cv:
            sweep_lib.check_cv(cv, n_train)
            n_train = sweep_lib.fold_indices(n_train, cv, 0, template.data.split_seed)[0].shape[0]
        setup.check_shapes(template, dataset, n_train)
        self.has_val = bool(cv) or data_lib.count(dataset.val) > 0
        steps = epoch_lib.steps_per_epoch(n_train, template.train.batch_size)
        self.pieces = setup.make_pieces(template, dataset, hooks, steps, self.has_val)
        self.pieces = setup.with_warm_start(self.pieces, template, setup.first_example(dataset.train))
        # Every run's fine-tuning values (metrics.jsonl's rate per group), checked before anything runs.
        names = self.pieces.tx.group_names
        self.group_values = {run.name: finetune.group_values(run.config, names) for run in runs} if names else {}
        n_val = data_lib.count(dataset.train) // cv if cv else data_lib.count(dataset.val)
        every_epoch = setup.eval_sizes(template, {"val": n_val})
        if template.train.log_test:
            every_epoch.update(setup.eval_sizes(template, {"test": data_lib.count(dataset.test)}))
        self.runs_size = devices.sweep_mesh(template)[0]
        self.layout = devices.sweep_layout(template)  # None: each run on one device
        axes = {"train": 0, "val": 0} if cv else {}
        self.spec = setup.run_spec(template, self.pieces, every_epoch, axes, layout=self.layout)
        # The test split once, on the parameters each run ends with (its validation curve is in its history).
        final_sizes = setup.eval_sizes(template, {"test": data_lib.count(dataset.test)})
        self.final_spec = dataclasses.replace(self.spec, eval_batch_sizes=final_sizes)
        self.programs: dict = {}  # (chunk size, sharded) -> Programs, shared by the chunks

    def splits(self, runs: list[sweep_lib.Run]) -> dict:
        """The arrays the runs train and are evaluated on: CV folds per run ([R, ...]), else shared; placed on
        the mesh where the sweep has a layout."""
        splits = self._splits(runs)
        if self.layout is None:
            return splits
        per_run = lambda name: self.layout.per_run() if self.spec.data_axes.get(name) == 0 else self.layout.replicated()
        return {name: devices.put(jax.device_get(split), per_run(name)) for name, split in splits.items()}

    def _splits(self, runs: list[sweep_lib.Run]) -> dict:
        d = self.dataset
        if not self.cv:
            splits = {"train": setup.on_device(d.train)}
            if "val" in self.spec.eval_batch_sizes:
                splits["val"] = setup.on_device(d.val)
        else:
            seed = self.config.data.split_seed
            folds = [sweep_lib.fold_indices(data_lib.count(d.train), self.cv, r.fold, seed) for r in runs]
            stack = lambda part: jax.tree.map(
                lambda *a: jnp.asarray(np.stack(a)), *[setup.on_device(data_lib.take(d.train, f[part])) for f in folds]
            )
            splits = {"train": stack(0), "val": stack(1)}
        if "test" in self.spec.eval_batch_sizes:
            splits["test"] = setup.on_device(d.test)
        return splits

    def init(self, runs: list[sweep_lib.Run]):
        """The stacked carry of `runs` (each run's parameters from its seed, its optimizer's and early
        stopping's numbers from its config) and their early-stopping hyperparameters."""
        opt_hparams = [optim.hparams_of(r.config.optimizer.to_dict()) for r in runs]
        x_1 = setup.first_example(self.dataset.train)
        carry = setup.init_carries(self.pieces, [r.config for r in runs], opt_hparams, x_1)
        trackers = [setup.make_tracker(r.config, self.has_val, self.pieces.metric_names)[0] for r in runs]
        return carry, setup.es_hparams(trackers)

    def compile(self, carry, splits, es_hparams, sharding) -> tuple:
        """The run program and the final evaluation of a chunk; with `sharding`, each device runs them on its
        share of the runs (`jax.shard_map`): per device the very program a run alone compiles, on fewer runs."""
        start = time.perf_counter()
        one = jnp.asarray(1, jnp.int32)
        run_epochs = program_lib.make_run_epochs(self.spec, "runs" if sharding is not None else None)
        evaluate = program_lib.make_evaluate(self.final_spec)
        test = {"test": setup.on_device(self.dataset.test)}
        if sharding is not None:
            test = {"test": devices.put(jax.device_get(test["test"]), NamedSharding(sharding.mesh, P()))}
            runs, shared = P("runs"), P()
            data = {name: runs if self.spec.data_axes.get(name) == 0 else shared for name in splits}
            rows = program_lib.EpochRows(runs, runs, runs, runs, runs, shared, runs)
            over = functools.partial(jax.shard_map, mesh=sharding.mesh, check_vma=False)
            run_epochs = over(run_epochs, in_specs=(runs, data, runs, shared, shared, shared), out_specs=(runs, rows))
            evaluate = over(evaluate, in_specs=(runs, {"test": shared}), out_specs=runs)
        if self.layout is not None:
            return (*self._compile_on_mesh(run_epochs, evaluate, carry, splits, es_hparams, test), _since(start))
        run_epochs = jax.jit(run_epochs).lower(carry, splits, es_hparams, one, one, one).compile()
        evaluate = jax.jit(evaluate).lower(carry.state, test).compile()
        return run_epochs, evaluate, test, time.perf_counter() - start

    def _compile_on_mesh(self, run_epochs, evaluate, carry, splits, es_hparams, test):
        """The programs of a sweep whose runs' batches span devices: XLA partitions them over the mesh (the runs
        over "runs", each batch's rows over "data"); the scalars and the shared splits replicated."""
        layout, rep = self.layout, self.layout.replicated()
        carry_sh = layout_lib.carry_shardings(layout, carry)
        split_sh = {k: layout.per_run() if self.spec.data_axes.get(k) == 0 else rep for k in splits}
        runs = layout.per_run()
        jitted = jax.jit(
            run_epochs, in_shardings=(carry_sh, split_sh, runs, rep, rep, rep), out_shardings=(carry_sh, rep)
        )
        one = devices.put(np.asarray(1, np.int32), rep)
        test = {"test": devices.put(jax.device_get(test["test"]), rep)}
        run_epochs = jitted.lower(carry, splits, es_hparams, one, one, one).compile()
        evaluate = jax.jit(evaluate, in_shardings=(carry_sh.state, {"test": rep}), out_shardings=rep)
        return run_epochs, evaluate.lower(carry.state, test).compile(), test


def _since(start: float) -> float:
    return time.perf_counter() - start


def _sharding(chunk: int, runs: int):
    """The run axis split across `runs` devices (a mesh with a "runs" axis), or None on one device."""
    if runs < 2 or chunk % runs:
        return None
    return NamedSharding(Mesh(np.array(jax.devices()[:runs]), ("runs",)), P("runs"))


def _restore(ckpt, group: _Group, carry, names: list[str], progress) -> tuple:
    """The chunk's newest checkpoint as (carry, histories, non-finite epochs, first epoch), or None. A run that
    had stopped early or met a non-finite loss stays halted (`names`: each run's, padding included)."""
    like = checkpoint_lib.arrays_of(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), carry))
    restored = ckpt.restore_latest(like, progress.message)
    if restored is None:
        return None
    done, arrays, meta = restored
    non_finite = meta.get("non_finite", {})
    halted = np.asarray(arrays["early_stopping"].should_stop) & group.pieces.may_stop
    halted = halted | np.array([name in non_finite for name in names])
    return checkpoint_lib.carry_of(arrays, halted), meta["histories"], non_finite, done + 1


class _Chunk(NamedTuple):
    histories: dict[str, list[dict]]
    summaries: dict[str, dict]
    compile_seconds: float


def _train_chunk(group: _Group, runs, chunk_size: int, workdir: pathlib.Path, progress, stop) -> _Chunk:
    """Trains `runs` (padded to `chunk_size` with copies of the first, dropped after) to the end, resuming from
    the chunk's checkpoint; the same host loop as a run (driver.drive), with each run's rows apart."""
    config = group.config
    padded = runs + [runs[0]] * (chunk_size - len(runs))
    carry, es_hparams = group.init(padded)
    splits = group.splits(padded)
    sharding = _sharding(chunk_size, group.runs_size) if group.layout is None else None
    if group.layout is not None:
        carry, es_hparams = _on_mesh(group.layout, carry), devices.put(es_hparams, group.layout.per_run())
    if sharding is not None:  # each process places its devices' runs; the shared splits on every device
        carry, es_hparams = devices.put((jax.device_get(carry), es_hparams), sharding)
        everywhere = NamedSharding(sharding.mesh, P())
        on = lambda k: sharding if group.spec.data_axes.get(k) == 0 else everywhere
        splits = {k: devices.put(jax.device_get(v), on(k)) for k, v in splits.items()}
    key = (chunk_size, sharding is not None)  # the chunks of a group share their size: one program for all
    compile_seconds = 0.0
    if key not in group.programs:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # the progress counts its seconds
            compiling = pool.submit(group.compile, carry, splits, es_hparams, sharding)
            *programs, compile_seconds = progress.wait_compiling(compiling, time.monotonic(), "the sweep's program")
        group.programs[key] = programs
    run_epochs, evaluate, test = group.programs[key]
    histories = {run.name: [] for run in runs}
    non_finite: dict[str, int] = {}
    enabled = config.checkpoint.enabled
    first_epoch = 1
    with checkpoint_lib.opened(workdir, config.checkpoint.max_to_keep, enabled) as ckpt:
        names = [run.name for run in padded]
        restored = _restore(ckpt, group, carry, names, progress) if ckpt is not None else None
        if restored is not None:
            carry, histories, non_finite, first_epoch = restored
            carry = devices.put(carry, sharding) if sharding is not None else carry
            carry = _on_mesh(group.layout, carry) if group.layout is not None else carry

        def call(carry, first, count):
            as_int = lambda value: np.asarray(value, np.int32)
            if group.layout is not None:  # replicated global scalars
                as_int = lambda value: devices.put(np.asarray(value, np.int32), group.layout.replicated())
            return run_epochs(carry, splits, es_hparams, as_int(first), as_int(count), as_int(config.train.epochs))

        def consume(rows, first, seconds) -> bool:
            new = {}
            for r, run in enumerate(runs):
                new[run.name], bad = report.run_rows(rows, first, group.pieces.steps_per_epoch, r)
                for row in new[run.name]:
                    row["seconds"] = seconds
                    if run.name in group.group_values:
                        names, values = group.pieces.tx.group_names, group.group_values[run.name]
                        row.update(finetune.rate_columns(row["epoch"], row["learning_rate"], names, *values))
                histories[run.name] += new[run.name]
                if bad:
                    non_finite[run.name] = bad
            active = int(np.sum(~np.asarray(rows.halted)[: len(runs)]))
            last = first + int(rows.ran) - 1
            progress.advance(last, active, len(runs), new, group.pieces.tracker.monitor)
            return bool(np.all(rows.halted))

        def save(carry, epoch: int) -> None:
            if ckpt is not None and epoch > 0:
                copied = {name: list(rows) for name, rows in histories.items()}  # orbax writes it later
                meta = {"epoch": epoch, "histories": copied, "non_finite": dict(non_finite)}
                ckpt.save(epoch, checkpoint_lib.arrays_of(devices.fetch(carry)), meta)

        outcome = driver.train_loop(
            config,
            call,
            carry,
            first_epoch,
            limit=group.spec.epochs_per_call,
            consume=consume,
            save=save,
            interrupted=stop,
            checkpointing=ckpt is not None,
            final_epoch=lambda outcome: outcome.last_epoch,
            profile_dir=workdir / "profile",  # the chunk's
        )
    asked = bool(devices.agree((int(stop()),))[0])  # process 0's Ctrl-C stops every process
    if asked and outcome.last_epoch < config.train.epochs and not outcome.halted:
        raise KeyboardInterrupt  # saved: the sweep's rerun resumes this chunk
    place = functools.partial(_place_state, group, sharding)
    return _Chunk(histories, _summaries(group, runs, outcome.carry, evaluate, test, non_finite, place), compile_seconds)


def _place_state(group: _Group, sharding, state):
    """The runs' final TrainStates (host arrays) where the evaluation program takes them."""
    if group.layout is not None:
        return devices.put(state, layout_lib.carry_shardings(group.layout, state))
    return devices.put(state, sharding) if sharding is not None else state


def _on_mesh(layout, carry):
    """A chunk's carry (host arrays) where the layout puts it: the runs over "runs"."""
    return devices.put(jax.device_get(carry), layout_lib.carry_shardings(layout, carry))


def _summaries(group: _Group, runs, carry, evaluate, test, non_finite: dict, place) -> dict[str, dict]:
    """Each run's stopping fields and final test metrics, as its summary.json would hold them."""
    restore_best = group.config.early_stopping.enabled and group.config.early_stopping.restore_best
    es_all = devices.fetch(carry.es_state)
    state = devices.fetch(carry.state)  # padded runs too: no new shapes
    if restore_best:  # each run's best epoch's, where it had one (an epoch monitored)
        has_best = np.asarray(es_all.best_epoch) > 0
        pick = lambda best, last: np.where(has_best.reshape(-1, *[1] * (np.ndim(best) - 1)), best, last)
        state = state._replace(params=jax.tree.map(pick, devices.fetch(carry.best_params), state.params))
    totals = devices.fetch(evaluate(place(state), test))["test"]
    out = {}
    for r, run in enumerate(runs):
        es = jax.tree.map(lambda a, r=r: np.asarray(a)[r], es_all)
        reason = report.stop_reason(es, group.pieces.may_stop, non_finite.get(run.name), False)
        fields = report.stopping_fields(es, group.pieces.tracker.monitor, reason, non_finite.get(run.name))
        final = jax.tree.map(lambda a, r=r: np.asarray(a)[r], totals).means("test")
        out[run.name] = {**fields, **final}
    return out


class _Progress:
    """A bar over epochs (a line per call off a terminal): how many runs still train, and the best value yet."""

    def __init__(self, total_epochs: int, quiet: bool):
        self._progress = report.Progress(total_epochs, quiet)
        self._best = float("nan")

    def message(self, text: str) -> None:
        self._progress.message(text)

    def advance(self, epoch: int, active: int, runs: int, new_rows: dict, monitor: str) -> None:
        """`new_rows`: each run's rows of the last call only, so the best so far is kept, not recomputed."""
        values = [row[monitor] for rows in new_rows.values() for row in rows if monitor in row]
        if values:
            call_best = min(values) if "loss" in monitor else max(values)
            better = min if "loss" in monitor else max
            self._best = call_best if math.isnan(self._best) else better(self._best, call_best)
        self._progress.advance(epoch, f"{active} of {runs} runs training, best {monitor} {self._best:.4f}")

    def wait_compiling(self, future, started: float, what: str):
        return self._progress.wait_compiling(future, started, what)

    def close(self) -> None:
        self._progress.close()


SWEEP_FILES = ("sweep.json", "chunking.json", "sweep.jsonl", "results.csv", "cv.csv", "sweep.png", "metrics.csv")


def _discard(workdir: pathlib.Path) -> None:
    for name in SWEEP_FILES:
        (workdir / name).unlink(missing_ok=True)
    shutil.rmtree(workdir / "chunks", ignore_errors=True)
    shutil.rmtree(workdir / "refit", ignore_errors=True)
    shutil.rmtree(workdir / "tensorboard", ignore_errors=True)
    shutil.rmtree(workdir / "members", ignore_errors=True)  # each member's MLflow run record


def _has_progress(workdir: pathlib.Path) -> bool:
    """Whether a sweep in `workdir` got anywhere: a chunk's checkpoint, or its outputs."""
    chunks = workdir / "chunks"
    checkpointed = chunks.is_dir() and any(
        p.name.isdigit() for chunk in chunks.iterdir() for p in (chunk / checkpoint_lib.CHECKPOINT_DIR).glob("*")
    )
    return checkpointed or (workdir / "results.csv").exists()


def _prepare(workdir: pathlib.Path, spec: dict, restart: bool, say) -> None:
    path = workdir / "sweep.json"
    if path.exists() and not restart and not _has_progress(workdir):
        say(f"{workdir} holds a sweep that finished no epoch; starting afresh.")
        restart = True
    if restart and workdir.exists():
        _discard(workdir)
    try:
        same = json.loads(path.read_text()) == spec if path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        same = False
    if same is False:
        raise sweep_lib.SweepError(
            f"{workdir} holds another sweep (its sweep.json differs). Use a new --workdir, or --restart to discard it."
        )
    if same is None and workdir.exists() and any(p.name != lock.LOCK_FILE for p in workdir.iterdir()):
        raise sweep_lib.SweepError(f"{workdir} is not empty and holds no sweep. Use a new --workdir.")
    workdir.mkdir(parents=True, exist_ok=True)
    report.write_text(path, json.dumps(spec, indent=2) + "\n")


def _recorded_chunk(workdir: pathlib.Path, g: int, size: int, say) -> int:
    """The chunk size group `g` was started with (a resumed sweep keeps it: its checkpoints hold chunks of that
    many runs, and the runs compute the same in any chunking), else `size`, recorded in chunking.json."""
    path = workdir / "chunking.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    if str(g) in recorded:
        if recorded[str(g)] != size:
            say(f"Resuming group {g} in chunks of {recorded[str(g)]} runs, as it started (not {size}).")
        return recorded[str(g)]
    report.write_text(path, json.dumps({**recorded, str(g): size}) + "\n")
    return size


def _chunk_size(group: _Group, members: list, chunk: int) -> int:
    """Runs per program: `chunk`, or as many as fit the free memory; whole shards of the run axis."""
    x_1 = setup.first_example(group.dataset.train)
    example, _, _ = jax.eval_shape(lambda x: group.pieces.source.trace_init(group.config, x), x_1)
    batch_size = group.config.train.batch_size
    data_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(group.dataset.train.x))
    copied = data_bytes if batch_size > 1 and data_bytes <= epoch_lib.PERMUTE_WHOLE_BYTES else 0
    size = min(chunk or default_chunk(len(members), example, batch_size, _widest(example), copied), len(members))
    shards = group.runs_size
    if size >= shards > 1:
        size -= size % shards  # whole shards of the run axis
    elif group.layout is not None or devices.multi_process():
        size = shards  # fewer runs than shards: padded to one run per shard
    return size


def sweep(
    config: ml_collections.ConfigDict,
    grid: list[dict[str, str]],
    workdir: str | pathlib.Path,
    *,
    cv: int = 0,
    refit: bool = False,
    chunk: int = 0,
    quiet: bool = False,
    restart: bool = False,
) -> SweepResult:
    """Trains every configuration of `grid` (overrides of `config`, as from `sweep.expand`), K folds each with
    `cv` = K; `chunk` caps the runs trained at once (0: chosen from free memory). Resumes a sweep in `workdir`
    (in the chunks it started with). Holds the workdir's lock; a Ctrl-C saves the chunk in flight and stops."""
    start = time.perf_counter()
    workdir = workdir_lib.as_workdir(workdir)
    primary = devices.is_primary()  # process 0 writes the outputs and the checkpoints' arrays
    devices.on_primary(lambda: lock.check_free(workdir, "sweep workdir"))
    devices.on_primary(lambda: workdir_lib.check_kind(workdir, "sweep"))  # a run's, lr-find's, a study's: refused
    config = _check_arguments(config_lib.validate(config), cv, refit, chunk)
    devices.check_same_config(config)
    run_lib.use_compilation_cache(config.train.compilation_cache_dir)
    quiet = quiet or not primary
    runs = sweep_lib.make_runs(config, grid, cv)
    groups = [(_Group(members, cv, quiet), members) for members in sweep_lib.group_runs(runs)]  # data checked
    spec = {"config": json.loads(config.to_json_best_effort()), "grid": grid, "cv": cv}
    with lock.hold(workdir, "sweep workdir") if primary else contextlib.nullcontext():
        progress = _Progress(max(r.config.train.epochs for r in runs), quiet)
        with driver.stop_on_ctrl_c(progress.message) as stop:
            devices.on_primary(lambda: _prepare(workdir, spec, restart, progress.message))  # the others wait
            histories, summaries, compile_seconds = _train_groups(groups, workdir, chunk, progress, stop)
            results = sweep_report.results(runs, histories, summaries)
            cv_rows = sweep_report.cross_validation(runs, histories, cv) if cv else []
            if refit:
                _refit(config, cv_rows, workdir)
            if primary:
                sweep_report.write(workdir, runs, histories, results, cv_rows, grid)
                writers.sweep_outputs(workdir, config, runs, histories, results)
            if stop():
                raise KeyboardInterrupt
    if not quiet:
        print(sweep_report.table(results, cv_rows))
    return SweepResult(results, histories, cv_rows, compile_seconds, time.perf_counter() - start, summaries)


def _check_arguments(config, cv: int, refit: bool, chunk: int):
    """The sweep's own arguments, checked before anything is read or written; the config as cross-validation
    trains it (no validation split: the folds are)."""
    if cv:
        sweep_lib.check_cv(cv, 2**31)  # K < 2 here; K above the training examples once the data is read
        config = config_lib.apply_overrides(config, {"data.validation_fraction": "0.0"})
    if chunk < 0:
        raise sweep_lib.SweepError(f"--chunk {chunk}: give the most runs to train at once (1 or more), or 0.")
    if refit and not cv:
        raise sweep_lib.SweepError("--refit retrains on the whole training split after --cv K; add --cv K.")
    if config.logging.mlflow:
        writers.import_mlflow()  # not installed: said now, with the pip command
    return config


def _train_groups(groups, workdir: pathlib.Path, chunk: int, progress, stop) -> tuple[dict, dict, float]:
    """Trains every group's chunks in turn: (histories, summaries, compile seconds)."""
    histories: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = {}
    compile_seconds = 0.0
    try:
        for g, (group, members) in enumerate(groups):
            size = _chunk_size(group, members, chunk)
            size = _recorded_chunk(workdir, g, size, progress.message) if devices.is_primary() else size
            size = devices.agree((size,))[0]  # process 0's record
            for c in range(0, len(members), size):
                chunk_dir = workdir / "chunks" / f"group{g}_chunk{c // size}"
                trained = _train_chunk(group, members[c : c + size], size, chunk_dir, progress, stop)
                compile_seconds += trained.compile_seconds
                histories.update(trained.histories)
                summaries.update(trained.summaries)
            group.programs.clear()  # this group's compiled programs are done with
    finally:
        progress.close()
    return histories, summaries, compile_seconds


def _refit(config, cv_rows: list[dict], workdir: pathlib.Path) -> None:
    """Each configuration retrained on the whole training split for its recommended epochs; its test metrics."""
    for row in cv_rows:
        refit_config = config_lib.apply_overrides(
            config,
            {
                **{key: str(value) for key, value in row["values"].items()},  # typed values, as override text
                "train.epochs": str(row["recommended_epochs"]),
                "data.validation_fraction": "0.0",
                "mesh.runs": "0",  # a run has one run: its devices go on "data"
                **({"mesh.data": "0"} if devices.multi_process() else {}),
            },
        )
        result = run_lib.train_and_evaluate(refit_config, workdir / "refit" / row["config"], quiet=True, restart=True)
        row["refit_test_loss"] = result.summary["test_loss"]
        row["refit_test_accuracy"] = result.summary["test_accuracy"]
