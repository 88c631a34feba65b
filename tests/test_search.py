"""`jaxepochs sweep --search optuna` (studies/search.py, sweep/optuna_search.py): trials asked a batch at a time and
trained as one pruned program, Optuna's pruner deciding at the report epochs, the study told each result, and a
search killed mid-batch resuming to the uninterrupted one's trials and values."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import REPO, tiny_config

from jaxepochs import cli
from jaxepochs.host import batch as batch_lib
from jaxepochs.studies import search as search_lib

SPACE = {"optimizer.learning_rate": "loguniform:1e-4:1e-1", "seed": "0,1"}
SETTINGS = {"train.epochs": "6", "checkpoint.every_epochs": "1"}


def _search(workdir, **kwargs):
    return search_lib.search(tiny_config(SETTINGS), SPACE, workdir, trials=8, batch=4, min_epochs=2, quiet=True,
                             **kwargs)  # fmt: skip


def _table(workdir) -> list[dict]:
    with (workdir / "search.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("search") / "s"
    return workdir, _search(workdir)


def test_trials_train_a_batch_at_a_time_and_optuna_prunes_and_is_told(searched):
    workdir, rows = searched
    study = optuna.load_study(study_name="jaxepochs", storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 8 and {t.state.name for t in trials} == {"COMPLETE", "PRUNED"}
    asked = json.loads((workdir / "asked.json").read_text())
    assert [len(asked[b]) for b in ("0", "1")] == [4, 4]  # two programs of 4 runs
    rows_of = {
        f"batches/b{b}": [json.loads(line) for line in (workdir / "batches" / f"b{b}" / "sweep.jsonl").open()]
        for b in (0, 1)
    }
    for trial in trials:
        assert 1e-4 <= trial.params["optimizer.learning_rate"] <= 1e-1 and trial.params["seed"] in ("0", "1")
        batch, run = trial.user_attrs["run"].rsplit("/", 1)  # its batch's sweep holds its rows
        history = [row for row in rows_of[batch] if row["run"] == run]
        assert trial.user_attrs["epochs_run"] == len(history) == (2 if trial.state.name == "PRUNED" else 6)
        assert trial.intermediate_values == {2: history[1]["val_loss"]}  # its monitor, as logged at the rung
        if trial.state.name == "COMPLETE":  # told its best value
            assert trial.value == pytest.approx(min(row["val_loss"] for row in history), rel=1e-6)  # (float32)
    decisions = json.loads((workdir / "decisions" / "b0" / "group0_chunk0.json").read_text())
    pruned_b0 = {t.user_attrs["run"].rsplit("/", 1)[1] for t in trials if t.state.name == "PRUNED" and "b0" in
                 t.user_attrs["run"]}  # fmt: skip
    assert set(decisions["2"]) == pruned_b0
    assert rows[0]["trial"] == study.best_trial.number and rows[0]["state"] == "COMPLETE"
    assert [int(r["trial"]) for r in _table(workdir)] == [r["trial"] for r in rows]


def test_a_killed_search_resumes_to_the_uninterrupted_trials(searched, tmp_path, monkeypatch):
    """Killed in the second batch's rung epoch (nothing of that call saved), the search reruns: the first batch
    is not trained again, the second resumes from its checkpoint, and every trial's values and state are the
    uninterrupted search's."""
    _, rows = searched
    real, calls = batch_lib.RunBatch.take_rows, {"batches": 0}

    def dies_in_batch_1(self, rows, first_epoch, fields):
        calls["batches"] += first_epoch == 1
        if calls["batches"] == 2 and first_epoch + int(rows.ran) - 1 >= 2:
            raise KeyboardInterrupt
        return real(self, rows, first_epoch, fields)

    monkeypatch.setattr(batch_lib.RunBatch, "take_rows", dies_in_batch_1)
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "s")
    monkeypatch.setattr(batch_lib.RunBatch, "take_rows", real)
    resumed = _search(tmp_path / "s")
    assert resumed == rows


def test_search_options_are_checked_before_anything_runs(tmp_path, capsys):
    base = ["sweep", "--config", "experiments/mnist1d_mlp.py", "--workdir", str(tmp_path / "s")]
    rates = "--sweep.optimizer.learning_rate=loguniform:1e-4:1e-1"
    for extra, said in (
        (["--search", "optuna"], "needs --trials N"),
        (["--search", "optuna", "--trials", "4", "--batch", "2", "--prune", "sha"], "leave out --prune"),
        (["--trials", "4"], "belong to --search optuna"),
        (["--search", "optuna", "--trials", "4", "--batch", "2", "--sampler", "nope"], "Optuna has no such sampler"),
        (["--search", "optuna", "--trials", "4", "--batch", "2", "--pruner", "nope"], "--pruner nope"),
    ):
        assert cli.main([*base, rates, *extra]) != 0
        assert said in capsys.readouterr().err, extra
    assert not (tmp_path / "s").exists()


MODULE = """from jaxepochs import apply_overrides, base_config


def get_config():  # conftest.tiny_config with the search's settings
    return apply_overrides(base_config(), {overrides!r})
"""


def test_a_search_killed_with_sigkill_resumes_to_the_uninterrupted_trials(searched, tmp_path):
    """`jaxepochs sweep --search optuna` SIGKILLed once the second batch has a checkpoint, then run again: its
    trials (values, states, runs) are the uninterrupted search's (the module fixture's, computed in this process
    with the same XLA flags and devices)."""
    workdir, _ = searched
    overrides = {"model.hidden_sizes": "(16,)", "train.batch_size": "64", "mesh.data": "1", "logging.curves": "False"}
    module = tmp_path / "tiny.py"
    module.write_text(MODULE.format(overrides={**overrides, **SETTINGS}))
    command = [sys.executable, "-m", "jaxepochs.cli", "sweep", "--config", str(module), "--workdir",
               str(tmp_path / "s"), "--search", "optuna", "--trials", "8", "--batch", "4", "--min_epochs", "2",
               "--quiet", *(f"--sweep.{k}={v}" for k, v in SPACE.items())]  # fmt: skip
    checkpoints = tmp_path / "s" / "batches" / "b1" / "chunks" / "group0_chunk0" / "checkpoints"
    with (tmp_path / "err").open("w") as err:
        child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert child.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-3000:]
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "s" / "search.csv").exists()  # killed mid-search
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _table(tmp_path / "s") == _table(workdir)
