"""One host object for a batch of R runs, as the run program is one program for R runs (core/program.py).

    RunBatch(composition, members) -> compile -> start (restore the checkpoint, or initialise the carry)
    -> take each call's rows into per-member histories -> save the carry on the cadence -> finish
    (restore-best, the final evaluation, the stopping fields)

`jaxepochs run` is a batch of one (R = 1); a sweep's chunk (CV folds, the LR finder's constant-rate runs, the
studies' grids) is a batch of many. Whatever a run carries between calls (the carry, each member's rows, the
epochs whose loss was not finite) lives here once, and a checkpoint holds it in one format
(`checkpoint.CheckpointState`). What differs between a run and a sweep is what they do with the rows (a
run's writers and progress bar, a sweep's report): the caller's `observe`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import layout as layout_lib
from jaxepochs.core import optim
from jaxepochs.core import program as program_lib
from jaxepochs.core.early_stopping import HOST_STOPS
from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import devices, finetune, lineage, report, setup
from jaxepochs.host.compose import Composition, Member


class Compiled(NamedTuple):
    """A batch's run program, compiled for its size and placement: calling it never traces or compiles again."""

    run_epochs: Any  # (carry, splits, es_hparams, first, count, last) -> (carry, EpochRows)
    put_scalar: Callable  # an epoch number where the program takes it
    seconds: float


class Ending(NamedTuple):
    """How a member's run ended: summary.json's stopping fields and final metrics, and its final state."""

    fields: dict  # best epoch, stop reason, ... (report.stopping_fields), restored_best, and the final metrics
    state: Any  # its TrainState after the last good epoch (the best epoch's parameters where restored)


def runs_sharding(size: int, runs_devices: int):
    """The run axis split across `runs_devices` devices (a mesh with a "runs" axis), or None on one device."""
    if runs_devices < 2 or size % runs_devices:
        return None
    return NamedSharding(Mesh(np.array(jax.devices()[:runs_devices]), ("runs",)), P("runs"))


class RunBatch:
    """R runs trained by one program: `members` (padded with copies of the first to the program's size; the
    first `real` are reported) on `comp`'s data, model and optimizer."""

    def __init__(self, comp: Composition, members: list[Member], real: int | None = None):
        self.comp, self.members = comp, members
        self.names = [m.name for m in members[: real or len(members)]]
        self.histories: dict[str, list[dict]] = {name: [] for name in self.names}
        self.non_finite: dict[str, int] = {}  # member -> the epoch whose training loss was not finite
        self.sharding = runs_sharding(len(members), comp.runs_devices) if comp.layout is None else None
        self.abstract = self._abstract_carry()
        # Its lineage (host/lineage.py), restored with a checkpoint: the source of a warm start (read on the fresh
        # start only), the meshes of the epochs before `started`, the first epoch this command trains.
        warm = comp.pieces.warm
        self.initialised_from = warm.summary() if warm is not None else None
        self.meshes: list[dict] = []
        self.started = 1
        self.mesh = lineage.mesh_entry(comp.layout)

    # --- composing the batch's arrays -------------------------------------------------------------------------

    def _abstract_carry(self):
        one = setup.abstract_carry(self.comp.pieces, self.members[0].config, setup.first_example(self.comp.train))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((len(self.members), *a.shape[1:]), a.dtype), one)

    def place(self, tree, per_run: bool = True):
        """Host arrays where the program takes them: per run (the carry, its hyperparameters) or shared."""
        if self.comp.layout is not None:
            if not per_run:
                return devices.put(tree, self.comp.layout.replicated())
            return devices.put(jax.device_get(tree), layout_lib.carry_shardings(self.comp.layout, tree))
        if self.sharding is not None:
            where = self.sharding if per_run else NamedSharding(self.sharding.mesh, P())
            return devices.put(jax.device_get(tree), where)
        return tree

    def initial_carry(self):
        """The members' carry before their first epoch: each run's parameters from its seed (or its warm start),
        its optimizer's numbers from its config."""
        x_1 = setup.first_example(self.comp.train)
        carry = setup.init_carries(self.comp.pieces, [m.config for m in self.members], [m.opt_hparams for m in
                                   self.members], x_1)  # fmt: skip
        return self.place(carry)

    def es_hparams(self):
        return self.place(setup.es_hparams([m.tracker for m in self.members]))

    def splits(self) -> dict:
        """The splits the program trains and evaluates on: CV folds per run ([R, ...]), else shared."""
        comp = self.comp
        splits = comp.splits([m.fold for m in self.members])
        if comp.layout is None and self.sharding is None:
            return splits
        per_run = lambda name: comp.spec.data_axes.get(name) == 0
        return {name: self.place(jax.device_get(split), per_run(name)) for name, split in splits.items()}

    # --- compiling --------------------------------------------------------------------------------------------

    def compile(self, splits, es_hparams) -> Compiled:
        """The run program for this batch's size and placement (XLA partitions it over a layout's mesh; with a
        runs sharding each device runs the very program a run alone compiles, on its share of the runs)."""
        start, comp = time.perf_counter(), self.comp
        one = np.asarray(1, np.int32)
        if comp.layout is not None:
            rep = comp.layout.replicated()
            carry_sh = layout_lib.carry_shardings(comp.layout, self.abstract)
            split_sh = {k: comp.layout.per_run() if comp.spec.data_axes.get(k) == 0 else rep for k in splits}
            program = program_lib.make_run_epochs(comp.spec)
            jitted = jax.jit(program, in_shardings=(carry_sh, split_sh, comp.layout.per_run(), rep, rep, rep),
                             out_shardings=(carry_sh, rep))  # fmt: skip
            put = functools.partial(devices.put, shardings=rep)
            compiled = jitted.lower(self.abstract, splits, es_hparams, put(one), put(one), put(one)).compile()
            return Compiled(compiled, put, time.perf_counter() - start)
        program = program_lib.make_run_epochs(comp.spec, "runs" if self.sharding is not None else None)
        abstract = self.abstract
        if self.sharding is not None:
            runs, shared = P("runs"), P()
            data = {name: runs if comp.spec.data_axes.get(name) == 0 else shared for name in splits}
            rows = program_lib.EpochRows(
                runs, runs, runs, runs, runs, shared, runs, {k: runs for k in comp.spec.eval_every}
            )
            program = jax.shard_map(program, mesh=self.sharding.mesh, in_specs=(runs, data, runs, shared, shared,
                                    shared), out_specs=(runs, rows), check_vma=False)  # fmt: skip
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.sharding), abstract)
        compiled = jax.jit(program).lower(abstract, splits, es_hparams, one, one, one).compile()
        return Compiled(compiled, np.asarray, time.perf_counter() - start)

    def caller(self, compiled: Compiled, splits, es_hparams):
        """The driver's call(carry, first, count) -> (carry, rows): the program on this batch's data, up to the
        last epoch."""
        last = self.comp.loop.epochs

        def call(carry, first: int, count: int):
            as_int = lambda value: compiled.put_scalar(np.asarray(value, np.int32))
            return compiled.run_epochs(carry, splits, es_hparams, as_int(first), as_int(count), as_int(last))

        return call

    def prepare(self, ckpt, progress, what: str = "the run program", compiled: Compiled | None = None):
        """The compiled program (compiling in a second thread while the carry is restored from `ckpt` or
        initialised here: XLA's compiles overlap; or `compiled`, a program of this size compiled before) and the
        carry to go on from. Returns (call, carry, compile seconds); the program is kept as `self.compiled`."""
        splits, es_hparams = self.splits(), self.es_hparams()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            started = time.monotonic()
            compiling = pool.submit(self.compile, splits, es_hparams) if compiled is None else None
            restored = self.restore(ckpt, progress.message) if ckpt is not None else None
            carry = restored if restored is not None else self.initial_carry()
            if compiling is not None:
                compiled = progress.wait_compiling(compiling, started, what)
        self.compiled = compiled
        seconds = compiled.seconds if compiling is not None else 0.0
        return self.caller(compiled, splits, es_hparams), carry, seconds

    # --- checkpoints: one format ----------------------------------------------------------------------------

    def first_epoch(self) -> int:
        return max((len(rows) for rows in self.histories.values()), default=0) + 1

    def last_good_epoch(self) -> int:
        """The epoch a checkpoint of the carry stands for: the furthest any member trained (a non-finite epoch
        is discarded, so it does not count)."""
        return self.first_epoch() - 1

    def save(self, ckpt, carry, epoch: int | None = None) -> None:
        """Saves the carry with every member's rows (a copy: orbax writes it later), unless no epoch is done."""
        epoch = self.last_good_epoch() if epoch is None else epoch
        if ckpt is None or epoch <= 0:
            return
        state = checkpoint_lib.CheckpointState(devices.fetch(carry), self.histories, self.non_finite, epoch,
                                               lineage=self.lineage(epoch))  # fmt: skip
        checkpoint_lib.save_state(ckpt, state)

    def restore(self, ckpt, say):
        """The newest good checkpoint's carry (placed), its rows and non-finite epochs taken in; None if none. A
        run that had stopped early or met a non-finite loss stays halted."""
        restored = checkpoint_lib.restore_state(ckpt, self.abstract, say)
        if restored is None:
            return None
        if set(restored.histories) != set(self.names):
            raise checkpoint_lib.CheckpointError(
                f"checkpoint {ckpt.directory} holds runs {sorted(restored.histories)}, not {self.names}: it was "
                "written by another run or sweep. Use another workdir or --restart."
            )
        self.histories.update({name: list(rows) for name, rows in restored.histories.items()})
        self.non_finite.update(restored.non_finite)
        self.take_lineage(restored.lineage, restored.epoch, say)
        padded = [m.name for m in self.members]
        es = restored.carry.es_state  # a callback's stop or a rung's prune halts the run with early stopping off too
        by_host = np.isin(np.asarray(es.stop_reason), HOST_STOPS)
        halted = np.asarray(es.should_stop) & (self.comp.pieces.may_stop | by_host)
        halted = halted | np.array([name in self.non_finite for name in padded])
        return self.place(restored.carry._replace(halted=halted))

    def lineage(self, epoch: int | None = None) -> dict:
        """What a checkpoint after `epoch` (the last good epoch) carries besides the rows, and summary.json says."""
        last = self.last_good_epoch() if epoch is None else epoch
        return {"initialised_from": self.initialised_from,
                "meshes": lineage.meshes(self.meshes, self.mesh, self.started, last)}  # fmt: skip

    def take_lineage(self, restored: dict, epoch: int, say) -> None:
        """A restored checkpoint's lineage (after `epoch` epochs); said when this batch's mesh is another."""
        init = self.members[0].config.init
        if restored.get("initialised_from"):
            self.initialised_from = restored["initialised_from"]
        elif self.initialised_from is None and init.from_workdir:  # a checkpoint written before lineages
            self.initialised_from = {"workdir": init.from_workdir, "epoch": str(init.epoch)}
        self.meshes, self.started = list(restored.get("meshes", [])), epoch + 1
        message = lineage.changed(self.meshes, self.mesh)
        if message:
            say(message)

    # --- rows -------------------------------------------------------------------------------------------------

    def take_rows(self, rows, first_epoch: int, fields: dict) -> dict[str, list[dict]]:
        """Each reported member's new rows in a call's EpochRows (fetched), with `fields` (seconds, ...) and its
        per-group learning rates, added to its history; a non-finite epoch noted."""
        new = {}
        tx = self.comp.pieces.tx
        for r, member in enumerate(self.members[: len(self.names)]):
            member_rows, bad = report.run_rows(rows, first_epoch, self.comp.pieces.steps_per_epoch, r)
            for row in member_rows:
                row.update(fields)
                if tx.group_names:
                    row.update(finetune.rate_columns(row["epoch"], row["learning_rate"], tx.group_names,
                                                     *member.group_values))  # fmt: skip
            self.histories[member.name].extend(member_rows)
            if bad:
                self.non_finite[member.name] = bad
            new[member.name] = member_rows
        return new

    # --- the end ----------------------------------------------------------------------------------------------

    def final_states(self, carry):
        """The members' final TrainStates (from the carry fetched to the host, run axis): the best epoch's
        parameters where the rule is restore-best and an epoch was monitored (start_from_epoch may leave none),
        else the last good epoch's (as evaluated: the optimizer's evaluation parameters, where it has them)."""
        state = carry.state
        if hasattr(self.comp.spec.tx, "eval_params"):
            state = devices.fetch(optim.evaluation_states(self.comp.spec.tx, state))
        restored = self.restored_best(carry.es_state)
        pick = lambda best, last: np.where(restored.reshape(-1, *[1] * (np.ndim(best) - 1)), best, last)
        return state._replace(params=jax.tree.map(pick, carry.best_params, state.params)), restored

    def keep_best(self) -> checkpoint_lib.KeepBest:
        """checkpoint.keep_best's ranking: the monitor early stopping tracks, in its direction."""
        tracker = self.comp.pieces.tracker
        return checkpoint_lib.KeepBest(self.comp.loop.keep_best, tracker.monitor, tracker.direction == "max")

    def restored_best(self, es_state) -> np.ndarray:
        return np.asarray(es_state.best_epoch) > 0 if self.comp.restore_best else np.zeros(len(self.members), bool)

    def finish(self, carry, interrupted: bool, evaluate) -> dict[str, Ending]:
        """Each reported member's ending: its stopping fields and `evaluate(states)`'s final metrics."""
        carry = devices.fetch(carry)
        states, restored = self.final_states(carry)
        totals = evaluate(states)
        out = {}
        for r, name in enumerate(self.names):
            es = jax.tree.map(lambda a, r=r: np.asarray(a)[r], carry.es_state)
            bad = self.non_finite.get(name)
            reason = report.stop_reason(es, self.comp.pieces.may_stop, bad, interrupted)
            fields = report.stopping_fields(es, self.comp.pieces.tracker.monitor, reason, bad)
            final = {k: v for split, metrics in totals.items() for k, v in _member(metrics, r).means(split).items()}
            state = jax.tree.map(lambda a, r=r: np.asarray(a)[r], states)
            out[name] = Ending({**fields, "restored_best": bool(restored[r]), **final}, state)
        return out

    def evaluator(self, held_out: dict, programs: dict | None = None):
        """evaluate(states) -> {split: Metrics [R]}: the final evaluation of `held_out` (split -> batch on the
        device) for the members' final states, compiled at its first use: the first epoch does not wait for it.
        `programs`: a cache the batches of one size share (a sweep's chunks), so it compiles once."""
        comp = self.comp
        key = ("evaluate", len(self.members), self.sharding is not None, tuple(held_out))
        if programs is not None and key in programs:
            return functools.partial(self._evaluate, programs[key], held_out)
        sizes = setup.eval_sizes(comp.eval_batch_size, {k: epoch_lib.num_examples(d) for k, d in held_out.items()})
        program = program_lib.make_evaluate(dataclasses.replace(comp.spec, eval_batch_sizes=sizes))
        if self.sharding is not None:
            runs, shared = P("runs"), P()
            program = jax.shard_map(program, mesh=self.sharding.mesh, in_specs=(runs, {k: shared for k in held_out}),
                                    out_specs=runs, check_vma=False)  # fmt: skip
        jitted = jax.jit(program)
        if programs is not None:
            programs[key] = jitted
        return functools.partial(self._evaluate, jitted, held_out)

    def _evaluate(self, jitted, held_out: dict, states):
        placed = self._shared(held_out)
        return devices.fetch(jitted(self.place(states), placed))

    def _shared(self, held_out: dict) -> dict:
        """Held-out batches where the program takes them: shared by the runs on a layout's or sharding's mesh."""
        if self.comp.layout is None and self.sharding is None:
            return held_out
        return {k: self.place(jax.device_get(v), per_run=False) for k, v in held_out.items()}


def _member(metrics: epoch_lib.Metrics, r: int) -> epoch_lib.Metrics:
    return jax.tree.map(lambda a: np.asarray(a)[r], metrics)


def pad(members: list[Member], size: int) -> list[Member]:
    """`members` padded to `size` with copies of the first (dropped from every report)."""
    return members + [members[0]] * (size - len(members))
