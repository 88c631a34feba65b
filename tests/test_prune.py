"""Pruned sweeps (sweep/prune.py) and compaction (sweep/lanes.py): successive halving keeps the best 1/eta at each
rung, Hyperband's brackets, halted runs leaving the program without changing a stop or a number beyond round-off,
and a pruned sweep killed mid-way resuming to the uninterrupted one's rows bit for bit."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, TIMED, tiny_config

import jaxepochs
from jaxepochs import cli
from jaxepochs.host import batch as batch_lib
from jaxepochs.studies import compare as compare_lib
from jaxepochs.sweep import grid as grid_lib
from jaxepochs.sweep import lanes as lanes_lib
from jaxepochs.sweep import prune as prune_lib

RATES = "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1.0"  # 9 configurations: rungs at 1 and 3 keep 3, then 1
SETTINGS = {"train.epochs": "9", "checkpoint.every_epochs": "1"}


def _untimed(rows):
    return [{k: v for k, v in row.items() if k not in (*TIMED, "train_seconds")} for row in rows]


def _close(a_rows, b_rows):
    assert len(a_rows) == len(b_rows)
    for a, b in zip(_untimed(a_rows), _untimed(b_rows), strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-6), (a["epoch"], key)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The 9 rates unpruned and with successive halving (eta 3, rungs at epochs 1 and 3)."""
    base = tiny_config(SETTINGS)
    grid = grid_lib.expand(base, {"optimizer.learning_rate": RATES})
    directory = tmp_path_factory.mktemp("prune")
    full = jaxepochs.sweep(base, grid, directory / "full", quiet=True)
    sha = jaxepochs.sweep(base, grid, directory / "sha", quiet=True, prune=prune_lib.PruneSpec("sha", 3, 1))
    return base, grid, full, sha, directory


def _ranked(histories: dict, names, epoch: int) -> list[str]:
    return sorted(names, key=lambda name: histories[name][epoch - 1]["val_loss"])


def test_successive_halving_keeps_the_best_third_at_each_rung(sweeps):
    base, grid, full, sha, directory = sweeps
    by_run = {row["run"]: row for row in sha.results}
    names = list(by_run)
    kept_1 = _ranked(sha.histories, names, 1)[:3]  # rung 1: 9 -> 3 by val_loss at epoch 1
    kept_3 = _ranked(sha.histories, kept_1, 3)[:1]  # rung 3: 3 -> 1
    assert _ranked(full.histories, names, 1)[:3] == kept_1  # epoch 1 is the same in both
    for name, row in by_run.items():
        epochs = 9 if name in kept_3 else 3 if name in kept_1 else 1
        assert row["epochs_run"] == len(sha.histories[name]) == epochs
        assert row["stop_reason"] == ("completed" if epochs == 9 else "pruned")
        assert row["stopped_epoch"] == (0 if epochs == 9 else epochs) and row["rung"] == {1: 0, 3: 1, 9: 2}[epochs]
        _close(sha.histories[name], full.histories[name][:epochs])  # the same numbers, cut at the rung
    assert sha.results[0]["run"] == kept_3[0]  # the survivor ranks first
    assert sum(len(h) for h in sha.histories.values()) == 9 + 3 * 2 + 6  # run-epochs: 21 of the grid's 81
    with (directory / "sha" / "results.csv").open() as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert {(r["stop_reason"], r["rung"], r["bracket"]) for r in table.values()} == {
        ("pruned", "0", "0"),
        ("pruned", "1", "0"),
        ("completed", "2", "0"),
    }
    last = {}
    for line in (directory / "sha" / "sweep.jsonl").read_text().splitlines():
        row = json.loads(line)
        last[row["run"]] = row
    assert {name: row.get("stop_reason") for name, row in last.items()} == {
        name: ("pruned" if name not in kept_3 else None) for name in names
    }
    compared = {row["name"]: row for row in compare_lib.compare([directory / "sha"], directory / "compare")}
    assert sorted((row["stop_reason"], row["epochs_run"]) for row in compared.values()) == sorted(
        (by_run[name]["stop_reason"], by_run[name]["epochs_run"]) for name in names
    )
    assert (directory / "compare.png").exists() and (directory / "sha" / "sweep.png").exists()


def test_a_killed_pruned_sweep_resumes_to_the_uninterrupted_rows(sweeps, tmp_path, monkeypatch):
    """Killed (the host dies inside a call's bookkeeping, after rungs 1 and 3 pruned and compacted the chunk)
    and rerun: it resumes from its last checkpoint (epoch 5) and ends with the uninterrupted sweep's rows, bit for
    bit (each epoch trains in the batch size it trained in before)."""
    base, grid, _, sha, _ = sweeps
    real = batch_lib.RunBatch.take_rows

    def dies_at_epoch_6(self, rows, first_epoch, fields):
        if first_epoch + int(rows.ran) - 1 >= 6:
            raise KeyboardInterrupt  # nothing of the call is saved, as after a SIGKILL
        return real(self, rows, first_epoch, fields)

    monkeypatch.setattr(batch_lib.RunBatch, "take_rows", dies_at_epoch_6)
    prune = prune_lib.PruneSpec("sha", 3, 1)
    with pytest.raises(KeyboardInterrupt):
        jaxepochs.sweep(base, grid, tmp_path / "w", quiet=True, prune=prune)
    monkeypatch.setattr(batch_lib.RunBatch, "take_rows", real)
    resumed = jaxepochs.sweep(base, grid, tmp_path / "w", quiet=True, prune=prune)
    assert {n: _untimed(h) for n, h in resumed.histories.items()} == {n: _untimed(h) for n, h in sha.histories.items()}
    assert [r["run"] for r in resumed.results] == [r["run"] for r in sha.results]


def test_hyperband_spreads_the_grid_over_brackets_that_halve_later_and_later(sweeps, tmp_path):
    spec = prune_lib.PruneSpec("hyperband", 3, 2)
    brackets = prune_lib.brackets(spec, [f"r{i}" for i in range(81)], 150)
    assert brackets == prune_lib.brackets(spec, [f"r{i}" for i in range(81)], 150)  # a fixed deal
    sizes = {s: sum(b.index == s for b in brackets.values()) for s in range(4)}
    rungs = {b.index: b.rungs for b in brackets.values()}
    # Li et al.'s n_s = 27, 12, 6, 4 (s = 3..0) scaled to the 81 configurations; rungs from 150 / 3**s.
    assert sizes == {3: 45, 2: 20, 1: 10, 0: 6}
    assert rungs == {3: (6, 17, 50), 2: (17, 50), 1: (50,), 0: ()}  # 150 / 3**(s - i), rounded
    assert prune_lib.brackets(prune_lib.PruneSpec("sha", 3, 2), ["a"], 150)["a"].rungs == (2, 6, 18, 54)

    base, grid, full, _, _ = sweeps
    result = jaxepochs.sweep(base, grid, tmp_path / "hb", quiet=True, prune=prune_lib.PruneSpec("hyperband", 3, 1))
    by_bracket: dict[int, list[dict]] = {}
    for row in result.results:
        by_bracket.setdefault(row["bracket"], []).append(row)
    assert {s: len(rows) for s, rows in by_bracket.items()} == {2: 5, 1: 3, 0: 1}  # 9, 5, 3 scaled to 9
    for s, rows in by_bracket.items():
        survivors = [row for row in rows if row["stop_reason"] != "pruned"]
        assert len(survivors) == 1 and survivors[0]["epochs_run"] == 9  # bracket 0 is never pruned
        assert {row["stopped_epoch"] for row in rows if row not in survivors} <= {2: {1, 3}, 1: {3}, 0: set()}[s]
    rates = {f"r{i}": float(rate) for i, rate in enumerate(RATES.split(","))}
    for name, history in result.histories.items():
        if rates[name] <= 0.1:  # (higher rates are chaotic: round-off grows past any tolerance)
            _close(history, full.histories[name][: len(history)])


def test_compaction_changes_no_stop_and_no_number_beyond_round_off(tmp_path, monkeypatch):
    """Early stopping halts most of 8 runs by epoch 4; compaction points every 2 epochs move the others into
    smaller programs (compiled once per size); every stop and row is the uncompacted sweep's."""
    monkeypatch.setattr(lanes_lib, "EVERY", 2)
    sizes = []
    real = batch_lib.RunBatch.compile

    def recorded(self, *args):
        sizes.append(len(self.members))
        return real(self, *args)

    monkeypatch.setattr(batch_lib.RunBatch, "compile", recorded)
    stopping = {"early_stopping.enabled": "True", "early_stopping.patience": "1", "train.epochs": "8"}
    base = tiny_config({**stopping, "early_stopping.min_delta": "0.05"})
    grid = grid_lib.expand(base, {"optimizer.learning_rate": "1e-3,3e-3,1e-2,3e-2", "seed": "0,1"})
    compacted = jaxepochs.sweep(base, grid, tmp_path / "c", quiet=True)
    assert sizes[0] == 8 and min(sizes) < 8  # smaller programs trained the runs still training
    uncompacted = jaxepochs.sweep(base, grid, tmp_path / "n", quiet=True, compact=False)
    lengths = {name: len(h) for name, h in uncompacted.histories.items()}
    assert min(lengths.values()) <= 4 < max(lengths.values())
    for name, history in compacted.histories.items():
        _close(history, uncompacted.histories[name])
    for name, summary in compacted.summaries.items():
        numbers = {k: v for k, v in summary.items() if isinstance(v, float)}
        assert {k: v for k, v in summary.items() if k not in numbers} == {
            k: v for k, v in uncompacted.summaries[name].items() if k not in numbers
        }
        assert numbers == pytest.approx({k: uncompacted.summaries[name][k] for k in numbers}, rel=2e-4)


def test_pruning_settings_are_checked_before_anything_runs(tmp_path, capsys):
    base = ["sweep", "--config", "experiments/mnist1d_mlp.py", "--workdir", str(tmp_path / "s")]
    rates = "--sweep.optimizer.learning_rate=1e-3,1e-2"
    assert cli.main([*base, rates, "--eta", "2"]) != 0
    assert "add --prune sha" in capsys.readouterr().err
    assert cli.main([*base, rates, "--prune", "sha", "--min_epochs", "9", "--config.train.epochs=9"]) != 0
    assert "--min_epochs 9: the first rung must come before the last epoch (9)" in capsys.readouterr().err
    assert cli.main([*base, rates, "--prune", "sha", "--eta", "1"]) != 0
    assert "--eta 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    with pytest.raises(prune_lib.PruneError, match="choose one of sha, hyperband"):
        prune_lib.PruneSpec("asha").check(10)
    assert np.isnan(prune_lib._value_at([{"epoch": 1}], 1, "val_loss"))


MODULE = """from jaxepochs import apply_overrides, base_config


def get_config():  # conftest.tiny_config with this module's settings
    return apply_overrides(base_config(), {overrides!r})
"""


def test_a_pruned_sweep_killed_with_sigkill_resumes_to_the_uninterrupted_rows(sweeps, tmp_path):
    """`jaxepochs sweep --prune sha` SIGKILLed once it has a checkpoint past the second rung (pruned and
    compacted), then run again: its rows are the uninterrupted sweep's (the module fixture's, computed in this
    process with the same XLA flags and devices), bit for bit."""
    directory = sweeps[-1]
    tiny = {"model.hidden_sizes": "(16,)", "train.batch_size": "64", "mesh.data": "1", "logging.curves": "False"}
    module = tmp_path / "tiny.py"
    module.write_text(MODULE.format(overrides={**tiny, **SETTINGS}))
    workdir = tmp_path / "s"
    command = [sys.executable, "-m", "jaxepochs.cli", "sweep", "--config", str(module), "--workdir", str(workdir),
               "--prune", "sha", "--quiet", f"--sweep.optimizer.learning_rate={RATES}"]  # fmt: skip
    checkpoints = workdir / "chunks" / "group0_chunk0" / "checkpoints"
    with (tmp_path / "err").open("w") as err:
        child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 4 for p in checkpoints.iterdir())):
        assert child.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-3000:]
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (workdir / "results.csv").exists()  # killed mid-sweep
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = lambda path: _untimed(json.loads(line) for line in (path / "sweep.jsonl").read_text().splitlines())
    assert rows(workdir) == rows(directory / "sha") and len(rows(workdir)) == 21


def test_a_cv_configuration_is_ranked_by_all_its_folds_and_a_failed_fold_ranks_it_last():
    """Rungs alone (no training): r0's fold 0 halted early (its last value counts), r1's folds all train, r2's
    fold 1 met a non-finite loss (NaN: last). At rung 2 with eta 3 one of the three configurations stays."""
    names = [f"r{c}_fold{k}" for c in range(3) for k in range(3)]
    bracket = prune_lib.Bracket(0, (2,))
    rungs = prune_lib.Rungs(names, {f"r{c}": bracket for c in range(3)}, "val_loss", False, 3)
    loss = {"r0_fold0": [0.9], "r0_fold1": [0.5, 0.30], "r0_fold2": [0.5, 0.30], "r1_fold0": [0.5, 0.35],
            "r1_fold1": [0.5, 0.35], "r1_fold2": [0.5, 0.35], "r2_fold0": [0.5, 0.1], "r2_fold1": [0.5],
            "r2_fold2": [0.5, 0.1]}  # fmt: skip
    histories = {name: [{"epoch": e + 1, "val_loss": v} for e, v in enumerate(values)] for name, values in loss.items()}
    halted = {name: name in ("r0_fold0", "r2_fold1") for name in names}
    rungs.decide(histories, halted, {"r2_fold1"}, 1, 2)
    # r0's mean over all folds (0.9 + 0.3 + 0.3) / 3 = 0.5 is worse than r1's 0.35; r2 failed: NaN, last.
    assert set(rungs.pruned) == {"r0_fold1", "r0_fold2", "r2_fold0", "r2_fold2"}
    assert set(rungs.pruned.values()) == {2}
