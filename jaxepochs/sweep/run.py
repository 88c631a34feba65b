"""Runs a sweep: per program group, chunks of runs stacked on a leading run axis and trained by the run program
(core/program.py: the program `jaxepochs run` trains one run with, vmapped over the chunk; sharded over the
devices when there are several), through the same host loop as a run, then the outputs.

Writes into the workdir: sweep.json (the specification, for resuming), sweep.jsonl (one row per run per
epoch), results.csv (one row per run), cv.csv with --cv, sweep.png, and checkpoints/ per chunk (honouring the
config's checkpoint section). A chunk of one run is the run's own program: the same numbers as `jaxepochs run`.
Runs that halt leave the chunk's program at its compaction points (sweep/lanes.py); a pruned sweep halts runs at
its rungs (sweep/prune.py: successive halving, Hyperband, or Optuna's pruner for studies/search.py's batches).
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import shutil
import time
import warnings
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.data import lock
from jaxepochs.host import batch as batch_lib
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import compose as compose_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import ctrl_c, devices, driver, report, saved_run, setup, specs, tensorboard, writers
from jaxepochs.host import hooks as hooks_lib
from jaxepochs.host import run as run_lib
from jaxepochs.host import workdir as workdir_lib
from jaxepochs.host.batch import RunBatch
from jaxepochs.sweep import grid as sweep_lib
from jaxepochs.sweep import lanes as lanes_lib
from jaxepochs.sweep import prune as prune_lib
from jaxepochs.sweep import report as sweep_report


class SweepResult(NamedTuple):
    results: list[dict]  # one per run, as in results.csv, ranked best first
    histories: dict[str, list[dict]]  # run name -> its rows
    cv: list[dict]  # one per configuration with --cv: mean curve, recommended epochs, refit test metric
    compile_seconds: float
    seconds: float
    summaries: dict[str, dict]  # run name -> summary.json's stopping fields and final test metrics, as a run's


def default_chunk(num_runs: int, params, batch_size: int, widest: int, data_bytes: int = 0) -> int:
    """Runs per program from free memory: per run, the parameters about five times (params, two optimizer
    moments, best params, gradients), the activations of a batch and `data_bytes` (the training split that each
    run's epoch permutes whole: its own copy), with half the free memory to spare."""
    param_bytes = sum(int(np.prod(p.shape)) * 4 for p in jax.tree.leaves(params))
    per_run = 5 * param_bytes + 3 * 4 * batch_size * max(widest, 1) + data_bytes
    return int(max(1, min(num_runs, devices.free_bytes()[0] // 2 // max(per_run, 1))))


def _widest(params) -> int:
    return max(max(p.shape, default=1) for p in jax.tree.leaves(params))


class _Group:
    """A program group: its runs' composition (data, model, optimizer, tracker, the run program's spec) and
    the programs compiled for it, shared by its chunks."""

    def __init__(self, runs: list[sweep_lib.Run], cv: int, quiet: bool, fresh: bool):
        template = runs[0].config
        hooks = hooks_lib.load_hooks(template)
        dataset = setup.load_data(template, hooks, quiet)
        if dataset.streamed:
            raise sweep_lib.SweepError(
                f"{dataset.name} would be streamed (it does not fit the device budget, or data.stream or "
                "train.steps_per_epoch asks for it), and sweeps train device-resident data only for now. Sweep with "
                "data.stream = False where the data fits the device, or train the runs one by one with "
                "`jaxepochs run`."
            )
        if cv:
            sweep_lib.check_cv(cv, data_lib.count(dataset.train))
        self.comp = compose_lib.compose(template, dataset, hooks, cv=cv, sweep=True, fresh=fresh)
        pieces, has_val = self.comp.pieces, self.comp.has_val
        # Every run's own numbers (its fine-tuning values too), checked before anything runs.
        self.members = [compose_lib.member(r.config, r.name, r.fold, pieces, has_val) for r in runs]
        self.programs: dict = {}  # (chunk size, sharded) -> the compiled run program, shared by the chunks

    def chunk_size(self, chunk: int, whole: bool = False) -> int:
        """Runs per program: `chunk`, or as many as fit the free memory; whole shards of the run axis. `whole`: a
        pruned sweep's rungs rank the runs of one program, so `chunk` 0 puts every run of the group in it."""
        comp, count = self.comp, len(self.members)
        if whole and not chunk:
            return -(-count // comp.runs_devices) * comp.runs_devices  # padded to whole shards
        x_1 = setup.first_example(comp.train)
        example, _, _ = jax.eval_shape(lambda x: comp.pieces.source.trace_init(self.members[0].config, x), x_1)
        batch_size = comp.spec.batch_size
        data_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(comp.train.x))
        copied = data_bytes if batch_size > 1 and data_bytes <= epoch_lib.PERMUTE_WHOLE_BYTES else 0
        size = min(chunk or default_chunk(count, example, batch_size, _widest(example), copied), count)
        shards = comp.runs_devices
        if size >= shards > 1:
            size -= size % shards  # whole shards of the run axis
        elif comp.layout is not None or devices.multi_process():
            size = shards  # fewer runs than shards: padded to one run per shard
        return size


class _Chunk(NamedTuple):
    histories: dict[str, list[dict]]
    summaries: dict[str, dict]
    compile_seconds: float


def _train_chunk(group: _Group, members, size: int, workdir: pathlib.Path, progress, stop, pruning) -> _Chunk:
    """Trains `members` (padded to `size` with copies of the first, dropped after) to the end, resuming from
    the chunk's checkpoint: a RunBatch through the host loop that a run goes through (driver.train_loop).
    `pruning`: whether halted runs leave the program, and a pruned sweep's rungs (sweep/prune.py)."""
    batch = RunBatch(group.comp, batch_lib.pad(members, size), real=len(members))
    comp, loop = group.comp, group.comp.loop
    num_val = data_lib.count(comp.train) // comp.cv if comp.cv else data_lib.count(comp.dataset.val)
    shapes = lambda: saved_run.write_shapes(workdir / "run.json", comp.dataset, comp.pieces.steps_per_epoch, num_val)
    devices.on_primary(shapes)  # what `jaxepochs.load(SWEEPDIR, run=...)` rebuilds a member's state from
    key = (size, batch.sharding is not None)  # the chunks of a group share their size: one program for all
    rungs = _rungs(batch, pruning, workdir)
    with checkpoint_lib.opened(workdir, loop.max_to_keep, loop.checkpointing) as ckpt:
        compiled = group.programs.get(key)
        call, carry, compile_seconds = batch.prepare(ckpt, progress, "the sweep's program", compiled=compiled)
        group.programs[key] = batch.compiled
        compact = pruning.compact and (comp.pieces.may_stop or rungs is not None)  # runs may halt
        lanes = lanes_lib.Lanes(batch, call, group.programs, compact, rungs.epochs() if rungs else ())
        if rungs is not None:
            rungs.restore(devices.fetch(carry.es_state))
        marked = (lambda c: rungs.mark(c, lanes.lane_names())) if rungs is not None else (lambda c: c)

        def consume(rows, first: int, seconds: float, _carry) -> bool:  # the carry: a run's callbacks' (host/run.py)
            new = batch.take_rows(rows, first, {"seconds": seconds})
            halted = np.asarray(rows.halted)[: len(members)]
            if rungs is not None:
                still = {name: bool(h) for name, h in zip(batch.names, halted, strict=True)}
                rungs.decide(batch.histories, still, set(batch.non_finite), first, first + int(rows.ran) - 1)
                halted = halted | np.array([name in rungs.pruned for name in batch.names])
            progress.advance(
                first + int(rows.ran) - 1, int(np.sum(~halted)), len(members), new, comp.pieces.tracker.monitor
            )
            return bool(np.all(halted))

        outcome = driver.train_loop(
            loop, lambda c, first, count: lanes.call(marked(c), first, count), carry, batch.first_epoch(),
            limit=comp.spec.epochs_per_call, consume=consume,
            save=lambda carry, epoch: batch.save(ckpt, lanes.whole(marked(carry)), epoch), interrupted=stop,
            checkpointing=ckpt is not None, final_epoch=lambda outcome: batch.last_good_epoch(),
            profile_dir=workdir / "profile",  # the chunk's
            # Marks and compaction act on the carry of the call before: no call dispatched ahead of its rows.
            overlap=not (lanes.enabled or rungs is not None),
            boundaries=lanes.boundaries() | {epoch + 1 for epoch in (rungs.epochs() if rungs else ())},
        )  # fmt: skip
    asked = bool(devices.agree((int(stop()),))[0])  # process 0's Ctrl-C stops every process
    if asked and outcome.last_epoch < loop.epochs and not outcome.halted:
        raise KeyboardInterrupt  # saved: the sweep's rerun resumes this chunk
    dataset = group.comp.dataset
    test = {name: setup.on_device(split) for name, split in {"test": dataset.test, **dataset.evals}.items()}
    endings = batch.finish(lanes.whole(marked(outcome.carry)), False, batch.evaluator(test, group.programs))
    summaries = {name: {k: v for k, v in e.fields.items() if k != "restored_best"} for name, e in endings.items()}
    if rungs is not None:
        for name, summary in summaries.items():
            summary.update(rungs.fields(name))
    return _Chunk(batch.histories, summaries, compile_seconds)


def _rungs(batch: RunBatch, pruning: prune_lib.Plan, workdir: pathlib.Path) -> prune_lib.Rungs | None:
    """A pruned sweep's chunk's rungs, ranked by early stopping's monitor in its direction."""
    if pruning.pruner is None:
        return None
    tracker, epochs = batch.comp.pieces.tracker, batch.comp.loop.epochs
    maximize = tracker.direction == "max"
    return pruning.pruner.rungs(batch.names, pruning.configs, epochs, tracker.monitor, maximize, workdir)


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
    tensorboard.discard(workdir / "tensorboard")  # a link or a mount point kept, with what it holds besides
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
    prune=None,
    compact: bool = True,
) -> SweepResult:
    """Trains every configuration of `grid` (overrides of `config`, as from `sweep.expand`), K folds each with
    `cv` = K; `chunk` caps the runs trained at once (0: chosen from free memory). Resumes a sweep in `workdir`
    (in the chunks it started with). Holds the workdir's lock; a Ctrl-C saves the chunk in flight and stops.
    `prune`: successive halving or Hyperband over the runs of each chunk (a sweep/prune.PruneSpec), or Optuna's
    pruner (sweep/optuna_search.py); `compact`: runs that halt leave the program (sweep/lanes.py; the same numbers
    to round-off without)."""
    start = time.perf_counter()
    workdir = workdir_lib.as_workdir(workdir)
    primary = devices.is_primary()  # process 0 writes the outputs and the checkpoints' arrays
    devices.on_primary(lambda: lock.check_free(workdir, "sweep workdir"))
    devices.on_primary(lambda: workdir_lib.check_kind(workdir, "sweep"))  # a run's, lr-find's, a study's: refused
    _check_arguments(cv, refit, chunk)
    config = config_lib.validate(config)
    if prune is not None:
        prune.check(config.train.epochs)
        if chunk:
            warnings.warn(
                f"--chunk {chunk} with --prune: each chunk's rungs rank its own runs only (successive halving per "
                "chunk). Leave --chunk out to rank every run of the sweep together.",
                stacklevel=2,
            )
    if config.checkpoint.keep_best:
        raise sweep_lib.SweepError(
            f"checkpoint.keep_best = {config.checkpoint.keep_best} keeps a run's best epochs' checkpoints; a sweep's "
            "checkpoint holds a chunk of runs, and each member's best epoch's parameters are kept already "
            "(jaxepochs.load(SWEEPDIR, 'best', run=...)). Set checkpoint.keep_best = 0 for a sweep."
        )
    if cv:  # no validation split: the folds are
        config = config_lib.apply_overrides(config, {"data.validation_fraction": "0.0"})
    writers.check_trackers(config.logging)  # mlflow or wandb on, not installed: said now, with the pip command
    devices.check_same_config(config.to_json_best_effort())
    run_lib.use_compilation_cache(config.train.compilation_cache_dir)
    quiet = quiet or not primary
    runs = sweep_lib.make_runs(config, grid, cv)
    fresh = restart or not _has_progress(workdir)  # only a fresh sweep reads init.from_workdir's source
    hooks = hooks_lib.load_hooks(config)
    static = sweep_lib.hparams_read_by_builders(config.to_dict(), hooks)  # they may change shapes
    if hooks.on_epoch_end is not None:
        warnings.warn(
            f"{hooks.module}: on_epoch_end is called by single runs (`jaxepochs run`, train_and_evaluate), not by "
            "a sweep's members: this sweep does not call it. Run a member alone to have it called.",
            stacklevel=2,
        )
    groups = [_Group(members, cv, quiet, fresh) for members in sweep_lib.group_runs(runs, static)]  # data checked
    spec = {"config": json.loads(config.to_json_best_effort()), "grid": grid, "cv": cv, "programs": len(groups)}
    plan = prune_lib.Plan(compact, prune, tuple(dict.fromkeys(prune_lib.config_of(run.name) for run in runs)))
    if prune is not None:
        spec["prune"] = prune.as_dict()  # a rerun with other pruning is another sweep
    ctrl_c.stop_if_pressed("the sweep")  # a Ctrl-C of the command's first seconds: nothing written yet
    with lock.hold(workdir, "sweep workdir") if primary else contextlib.nullcontext():
        progress = _Progress(max(r.config.train.epochs for r in runs), quiet)
        with driver.stop_on_ctrl_c(progress.message) as stop:
            devices.on_primary(lambda: _prepare(workdir, spec, restart, progress.message))  # the others wait
            histories, summaries, compile_seconds = _train_groups(groups, workdir, chunk, progress, stop, plan)
            results = sweep_report.results(runs, histories, summaries)
            cv_rows = sweep_report.cross_validation(runs, histories, cv) if cv else []
            if refit:
                _refit(lambda overrides: config_lib.apply_overrides(config, overrides), cv_rows, workdir)
            if primary:
                sweep_report.write(workdir, runs, histories, results, cv_rows, grid)
                logs = {run.name: specs.specs_of(run.config).logging for run in runs}
                writers.sweep_outputs(workdir, bool(config.logging.csv), logs, runs, histories, results)
            if stop():
                raise KeyboardInterrupt
    if not quiet:
        print(sweep_report.table(results, cv_rows))
    return SweepResult(results, histories, cv_rows, compile_seconds, time.perf_counter() - start, summaries)


def _check_arguments(cv: int, refit: bool, chunk: int) -> None:
    """The sweep's own arguments, checked before anything is read or written."""
    sweep_lib.check_cv(cv, 2**31)  # K < 2 here; K above the training examples once the data is read
    if chunk < 0:
        raise sweep_lib.SweepError(f"--chunk {chunk}: give the most runs to train at once (1 or more), or 0.")
    if refit and not cv:
        raise sweep_lib.SweepError("--refit retrains on the whole training split after --cv K; add --cv K.")


def _train_groups(groups, workdir: pathlib.Path, chunk: int, progress, stop, plan) -> tuple[dict, dict, float]:
    """Trains every group's chunks in turn: (histories, summaries, compile seconds)."""
    histories: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = {}
    compile_seconds = 0.0
    try:
        for g, group in enumerate(groups):
            members = group.members
            size = group.chunk_size(chunk, whole=plan.pruner is not None)
            size = _recorded_chunk(workdir, g, size, progress.message) if devices.is_primary() else size
            size = devices.agree((size,))[0]  # process 0's record
            for c in range(0, len(members), size):
                chunk_dir = workdir / "chunks" / f"group{g}_chunk{c // size}"
                trained = _train_chunk(group, members[c : c + size], size, chunk_dir, progress, stop, plan)
                compile_seconds += trained.compile_seconds
                histories.update(trained.histories)
                summaries.update(trained.summaries)
            group.programs.clear()  # this group's compiled programs are done with
    finally:
        progress.close()
    return histories, summaries, compile_seconds


def _refit(overridden, cv_rows: list[dict], workdir: pathlib.Path) -> None:
    """Each configuration retrained on the whole training split for its recommended epochs; its test metrics.
    `overridden(overrides)`: the sweep's config with these overrides."""
    for row in cv_rows:
        refit_config = overridden(
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
