"""Runs a sweep: per program group, chunks of runs stacked on a leading axis and trained by one vmapped
many-epoch program (sharded over the devices when there are several), then the outputs.

Writes into the workdir: sweep.json (the specification, for resuming), sweep.jsonl (one row per run per
epoch), results.csv (one row per run), cv.csv with --cv, sweep.png, and checkpoints/ per chunk. A group of one
run (no vmap to gain) is trained as `jaxepochs run` trains it, into chunks/group<g>_alone/.
"""

from __future__ import annotations

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

from jaxepochs import checkpoint as checkpoint_lib
from jaxepochs import config as config_lib
from jaxepochs import data as data_lib
from jaxepochs import epoch as epoch_lib
from jaxepochs import models, multi_epoch, report, schedules, sweep_report
from jaxepochs import sweep_grid as sweep_lib
from jaxepochs import train as train_lib

DEFAULT_EPOCHS_PER_CALL = 10


class SweepResult(NamedTuple):
    results: list[dict]  # one per run, as in results.csv, ranked best first
    histories: dict[str, list[dict]]  # run name -> its rows
    cv: list[dict]  # one per configuration with --cv: mean curve, recommended epochs, refit test metric
    compile_seconds: float
    seconds: float


def _stack(trees):
    """Stacks on the host: an eager jnp.stack would compile once per number of runs."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *jax.device_get(trees))


def _free_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))  # host memory (CPU)


def default_chunk(num_runs: int, params, batch_size: int, widest: int) -> int:
    """Runs per program from free memory: per run, the parameters about five times (params, two optimizer
    moments, best params, gradients) and the activations of a batch, with half the free memory to spare."""
    param_bytes = sum(int(np.prod(p.shape)) * 4 for p in jax.tree.leaves(params))
    per_run = 5 * param_bytes + 3 * 4 * batch_size * max(widest, 1)
    return int(max(1, min(num_runs, _free_bytes() // 2 // max(per_run, 1))))


def _widest(params) -> int:
    return max(max(p.shape, default=1) for p in jax.tree.leaves(params))


class _Group:
    """The shared pieces of one program group: data, model, optimizer, tracker, compiled programs."""

    def __init__(self, runs: list[sweep_lib.Run], cv: int, quiet: bool):
        template = runs[0].config
        self.config = template
        self.cv = cv
        dataset = data_lib.load_dataset(template, quiet)
        train_lib._check_shapes(template, dataset)
        self.dataset = dataset
        if cv:
            sweep_lib.check_cv(cv, dataset.train.y.shape[0])
            train_idx, _ = sweep_lib.fold_indices(dataset.train.y.shape[0], cv, 0, template.data.split_seed)
            n_train = train_idx.shape[0]
        else:
            n_train = dataset.train.y.shape[0]
        self.has_val = bool(cv) or dataset.val.y.shape[0] > 0
        self.steps_per_epoch = epoch_lib.steps_per_epoch(n_train, template.train.batch_size)
        self.model = models.make_model(template.model, dataset.num_classes)
        self.tracker, self.may_stop = train_lib._tracker(template, self.has_val)
        self.epochs = template.train.epochs
        per_call = template.train.epochs_per_call
        self.epochs_per_call = max(1, min(per_call if per_call > 1 else DEFAULT_EPOCHS_PER_CALL, self.epochs))
        self.log_test = template.train.log_test
        self.programs: dict = {}  # (chunk size, sharded) -> (compiled, evaluate), shared by the chunks

    def tx(self, config):
        return schedules.make_optimizer(config.optimizer, self.steps_per_epoch, self.epochs)

    def splits(self, runs: list[sweep_lib.Run]) -> tuple[dict, dict]:
        """The arrays each run trains and is validated on, and their vmap axes (CV: per run, [R, ...])."""
        d = self.dataset
        if not self.cv:
            splits = {"train": (d.train.x, d.train.y)}
            if self.has_val:
                splits["val"] = (d.val.x, d.val.y)
            if self.log_test:
                splits["test"] = (d.test.x, d.test.y)
            return {k: tuple(jnp.asarray(a) for a in v) for k, v in splits.items()}, {k: None for k in splits}
        folds = [sweep_lib.fold_indices(d.train.y.shape[0], self.cv, r.fold, self.config.data.split_seed) for r in runs]
        stack = lambda idx: (
            jnp.asarray(np.stack([d.train.x[i] for i in idx])),
            jnp.asarray(np.stack([d.train.y[i] for i in idx])),
        )
        splits = {"train": stack([f[0] for f in folds]), "val": stack([f[1] for f in folds])}
        axes = {"train": 0, "val": 0}
        if self.log_test:
            splits["test"] = (jnp.asarray(d.test.x), jnp.asarray(d.test.y))
            axes["test"] = None
        return splits, axes

    def init(self, runs: list[sweep_lib.Run]):
        """The stacked carry and early-stopping hyperparameters of `runs`: each run's parameters from a run's own
        init program (compiled once), the optimizer states of all from one vmapped program, then each run's
        optimizer hyperparameters written into its state (where inject_hyperparams and EpochSchedule keep them),
        exactly as a run initialised alone holds them."""
        x_1f = jnp.asarray(self.dataset.train.x[:1])
        # Not a vmap of the parameters' init over the seeds: its batched threefry compiles for seconds more per
        # shape of the run axis (on 2 CPU cores 7 s for 8 runs of the MNIST-1D MLP, against 2 s for one).
        inits = [self._init_params(jnp.asarray(r.config.seed, jnp.uint32), x_1f) for r in runs]
        params, run_keys = _stack([params for params, _ in inits]), _stack([key for _, key in inits])
        state = epoch_lib.TrainState(
            params, self._opt_init_many(params), np.zeros(len(runs), np.int32), np.asarray(run_keys)
        )
        state = jax.tree.map(np.asarray, jax.device_get(state))
        opt = state.opt_state
        o = [r.config.optimizer for r in runs]
        schedule = opt.hyperparams_states["learning_rate"]
        lr = np.array([c.learning_rate for c in o], np.float32)
        schedule = schedule._replace(learning_rate=lr)
        hyper = dict(opt.hyperparams)
        hyper["learning_rate"] = lr * schedule.shape * schedule.scale  # the first step's rate, as init computes
        for name in ("weight_decay", "momentum", "b1", "b2"):
            if name in hyper:
                hyper[name] = np.array([c[name] for c in o], np.float32)
        opt = opt._replace(hyperparams=hyper, hyperparams_states={**opt.hyperparams_states, "learning_rate": schedule})
        state = state._replace(opt_state=opt)
        es_state = _stack([self.tracker.init()] * len(runs))
        carry = multi_epoch.Carry(state, es_state, state.params, np.zeros(len(runs), bool))
        hparams = []
        for run in runs:
            es = config_lib.make_early_stopping(run.config.early_stopping, self.has_val) if self.may_stop else None
            hparams.append((es or self.tracker).hparams())
        return carry, _stack(hparams)

    @functools.cached_property
    def _init_params(self):
        """(seed, x_1f) -> (params, run key): the program `train.init_state` runs for a run alone."""
        return train_lib.init_params_program(self.model)

    @functools.cached_property
    def _opt_init_many(self):
        return jax.jit(jax.vmap(self.tx(self.config).init))

    def compile(self, carry, splits, axes, hparams):
        apply_fn = lambda params, x: self.model.apply({"params": params}, x)
        eval_sizes = {
            name: min(self.config.train.eval_batch_size, x.shape[-(self.dataset.train.x.ndim)])
            for name, (x, _) in splits.items()
            if name != "train"
        }
        program = multi_epoch.make_run_epochs(
            apply_fn=apply_fn,
            tx=self.tx(self.config),
            batch_size=self.config.train.batch_size,
            eval_batch_sizes=eval_sizes,
            tracker=self.tracker,
            may_stop=self.may_stop,
            epochs_per_call=self.epochs_per_call,
            test_every=self.config.train.test_every,
            shuffle=self.config.train.shuffle,
        )
        if jax.tree.leaves(carry)[0].shape[0] == 1:
            # A chunk of one run: the run's own program, not a vmap of one, whose batched while_loop and gathers
            # compile about twice as long. Same inputs and outputs (a leading axis of 1), same numbers.
            first = lambda tree: jax.tree.map(lambda a: a[0], tree)

            def batched(carry, splits, epoch, epochs, hparams):
                splits = {name: first(arrays) if axes[name] == 0 else arrays for name, arrays in splits.items()}
                outputs = program(first(carry), splits, epoch, epochs, first(hparams))
                return jax.tree.map(lambda a: a[None], outputs)
        else:
            batched = jax.vmap(program, in_axes=(0, axes, None, None, 0))
        one = jnp.asarray(1, jnp.int32)
        start = time.perf_counter()
        compiled = jax.jit(batched).lower(carry, splits, one, one, hparams).compile()
        evaluate = {}
        d = self.dataset
        # The test split once, on the parameters each run ends with (its validation curve is in its history).
        for name, (x, y) in {"test": (d.test.x, d.test.y)}.items():
            size = min(self.config.train.eval_batch_size, x.shape[0])
            fn = functools.partial(epoch_lib.eval_epoch, apply_fn=apply_fn, batch_size=size)
            evaluate[name] = (jax.jit(jax.vmap(fn, in_axes=(0, None, None))), (jnp.asarray(x), jnp.asarray(y)))
        return compiled, evaluate, time.perf_counter() - start


def _sharding(chunk: int):
    """A mesh over the devices with the run axis split across them, or None on one device."""
    devices = jax.devices()
    if len(devices) < 2 or chunk % len(devices):
        return None
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    return NamedSharding(Mesh(np.array(devices), ("runs",)), PartitionSpec("runs"))


def _train_chunk(group, runs, chunk_size, workdir, progress) -> tuple[dict, object, float]:
    """Trains `runs` (padded to `chunk_size` with copies of the first, dropped after) to the end; resumes from
    the chunk's checkpoint. Returns the histories, the final carry (real runs only) and the compile seconds."""
    padded = runs + [runs[0]] * (chunk_size - len(runs))
    carry, hparams = group.init(padded)
    splits, axes = group.splits(padded)
    sharding = _sharding(chunk_size)
    if sharding is not None:
        carry, hparams = jax.device_put((carry, hparams), sharding)
        splits = {
            name: jax.device_put(arrays, sharding) if axes[name] == 0 else arrays for name, arrays in splits.items()
        }
    # The chunks of a group share their size and placement: one program for all (the last chunk is padded).
    key = (chunk_size, sharding is not None)
    if key in group.programs:
        (compiled, evaluate), compile_seconds = group.programs[key], 0.0
    else:
        compiled, evaluate, compile_seconds = group.compile(carry, splits, axes, hparams)
        group.programs[key] = (compiled, evaluate)
    histories = {run.name: [] for run in runs}
    ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=1)
    try:
        restored = ckpt.restore_latest({"carry": carry}, progress.message)
        epoch = 1
        if restored is not None:
            done, arrays, meta = restored
            carry = arrays["carry"]
            if sharding is not None:
                carry = jax.device_put(carry, sharding)
            histories = meta["histories"]
            epoch = done + 1
        last_save, saved = time.perf_counter(), None
        every = group.config.checkpoint.every_seconds
        active = int(np.sum(~np.asarray(jax.device_get(carry.halted))[: len(runs)]))
        while epoch <= group.epochs and active:
            carry, rows = compiled(carry, splits, jnp.int32(epoch), jnp.int32(group.epochs), hparams)
            rows = jax.device_get(rows)
            new = {
                run.name: multi_epoch.call_rows(rows, epoch, group.steps_per_epoch, r)[0] for r, run in enumerate(runs)
            }
            for name, rows_of_run in new.items():
                histories[name] += rows_of_run
            epoch += int(np.max(rows.ran))
            active = int(np.sum(~np.asarray(jax.device_get(carry.halted))[: len(runs)]))
            progress.advance(epoch - 1, active, len(runs), new, group.tracker.monitor)
            if time.perf_counter() - last_save >= every:
                ckpt.save(epoch - 1, {"carry": carry}, {"epoch": epoch - 1, "histories": histories})
                last_save, saved = time.perf_counter(), epoch - 1
        if saved != epoch - 1:  # the end (a finished chunk resumed has it already: Checkpointer.save skips it)
            ckpt.save(max(epoch - 1, 1), {"carry": carry}, {"epoch": epoch - 1, "histories": histories})
    finally:
        ckpt.close()
    finals = {}
    restore_best = group.config.early_stopping.enabled and group.config.early_stopping.restore_best
    params = carry.best_params if restore_best else carry.state.params  # padded runs too: no new shapes
    real = jax.tree.map(lambda a: np.asarray(a)[: len(runs)], jax.device_get(carry))
    for name, (fn, (x, y)) in evaluate.items():
        totals = jax.device_get(fn(params, x, y))
        for r, run in enumerate(runs):
            finals.setdefault(run.name, {}).update(epoch_lib.Metrics(*(a[r] for a in totals)).means(f"final_{name}"))
    return histories, (real, finals), compile_seconds


def _train_alone(run: sweep_lib.Run, workdir: pathlib.Path, progress) -> tuple[list, dict, dict, float]:
    """Trains one run with `train_and_evaluate` in `workdir` (resuming there): its history, its early-stopping
    state and final test metrics as a sweep reports them, and its compile seconds. A non-finite loss stops the run
    at its last good epoch (as it freezes a run of a vmapped chunk), not the sweep."""
    progress.message(f"{run.name}: the only run of its group, trained as a single run")
    try:
        history = train_lib.train_and_evaluate(run.config, workdir, quiet=True, plot=False).history
    except train_lib.NonFiniteLossError:
        history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((workdir / "summary.json").read_text())
    stopped = summary["stop_reason"] not in ("completed", "non_finite_loss")
    state = {
        "best_epoch": summary["best_epoch"],
        "stopped_epoch": summary["stopped_epoch"] if stopped else 0,
        "best_value": summary["best_value"] if summary["best_value"] is not None else float("nan"),
        "monitor": summary["best_epoch_metric"],
    }
    final = {f"final_{k}": v for k, v in summary.items() if k in ("test_loss", "test_accuracy")}
    progress.advance(len(history), 0, 1, {run.name: history}, state["monitor"])
    return history, state, final, summary["compile_seconds"]


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

    def close(self) -> None:
        self._progress.close()


def _prepare(workdir: pathlib.Path, spec: dict, restart: bool) -> None:
    path = workdir / "sweep.json"
    if restart and workdir.exists():
        for name in ("sweep.json", "sweep.jsonl", "results.csv", "cv.csv", "sweep.png"):
            (workdir / name).unlink(missing_ok=True)
        shutil.rmtree(workdir / "chunks", ignore_errors=True)
    if path.exists() and json.loads(path.read_text()) != spec:
        raise sweep_lib.SweepError(
            f"{workdir} holds another sweep (its sweep.json differs). Use a new --workdir, or --restart to discard it."
        )
    if not path.exists() and workdir.exists() and any(workdir.iterdir()):
        raise sweep_lib.SweepError(f"{workdir} is not empty and holds no sweep. Use a new --workdir.")
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")


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
    `cv` = K; `chunk` caps the runs trained at once (0: chosen from free memory). Resumes a sweep in `workdir`."""
    start = time.perf_counter()
    config = config_lib.validate(config)
    train_lib.use_compilation_cache(config.train.compilation_cache_dir)
    if cv:
        if cv < 2:
            raise sweep_lib.SweepError(f"--cv {cv}: cross-validation needs K >= 2 folds.")
        config = config_lib.apply_overrides(config, {"data.validation_fraction": "0.0"})
    if chunk < 0:
        raise sweep_lib.SweepError(f"--chunk {chunk}: give the most runs to train at once (1 or more), or 0.")
    if refit and not cv:
        raise sweep_lib.SweepError("--refit retrains on the whole training split after --cv K; add --cv K.")
    workdir = pathlib.Path(workdir)
    spec = {"config": json.loads(config.to_json_best_effort()), "grid": grid, "cv": cv}
    _prepare(workdir, spec, restart)
    runs = sweep_lib.make_runs(config, grid, cv)
    groups = sweep_lib.group_runs(runs)
    progress = _Progress(max(r.config.train.epochs for r in runs), quiet)
    histories: dict[str, list[dict]] = {}
    finals: dict[str, dict] = {}
    states: dict[str, dict] = {}
    compile_seconds = 0.0
    try:
        for g, members in enumerate(groups):
            if len(members) == 1 and not cv:
                # A group of one run trains as `jaxepochs run` trains it: the same programs, which compile faster
                # than the many-epoch sweep program (on 2 CPU cores about 2 s against 4 s for the MNIST-1D MLP).
                run = members[0]
                history, state, final, seconds = _train_alone(run, workdir / "chunks" / f"group{g}_alone", progress)
                histories[run.name], states[run.name], finals[run.name] = history, state, final
                compile_seconds += seconds
                continue
            group = _Group(members, cv, quiet)
            example_x = jnp.asarray(group.dataset.train.x[:1])
            example_params = jax.eval_shape(
                functools.partial(models.init_params, group.model, jax.random.PRNGKey(0)), example_x
            )
            size = chunk or default_chunk(
                len(members), example_params, group.config.train.batch_size, _widest(example_params)
            )
            devices = len(jax.devices())
            if size >= devices > 1:
                size -= size % devices  # whole shards of the run axis
            size = min(size, len(members)) if len(members) < devices else size
            for c in range(0, len(members), size):
                part = members[c : c + size]
                chunk_dir = workdir / "chunks" / f"group{g}_chunk{c // size}"
                part_histories, (carry, part_finals), seconds = _train_chunk(group, part, size, chunk_dir, progress)
                compile_seconds += seconds
                histories.update(part_histories)
                finals.update(part_finals)
                for r, run in enumerate(part):
                    es = jax.tree.map(lambda a, r=r: np.asarray(a[r]), carry.es_state)
                    states[run.name] = {
                        "best_epoch": int(es.best_epoch),
                        "stopped_epoch": int(es.stop_epoch) if group.may_stop and bool(es.should_stop) else 0,
                        "best_value": float(es.best_value) if int(es.best_epoch) else float("nan"),
                        "monitor": group.tracker.monitor,
                    }
    finally:
        progress.close()
    results = sweep_report.results(runs, histories, finals, states)
    cv_rows = sweep_report.cross_validation(runs, histories, cv) if cv else []
    if refit:
        for row in cv_rows:
            refit_config = config_lib.apply_overrides(
                config,
                {**row["values"], "train.epochs": str(row["recommended_epochs"]), "data.validation_fraction": "0.0"},
            )
            result = train_lib.train_and_evaluate(
                refit_config, workdir / "refit" / row["config"], quiet=True, restart=True
            )
            row["refit_test_loss"] = result.summary["test_loss"]
            row["refit_test_accuracy"] = result.summary["test_accuracy"]
    sweep_report.write(workdir, runs, histories, results, cv_rows, grid)
    if not quiet:
        print(sweep_report.table(results, cv_rows))
    return SweepResult(results, histories, cv_rows, compile_seconds, time.perf_counter() - start)
