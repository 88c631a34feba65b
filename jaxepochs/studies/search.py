"""`jaxepochs sweep --search optuna`: an Optuna study whose trials train R at a time as pruned sweeps.

    search(config, specs, workdir, trials=64, batch=16)   # -> search.csv's rows, best first

Writes into the workdir: search.json (the specification, for resuming), optuna.db (the study), asked.json
(each batch's trials), batches/bK/ (each batch's sweep), decisions/bK/ (its rungs' prunes) and search.csv (one row per
trial). See sweep/optuna_search.py for the pieces, and what makes a killed search resume exactly. (A study: it
drives sweeps, as the LR finder does.)
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
import shutil

import ml_collections

from jaxepochs.data import lock
from jaxepochs.host import config as config_lib
from jaxepochs.host import report
from jaxepochs.host import workdir as workdir_lib
from jaxepochs.sweep import grid as sweep_lib
from jaxepochs.sweep import optuna_search as optuna_lib
from jaxepochs.sweep import run as sweep_run

SEARCH_FILES = ("search.json", "optuna.db", "asked.json", "search.csv")


def search(
    config: ml_collections.ConfigDict,
    specs: dict[str, str],
    workdir: str | pathlib.Path,
    *,
    trials: int,
    batch: int,
    sampler: str = "tpe",
    pruner: str = "sha",
    eta: int = 3,
    min_epochs: int = 1,
    seed: int = 0,
    quiet: bool = False,
    restart: bool = False,
    compact: bool = True,
) -> list[dict]:
    """`trials` trials of `specs`' space (--sweep.* specs: lists and ranges) asked `batch` at a time from Optuna's
    `sampler`, pruned by its `pruner` at rungs min_epochs * eta**k; resumes a search in `workdir`. Returns
    search.csv's rows, the best first."""
    workdir = workdir_lib.as_workdir(workdir)
    lock.check_free(workdir, "search workdir")
    workdir_lib.check_kind(workdir, "search")
    if trials < 1 or batch < 1:
        raise sweep_lib.SweepError(f"--trials {trials} --batch {batch}: give 1 or more of each.")
    config = config_lib.validate(config)
    stopping = config.early_stopping
    optuna_lib.check_settings(config.train.epochs, stopping.monitor, stopping.mode, min_epochs, eta)
    distributions = optuna_lib.space(config, specs)
    optuna_lib.make_sampler(sampler, seed)  # unknown names refused now, before anything is written
    optuna_lib.make_pruner(pruner, eta, min_epochs, config.train.epochs)
    spec = {"config": json.loads(config.to_json_best_effort()), "specs": specs, "trials": trials, "batch": batch,
            "sampler": sampler, "pruner": pruner, "eta": eta, "min_epochs": min_epochs, "seed": seed}  # fmt: skip
    optuna = optuna_lib.import_optuna()
    with lock.hold(workdir, "search workdir"):
        _prepare(workdir, spec, restart)
        storage = f"sqlite:///{workdir / 'optuna.db'}"
        asked_path = workdir / "asked.json"
        asked = json.loads(asked_path.read_text()) if asked_path.exists() else {}
        for b in range(math.ceil(trials / batch)):
            study = optuna.create_study(
                storage=storage, study_name="jaxepochs", direction=optuna_lib.direction(stopping.monitor),
                sampler=optuna_lib.make_sampler(sampler, seed + b), load_if_exists=True,
                pruner=optuna_lib.make_pruner(pruner, eta, min_epochs, config.train.epochs),
            )  # fmt: skip
            entries = optuna_lib.batch_trials(study, distributions, min(batch, trials - b * batch), asked, str(b),
                                              asked_path)  # fmt: skip
            finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
            if all(entry["number"] in finished for entry in entries):
                continue  # trained and told before the search was stopped
            grid = [entry["values"] for entry in entries]
            decisions = workdir / "decisions" / f"b{b}"
            prune = optuna_lib.OptunaPruner(study, tuple(entries), pruner, eta, min_epochs, decisions)
            result = sweep_run.sweep(config, grid, workdir / "batches" / f"b{b}", quiet=True, prune=prune,
                                     compact=compact)  # fmt: skip
            optuna_lib.tell(study, entries, result, f"batches/b{b}")
        rows = _write_table(study, workdir, list(distributions))
    if not quiet:
        print(_summary(rows, study))
    return rows


def _prepare(workdir: pathlib.Path, spec: dict, restart: bool) -> None:
    path = workdir / "search.json"
    if restart:
        for name in SEARCH_FILES:
            (workdir / name).unlink(missing_ok=True)
        shutil.rmtree(workdir / "batches", ignore_errors=True)
        shutil.rmtree(workdir / "decisions", ignore_errors=True)
    if path.exists() and json.loads(path.read_text()) != spec:
        raise sweep_lib.SweepError(
            f"{workdir} holds another search (its search.json differs). Use a new --workdir, or --restart to "
            "discard it."
        )
    workdir_lib.claim(workdir, "search")
    report.write_text(path, json.dumps(spec, indent=2) + "\n")


def _write_table(study, workdir: pathlib.Path, keys: list[str]) -> list[dict]:
    """search.csv: every trial, the best first (completed by value, then the pruned by the epochs they ran)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = {"trial": trial.number, "state": trial.state.name, "value": trial.value, **trial.params}
        rows.append({**row, **trial.user_attrs})
    minimize = study.direction.name == "MINIMIZE"
    value = lambda r: r["value"] if r["value"] is not None else math.inf * (1 if minimize else -1)
    rows.sort(key=lambda r: (r["state"] != "COMPLETE", -r.get("epochs_run", 0), value(r) if minimize else -value(r)))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(
        text, list(dict.fromkeys(["trial", "state", "value", *keys, *(k for r in rows for k in r)]))
    )
    writer.writeheader()
    writer.writerows(rows)
    report.write_text(workdir / "search.csv", text.getvalue())
    return rows


def _summary(rows: list[dict], study) -> str:
    states = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    if not any(row["state"] == "COMPLETE" for row in rows):
        return f"{len(rows)} trials ({', '.join(f'{n} {s.lower()}' for s, n in states.items())}); none completed."
    best = study.best_trial
    return (
        f"{len(rows)} trials ({', '.join(f'{n} {s.lower()}' for s, n in states.items())}). Best: trial {best.number} "
        f"{json.dumps(best.params)} value {best.value:.4f} ({best.user_attrs.get('run', '')})"
    )
