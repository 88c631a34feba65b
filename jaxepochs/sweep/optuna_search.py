"""Optuna as a sweep's sampler and pruner: trials asked R at a time, each batch one vmapped program.

    jaxepochs sweep --config experiments/mnist1d_mlp.py --workdir runs/search --search optuna --trials 64 \\
        --batch 16 --sweep.optimizer.learning_rate=loguniform:1e-4:1e-1 --sweep.seed=0,1,2 [--sampler tpe] \\
        [--pruner sha|hyperband|median|none] [--eta 3] [--min_epochs 5]

Optuna's ask-and-tell interface: R trials asked at once are a sweep of R runs (WORKDIR/batches/bK, one program,
pruned runs compacted out of it); at each report epoch (min_epochs * eta**k, Optuna's successive-halving rungs)
every trial still training reports early stopping's monitor, and the trials Optuna's pruner prunes halt there
as a pruned sweep's runs do (`stop_reason: "pruned"`); at the batch's end each trial is told its best value, or
that it was pruned. The study lives in WORKDIR/optuna.db (SQLite): `optuna-dashboard sqlite:///WORKDIR/optuna.db`
shows it, and search.csv lists every trial.

A killed search resumes where it stopped, asking and pruning what the uninterrupted search did: asked.json
records each batch's trials before it trains (the rerun resumes that batch's sweep from its checkpoint),
WORKDIR/decisions/bK/ each batch's prunes at each rung, taken on a copy of the study before the study is written
(a rerun that recomputes an epoch prunes the same trials, whatever the storage holds by then; they live outside
the batch's sweep, which a rerun may start afresh), and the sampler is seeded per batch (seed + batch index).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

from jaxepochs.host import config as config_lib
from jaxepochs.host import report
from jaxepochs.sweep import grid as sweep_lib
from jaxepochs.sweep import prune as prune_lib

PRUNERS = ("sha", "hyperband", "median", "none")


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise sweep_lib.SweepError(
            "--search optuna needs Optuna: pip install 'jaxepochs[optuna]' (or pip install optuna)."
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def space(base, specs: dict[str, str]) -> dict[str, Any]:
    """Optuna's distributions of the --sweep.* specs: ranges (loguniform:A:B, uniform:A:B, randint:A:B) as
    numbers, lists as categorical choices (override text); every value checked against the config now."""
    optuna = import_optuna()
    out = {}
    for key, text in specs.items():
        kind, _, bounds = text.partition(":")
        if kind in sweep_lib.DISTRIBUTIONS:
            low, high = (sweep_lib.expand(base, {key: text}, random=2, random_seed=s)[0][key] for s in (0, 1))
            low_text, _, high_text = bounds.partition(":")
            if kind == "randint":
                out[key] = optuna.distributions.IntDistribution(int(low_text), int(high_text))
            else:
                out[key] = optuna.distributions.FloatDistribution(
                    float(low_text), float(high_text), log=kind == "loguniform"
                )
        else:
            choices = sweep_lib.split_values(text)
            sweep_lib.expand(base, {key: text})  # every choice parses into its key's type
            out[key] = optuna.distributions.CategoricalDistribution(choices)
    return out


def make_sampler(name: str, seed: int):
    optuna = import_optuna()
    short = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "gp": "GPSampler",
             "qmc": "QMCSampler"}  # fmt: skip
    cls = getattr(optuna.samplers, short.get(name, name), None)
    if cls is None or not isinstance(cls, type):
        known = ", ".join([*short, *(n for n in optuna.samplers.__all__ if n.endswith("Sampler"))])
        raise sweep_lib.SweepError(f"--sampler {name}: Optuna has no such sampler; choose one of {known}.")
    try:
        return cls(seed=seed)
    except TypeError:  # a sampler without a seed (GridSampler needs its grid: not for --search)
        raise sweep_lib.SweepError(
            f"--sampler {name} cannot be seeded; choose tpe, random, cmaes, gp or qmc."
        ) from None


def make_pruner(name: str, eta: int, min_epochs: int, epochs: int):
    optuna = import_optuna()
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=eta)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=epochs, reduction_factor=eta)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=min_epochs - 1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise sweep_lib.SweepError(f"--pruner {name}: choose one of {', '.join(PRUNERS)}.")


@dataclasses.dataclass(frozen=True, eq=False)
class OptunaPruner:
    """A batch's pruner for sweep(): its runs are `trials` (asked.json's entries, in the batch's order)."""

    study: Any
    trials: tuple[dict, ...]
    name: str
    eta: int
    min_epochs: int
    decisions: pathlib.Path  # the rungs' decisions' directory, outside the sweep (a fresh start keeps them)

    def check(self, epochs: int) -> None:
        prune_lib.PruneSpec("sha", self.eta, self.min_epochs).check(epochs)

    def as_dict(self) -> dict:
        numbers = [trial["number"] for trial in self.trials]
        return {
            "kind": "optuna",
            "pruner": self.name,
            "eta": self.eta,
            "min_epochs": self.min_epochs,
            "trials": numbers,
        }

    def rungs(self, names, configs, epochs: int, monitor: str, maximize: bool, workdir) -> prune_lib.Rungs:
        report_epochs = prune_lib.Bracket(0, prune_lib.sha_rungs(self.min_epochs, self.eta, epochs))
        trials = {config: self.trials[i] for i, config in enumerate(configs)}
        return OptunaRungs(names, {c: report_epochs for c in configs}, monitor, maximize, self.eta, self, trials,
                           self.decisions / f"{pathlib.Path(workdir).name}.json")  # fmt: skip


class OptunaRungs(prune_lib.Rungs):
    """Rungs whose decisions are Optuna's pruner's, recorded in `path` as they are made."""

    def __init__(self, names, bracket_of, monitor, maximize, eta, pruner: OptunaPruner, trials: dict, path):
        super().__init__(names, bracket_of, monitor, maximize, eta)
        self.optuna, self.study, self.trials, self.path = import_optuna(), pruner.study, trials, path
        self.decisions = json.loads(path.read_text()) if path.exists() else {}

    def prune_at(self, epoch: int, training: dict[str, list[str]], histories) -> None:
        """Each configuration still training reports its monitor at `epoch`, in the batch's order, and Optuna's
        pruner decides. The decisions are taken on a copy of the study and recorded before the study itself is
        written: a search killed while it reports finds them on its rerun (and a storage holding some of the
        epoch's reports already cannot change them); then the reports and the pruner's bookkeeping (its rungs'
        attributes) go to the study, skipping what the killed search wrote."""
        values = {config: self.score(config, histories, epoch) for config in training}
        recorded = self.decisions.get(str(epoch))
        if recorded is None:
            recorded = self._decide(epoch, values, self._copy())
            self.decisions[str(epoch)] = recorded
            self.path.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(self.path, json.dumps(self.decisions) + "\n")
        self._decide(epoch, values, self.study)
        for config in recorded:
            self.pruned.update({name: epoch for name in training.get(config, [])})

    def _copy(self):
        """The study as it is, in memory (a scratch copy to decide on)."""
        optuna = self.optuna
        memory = optuna.storages.InMemoryStorage()
        optuna.copy_study(from_study_name=self.study.study_name, from_storage=self.study._storage, to_storage=memory)
        return optuna.load_study(study_name=self.study.study_name, storage=memory, pruner=self.study.pruner)

    def _decide(self, epoch: int, values: dict[str, float], study) -> list[str]:
        trials = study.get_trials(deepcopy=False)
        pruned = []
        for config, value in values.items():
            frozen = trials[self.trials[config]["number"]]
            trial = self.optuna.trial.Trial(study, frozen._trial_id)
            if math.isfinite(value) and epoch not in frozen.intermediate_values:
                trial.report(value, epoch)
            if trial.should_prune():
                pruned.append(config)
        return pruned


def batch_trials(study, distributions: dict, count: int, asked: dict, key: str, path: pathlib.Path) -> list[dict]:
    """Batch `key`'s trials: asked.json's, or `count` asked now and recorded before anything trains (a trial a
    killed search asked but had not recorded is failed: it never trained)."""
    optuna = import_optuna()
    if key in asked:
        return asked[key]
    known = {entry["number"] for entries in asked.values() for entry in entries}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.number not in known:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    entries = []
    for _ in range(count):
        trial = study.ask(distributions)
        values = {k: repr(v) if isinstance(v, float) else str(v) for k, v in trial.params.items()}
        entries.append({"number": trial.number, "id": trial._trial_id, "values": values})
    asked[key] = entries
    report.write_text(path, json.dumps(asked, indent=1) + "\n")
    return entries


def tell(study, entries: list[dict], result, prefix: str) -> None:
    """Each of a batch's trials told its best monitored value, or that it was pruned (or failed: no value)."""
    optuna = import_optuna()
    by_run = {row["run"]: row for row in result.results}
    for i, entry in enumerate(entries):
        name = f"r{i:0{len(str(len(entries) - 1))}d}"
        row = by_run[name]
        trial = optuna.trial.Trial(study, entry["id"])
        if study.get_trials(deepcopy=False)[entry["number"]].state.is_finished():
            continue  # told by the run that was killed after it
        attrs = {k: v for k, v in row.items() if k in ("epochs_run", "stop_reason", "best_epoch") or "test" in k}
        for key, value in {"run": f"{prefix}/{name}", **attrs}.items():
            trial.set_user_attr(key, value)
        value = next((v for k, v in row.items() if k.startswith("best_") and k != "best_epoch"), float("nan"))
        if row["stop_reason"] == "pruned":
            study.tell(entry["number"], state=optuna.trial.TrialState.PRUNED)
        elif math.isfinite(value):
            study.tell(entry["number"], value)
        else:
            study.tell(entry["number"], state=optuna.trial.TrialState.FAIL)


def direction(monitor: str) -> str:
    """The study's direction: early stopping's monitor's (a loss is minimised)."""
    return "minimize" if "loss" in monitor else "maximize"


def check_settings(epochs: int, monitor: str, mode: str, min_epochs: int, eta: int) -> None:
    """The search's rungs against the run's epochs, and early stopping's mode against the study's direction."""
    prune_lib.PruneSpec("sha", eta, min_epochs).check(epochs)
    if mode not in ("auto", "min" if direction(monitor) == "minimize" else "max"):
        raise config_lib.ConfigError(
            f"early_stopping.mode {mode} disagrees with the direction the search infers from early_stopping.monitor "
            f"{monitor}; leave the mode at auto."
        )
