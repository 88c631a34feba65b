"""Pruned sweeps: successive halving and Hyperband, decided between calls of a chunk's one program.

    jaxepochs sweep ... --prune sha --eta 3 --min_epochs 5     # rungs at 5, 15, 45, 135 epochs
    jaxepochs sweep ... --prune hyperband --eta 3 --min_epochs 5

A rung is an epoch at which the runs still training are ranked by early stopping's monitor (the value logged at
that epoch; a --cv configuration by the mean over its folds): the best 1/eta continue and the others halt, with
`stop_reason: "pruned"` and the rung's epoch as their stopped epoch. Successive halving is one bracket, rungs at
`min_epochs * eta**k`; Hyperband (Li et al., 2018) spreads the configurations over brackets that start
halving later and later (the last bracket trains its few runs to the end unpruned), so that a configuration that
starts slowly has a bracket in which it is not cut early. Every bracket trains in the same program.

A rung's epoch ends a call (the host loop's pace stops there), the ranking is the host's, from the rows it has
read, and the halt is written into the carry as a callback's stop is (host/callbacks.py): a halted run is frozen
inside the program, and compaction (sweep/lanes.py) takes it out of the batch. The decision is a function of the
rows alone, so a rerun that recomputes a rung's epoch decides it again the same way.

ASHA (Li et al., 2020) promotes a run as soon as it is in the top 1/eta of those that have reached its rung,
because its workers finish at different times. Here every run of a chunk reaches a rung in the same call, so
there is nothing to wait for: synchronous halving is exact, and what ASHA buys elsewhere (no idle workers) the
compaction buys here (the pruned runs' lanes leave the program).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxepochs.core import early_stopping as early_stopping_lib
from jaxepochs.host import devices

KINDS = ("sha", "hyperband")


class PruneError(ValueError):
    """Pruning settings that cannot run; raised before anything compiles."""


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """How a sweep prunes: `kind` "sha" (successive halving) or "hyperband", keeping the best 1/`eta` at each rung;
    the first rung at `min_epochs`."""

    kind: str
    eta: int = 3
    min_epochs: int = 1

    def check(self, epochs: int) -> None:
        if self.kind not in KINDS:
            raise PruneError(f"--prune {self.kind}: choose one of {', '.join(KINDS)}.")
        if self.eta < 2:
            raise PruneError(f"--eta {self.eta}: each rung keeps 1/eta of the runs; give 2 or more (3 is usual).")
        if not 1 <= self.min_epochs < epochs:
            raise PruneError(
                f"--min_epochs {self.min_epochs}: the first rung must come before the last epoch ({epochs}); give "
                f"1..{epochs - 1}, or train more epochs (train.epochs)."
            )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def rungs(self, names, configs, epochs: int, monitor: str, maximize: bool, workdir) -> Rungs:
        """A chunk's rungs: its members `names` among the sweep's `configs`."""
        return Rungs(names, brackets(self, list(configs), epochs), monitor, maximize, self.eta)


class Plan(NamedTuple):
    """What a sweep's chunks do with runs that halt: leave the program (`compact`), and a pruned sweep's pruner
    (a PruneSpec, or Optuna's: sweep/optuna_search.py) with every configuration's name."""

    compact: bool = True
    pruner: Any = None  # .rungs(names, configs, epochs, monitor, maximize, workdir) -> Rungs
    configs: tuple[str, ...] = ()


class Bracket(NamedTuple):
    index: int  # Hyperband's s (the number of rungs); 0 for successive halving's one bracket
    rungs: tuple[int, ...]  # the epochs at which its runs are ranked


def sha_rungs(first: int, eta: int, epochs: int) -> tuple[int, ...]:
    """Successive halving's rungs: `first`, then times `eta`, while before the last epoch."""
    out, epoch = [], first
    while epoch < epochs:
        out.append(epoch)
        epoch *= eta
    return tuple(out)


def brackets(spec: PruneSpec, configs: list[str], epochs: int) -> dict[str, Bracket]:
    """Each configuration's bracket. Successive halving: one, rungs at min_epochs * eta**k. Hyperband: brackets
    s = s_max..0 (s_max = floor(log_eta(epochs / min_epochs))), bracket s with rungs from epochs / eta**s and
    a share of the configurations proportional to Hyperband's n_s = ceil((s_max + 1) / (s + 1) * eta**s); the
    configurations are dealt to the brackets in a fixed shuffled order (a grid is ordered by its keys)."""
    if spec.kind == "sha":
        bracket = Bracket(0, sha_rungs(spec.min_epochs, spec.eta, epochs))
        return {name: bracket for name in configs}
    s_max = int(math.floor(math.log(epochs / spec.min_epochs, spec.eta) + 1e-9))
    sizes = {s: math.ceil((s_max + 1) / (s + 1) * spec.eta**s) for s in range(s_max, -1, -1)}
    order = np.random.default_rng(0).permutation(len(configs))
    total, out, dealt = sum(sizes.values()), {}, 0
    for s, n in sizes.items():
        share = len(configs) - dealt if s == 0 else min(round(n / total * len(configs)), len(configs) - dealt)
        # Rung i of bracket s at epochs / eta**(s - i): each rounded on its own, so none lands past the last.
        rungs = sorted({max(spec.min_epochs, round(epochs / spec.eta ** (s - i))) for i in range(s)})
        for i in order[dealt : dealt + share]:
            out[configs[i]] = Bracket(s, tuple(epoch for epoch in rungs if epoch < epochs))
        dealt += share
    return out


def config_of(name: str) -> str:
    """A member's configuration: "r3_fold1" -> "r3" (its folds are ranked and pruned together)."""
    return name.rsplit("_fold", 1)[0]


def _value_at(history: list[dict], epoch: int, monitor: str) -> float:
    """The monitor as logged at `epoch`, or at the last epoch before it that measured it (validation every n)."""
    for row in reversed(history[:epoch]):
        if monitor in row:
            return float(row[monitor])
    return float("nan")


class Rungs:
    """One chunk's pruning: its members' brackets, and which were pruned at which rung (`pruned`)."""

    def __init__(self, names: list[str], bracket_of: dict[str, Bracket], monitor: str, maximize: bool, eta: int):
        self.names, self.monitor, self.maximize, self.eta = names, monitor, maximize, eta
        self.bracket_of = {name: bracket_of[config_of(name)] for name in names}
        self.members_of: dict[str, list[str]] = {}  # configuration -> its members (a --cv configuration's folds)
        for name in names:
            self.members_of.setdefault(config_of(name), []).append(name)
        self.failed: set[str] = set()  # members whose training loss was not finite
        self.pruned: dict[str, int] = {}  # member -> the rung epoch it was pruned at

    def epochs(self) -> set[int]:
        """The rungs' epochs (a call ends at each)."""
        return {epoch for bracket in set(self.bracket_of.values()) for epoch in bracket.rungs}

    def restore(self, es_state) -> None:
        """The prunes a restored carry holds (its members' early-stopping states, run axis first)."""
        reasons, epochs = np.asarray(es_state.stop_reason), np.asarray(es_state.stop_epoch)
        for r, name in enumerate(self.names):
            if reasons[r] == early_stopping_lib.PRUNED:
                self.pruned[name] = int(epochs[r])

    def decide(self, histories: dict[str, list[dict]], halted: dict[str, bool], failed: set[str], first: int,
               last: int) -> None:  # fmt: skip
        """The rungs among epochs first..last (a call's): at each, the configurations of a bracket still training
        there are ranked by the monitor (the mean over all their folds; a fold whose loss was not finite makes
        it NaN, ranked last), the best 1/eta (at least one) kept. `failed`: the members with a non-finite loss."""
        self.failed = set(failed)
        for epoch in range(first, last + 1):
            for bracket in {b for b in self.bracket_of.values() if epoch in b.rungs}:
                self.prune_at(epoch, self.training(bracket, epoch, histories, halted), histories)

    def training(self, bracket: Bracket, epoch: int, histories, halted) -> dict[str, list[str]]:
        """Each configuration of `bracket` with a member still training after `epoch`, with those members."""
        training: dict[str, list[str]] = {}
        for name in self.names:
            still = len(histories[name]) >= epoch and not halted[name] and name not in self.pruned
            if self.bracket_of[name] == bracket and still:
                training.setdefault(config_of(name), []).append(name)
        return training

    def score(self, configuration: str, histories, epoch: int) -> float:
        """A configuration's monitor at `epoch`: the mean over all its members (a --cv configuration's folds,
        the halted ones at their last value; NaN if one's loss was not finite)."""
        members = self.members_of[configuration]
        if any(name in self.failed for name in members):
            return float("nan")
        return float(np.mean([_value_at(histories[name], epoch, self.monitor) for name in members]))

    def prune_at(self, epoch: int, training: dict[str, list[str]], histories) -> None:
        """Successive halving's rule: the best 1/eta of `training`'s configurations go on (NaN ranks last)."""
        if len(training) < 2:
            return
        sign = -1.0 if self.maximize else 1.0
        score = {config: self.score(config, histories, epoch) for config in training}
        nan_last = lambda c: (math.isnan(score[c]), 0.0 if math.isnan(score[c]) else sign * score[c])
        for config in sorted(training, key=nan_last)[max(1, len(training) // self.eta) :]:
            self.pruned.update({name: epoch for name in training[config]})

    def mark(self, carry, lane_names: list[str | None]):
        """`carry` (a program's lanes, named by `lane_names`; None: padding) with each pruned lane's stop written
        into its early-stopping state and halted flag, unless it had stopped before."""
        mask = np.array([name in self.pruned for name in lane_names])
        if not mask.any():
            return carry
        epochs = np.array([self.pruned.get(name, 0) for name in lane_names], np.int32)
        es = devices.fetch(carry.es_state)
        fresh = mask & ~np.asarray(es.should_stop)
        if not fresh.any():
            return carry
        marked = es._replace(
            should_stop=np.asarray(es.should_stop) | fresh,
            stop_reason=np.where(fresh, early_stopping_lib.PRUNED, es.stop_reason).astype(es.stop_reason.dtype),
            stop_epoch=np.where(fresh, epochs, es.stop_epoch).astype(es.stop_epoch.dtype),
        )
        halted = np.asarray(devices.fetch(carry.halted)) | fresh
        like = lambda new, old: jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new
        return carry._replace(es_state=jax.tree.map(like, marked, carry.es_state), halted=like(halted, carry.halted))

    def fields(self, name: str) -> dict:
        """results.csv's fields of a member: its bracket, and how many of its rungs it passed (was kept at)."""
        end = self.pruned.get(name)
        passed = sum(1 for epoch in self.bracket_of[name].rungs if end is None or epoch < end)
        return {"bracket": self.bracket_of[name].index, "rung": passed}
