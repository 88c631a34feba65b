"""Sweeps: the grid, one vmapped program per shape group, per-run early stopping, chunks over two devices,
resuming, cross-validation, and equivalence with the same runs trained alone."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import EXPERIMENT, OPTIMIZED_ENV, TIMED, computed_once, one_device_env, tiny_config

import jaxepochs
from jaxepochs import cli
from jaxepochs.sweep import grid as grid_lib

TIMINGS = ("train_seconds", *TIMED)
PER_CALL = {"train.epochs_per_call": "3"}  # the sweep's and the solo runs' program: 3 epochs per call


def _untimed(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def _close(a_rows, b_rows):
    """To float32 round-off: on this host's two devices XLA's kernels for a batch of runs sum in another order
    than for one run (bit for bit on one device: see the test over 5 epochs of the default experiment)."""
    assert len(a_rows) == len(b_rows)
    for a, b in zip(_untimed(a_rows), _untimed(b_rows), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-6), key


def test_grid_is_the_product_and_keeps_bracketed_commas():
    base = tiny_config()
    runs = grid_lib.expand(base, {"optimizer.learning_rate": "1e-3,1e-2", "model.hidden_sizes": "(8,8),(16,)"})
    assert runs == [
        {"optimizer.learning_rate": "1e-3", "model.hidden_sizes": "(8,8)"},
        {"optimizer.learning_rate": "1e-3", "model.hidden_sizes": "(16,)"},
        {"optimizer.learning_rate": "1e-2", "model.hidden_sizes": "(8,8)"},
        {"optimizer.learning_rate": "1e-2", "model.hidden_sizes": "(16,)"},
    ]


def test_random_draws_are_seeded_and_inside_their_ranges():
    base = tiny_config()
    specs = {"optimizer.learning_rate": "loguniform:1e-4:1e-1", "seed": "randint:0:9", "train.batch_size": "32,64"}
    runs = grid_lib.expand(base, specs, random=50, random_seed=3)
    assert runs == grid_lib.expand(base, specs, random=50, random_seed=3)
    rates = np.array([float(r["optimizer.learning_rate"]) for r in runs])
    assert len(runs) == 50 and rates.min() >= 1e-4 and rates.max() <= 1e-1
    assert rates.min() < 1e-3 and rates.max() > 1e-2  # log-uniform: spread over the decades
    assert {r["train.batch_size"] for r in runs} == {"32", "64"}
    assert all(0 <= int(r["seed"]) <= 9 for r in runs)


@pytest.mark.parametrize(
    ("specs", "random", "match"),
    [
        ({"optimizer.learning_rte": "1e-3"}, 0, r'--sweep\.optimizer\.learning_rte.*Did you mean "learning_rate"'),
        ({"optimizer.learning_rate": "1e-3,"}, 0, r"an empty value"),
        ({"train.batch_size": "32,big"}, 0, r'cannot read "big" as a whole number'),
        ({"optimizer.learning_rate": "loguniform:1e-1:1e-4"}, 5, r"LOW < HIGH"),
        ({"optimizer.learning_rate": "loguniform:0:1"}, 5, r"LOW > 0"),
        ({"optimizer.learning_rate": "loguniform:1e-4:1e-1"}, 0, r"with --random N"),
        ({"optimizer.weight_decay": "0.1,1.0"}, 0, r"optimizer adam has no weight_decay"),
        ({}, 0, r"Nothing to sweep"),
    ],
)
def test_bad_sweep_specifications(specs, random, match):
    with pytest.raises(grid_lib.SweepError, match=match):
        grid_lib.expand(tiny_config(), specs, random)


# Sweeps against the same runs trained alone, in a process with one device. A member's arithmetic is its solo
# run's, but XLA's CPU kernels for a batch of R runs may sum in another order than for one run: bit for bit on
# the hosts the README names, the last bits apart on others (an AMD EPYC host with jaxlib 0.9 and 0.10: the 7th
# digit of a training loss at epoch 3, where 10535d6 failed the bit-for-bit check too), and on any host of two
# devices. What holds everywhere, bit for bit: a member's numbers do not depend on its neighbours in the batch.
SWEEPS_AND_SOLO_RUNS = """
import json, sys
import jaxepochs
from jaxepochs.sweep import grid as grid_lib


def compare(base, specs, workdir, alone_runs):
    grid = grid_lib.expand(base, specs)
    swept = jaxepochs.sweep(base, grid, workdir + "/sweep", quiet=True)
    timed = ("seconds", "examples_per_second")
    untimed = lambda rows: [{k: v for k, v in row.items() if k not in timed} for row in rows]
    out = {}
    for i in alone_runs:
        name = sorted(swept.histories)[i]
        alone = jaxepochs.train_and_evaluate(jaxepochs.apply_overrides(base, grid[i]), f"{workdir}/{name}", quiet=True)
        keys = ("stop_reason", "stopped_epoch", "best_epoch", "test_loss", "test_accuracy")
        out[name] = [grid[i], untimed(swept.histories[name]), untimed(alone.history),
                     [swept.summaries[name][k] for k in keys], [alone.summary[k] for k in keys]]
    return out


default = jaxepochs.apply_overrides(jaxepochs.load_config_file(sys.argv[1]), {"train.epochs": "5"})
stopping = jaxepochs.apply_overrides(jaxepochs.base_config(), json.loads(sys.argv[3]))
others = grid_lib.expand(default, {"optimizer.learning_rate": "0.01,0.03", "seed": "1,2"})  # r0: lr 0.01, seed 1
neighbours = jaxepochs.sweep(default, others, sys.argv[2] + "/n", quiet=True).histories["r0"]
print(json.dumps({
    "neighbours": [{k: v for k, v in row.items() if k not in ("seconds", "examples_per_second")} for row in neighbours],
    "default": compare(default, {"optimizer.learning_rate": "0.001,0.01", "seed": "0,1"}, sys.argv[2] + "/d", [3]),
    "stopping": compare(stopping, {"optimizer.learning_rate": "5e-3,3e-2", "early_stopping.patience": "1,50"},
                        sys.argv[2] + "/s", [0, 1, 2, 3]),
}))
"""


@pytest.fixture(scope="module")
def one_device_sweeps(tmp_path_factory):
    return computed_once(tmp_path_factory, "one_device_sweeps", _sweeps_and_solo_runs_on_one_device)


def _sweeps_and_solo_runs_on_one_device(workdir):
    # A compilation cache of its own: XLA's CPU code for a program differs with the process's device count, and
    # the session's cache holds programs compiled with two. (The script must not import conftest: it sets two.)
    env = {
        **one_device_env(),
        "JAX_COMPILATION_CACHE_DIR": str(workdir / "xla"),
        **OPTIMIZED_ENV,  # the README's tolerance holds for XLA's defaults (conftest.optimized says why)
    }
    stopping = {
        "model.hidden_sizes": "(64,)",
        "train.batch_size": "64",
        "train.epochs": "9",
        "train.epochs_per_call": "3",
        "early_stopping.enabled": "True",
        "early_stopping.restore_best": "True",
    }
    command = [sys.executable, "-c", SWEEPS_AND_SOLO_RUNS, str(EXPERIMENT), str(workdir), json.dumps(stopping)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same_to_round_off(swept: list[dict], alone: list[dict]) -> None:
    """The same epochs and fields, every number equal to float32 round-off grown by up to 9 epochs of training."""
    assert [list(row) for row in swept] == [list(row) for row in alone]
    for a, b in zip(swept, alone, strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)


def test_a_sweep_member_equals_its_solo_run_on_one_device(one_device_sweeps):
    """The case that parted in the 3rd epoch (val_loss 1.3270 against 1.3287) when the sweep and the run were two
    programs: the default experiment, 2 learning rates x 2 seeds, against lr 0.01 seed 1 alone, for 5 epochs. The
    member equals its solo run to round-off (bit for bit where XLA's kernels allow: see above), and equals the
    same run among other neighbours bit for bit."""
    values, swept, alone, swept_summary, alone_summary = one_device_sweeps["default"]["r3"]
    assert values == {"optimizer.learning_rate": "0.01", "seed": "1"} and len(swept) == 5
    assert swept == one_device_sweeps["neighbours"]  # bit for bit, on any host
    _same_to_round_off(swept, alone)
    assert swept_summary[:3] == alone_summary[:3]  # the stop and the best epoch
    assert swept_summary[3:] == pytest.approx(alone_summary[3:], rel=1e-3)


def test_each_run_of_a_sweep_equals_the_same_run_alone_and_stops_on_its_own(one_device_sweeps):
    """4 runs (2 learning rates x 2 patiences) in one program, against each trained alone: the impatient runs stop
    early and are frozen while the others train on; every row and stopping field is the solo run's."""
    runs = one_device_sweeps["stopping"]
    lengths = {name: len(swept) for name, (_, swept, *_) in runs.items()}
    assert lengths["r1"] == lengths["r3"] == 9 and lengths["r2"] < 9  # r2 (lr 3e-2, patience 1) stopped
    for name, (_, swept, alone, swept_summary, alone_summary) in runs.items():
        _same_to_round_off(swept, alone)
        assert swept_summary[:3] == alone_summary[:3], name  # the stop and the best epoch: decided alike
        assert swept_summary[3:] == pytest.approx(alone_summary[3:], rel=1e-3), name
    assert runs["r2"][3][:2] == ["patience", lengths["r2"]]


def test_sweeps_honour_the_checkpoint_settings(tmp_path):
    base = tiny_config({"train.epochs": "5", "checkpoint.every_epochs": "2"})
    grid = grid_lib.expand(base, {"seed": "0,1"})
    saved = lambda workdir: sorted(
        int(p.name) for p in (workdir / "chunks" / "group0_chunk0" / "checkpoints").iterdir() if p.name.isdigit()
    )
    jaxepochs.sweep(base, grid, tmp_path / "every2", quiet=True)
    assert saved(tmp_path / "every2") == [2, 4, 5]  # every 2 epochs, and the end
    newest = jaxepochs.apply_overrides(base, {"checkpoint.max_to_keep": "1"})
    jaxepochs.sweep(newest, grid, tmp_path / "newest", quiet=True)
    assert saved(tmp_path / "newest") == [5]
    off = jaxepochs.apply_overrides(base, {"checkpoint.enabled": "False"})
    result = jaxepochs.sweep(off, grid, tmp_path / "off", quiet=True)
    assert len(result.histories["r0"]) == 5
    assert not (tmp_path / "off" / "chunks" / "group0_chunk0" / "checkpoints").exists()


def test_runs_are_grouped_by_program():
    base = tiny_config()
    grid = grid_lib.expand(base, {"model.hidden_sizes": "(8,),(16,)", "seed": "0,1"})
    groups = grid_lib.group_runs(grid_lib.make_runs(base, grid))
    assert [[run.values["model.hidden_sizes"] for run in group] for group in groups] == [["(8,)"] * 2, ["(16,)"] * 2]


def test_one_program_per_shape_group_not_per_run(tmp_path, compile_counter):
    base = tiny_config({**PER_CALL, "train.epochs": "2"})
    jaxepochs.sweep(base, grid_lib.expand(base, {"seed": "0,1"}), tmp_path / "warm", quiet=True)  # eager ops
    counts = []
    for seeds in ("0,1", "0,1,2,3,4,5,6,7"):
        with compile_counter() as counter:
            jaxepochs.sweep(base, grid_lib.expand(base, {"seed": seeds}), tmp_path / seeds, quiet=True)
        counts.append(counter.count)
    assert counts[0] == counts[1]  # four times the runs, the same number of programs
    with compile_counter() as counter:  # 8 runs in 4 chunks of 2: still the same programs, compiled once
        jaxepochs.sweep(
            base, grid_lib.expand(base, {"seed": "0,1,2,3,4,5,6,7"}), tmp_path / "chunked", quiet=True, chunk=2
        )
    assert counter.count == counts[0]


def test_a_group_of_one_run_trains_as_that_run_alone(tmp_path):
    """Each width is its own group of one run: a chunk of one is the program `jaxepochs run` trains it with (so the
    same numbers exactly); a diverging one ends at its last good epoch without stopping the sweep."""
    base = tiny_config({"train.epochs": "3", "optimizer.name": "sgd", "mesh.data": "1"})  # the solo run on one device
    grid = grid_lib.expand(base, {"model.hidden_sizes": "(8,),(12,)", "optimizer.learning_rate": "0.1,1e30"})
    grid = [
        values
        for values in grid
        if (values["model.hidden_sizes"] == "(8,)") == (values["optimizer.learning_rate"] == "0.1")
    ]
    result = jaxepochs.sweep(base, grid, tmp_path / "sweep", quiet=True)
    good, diverged = (next(r for r in result.results if r["model.hidden_sizes"] == h) for h in ([8], [12]))
    alone = jaxepochs.train_and_evaluate(jaxepochs.apply_overrides(base, grid[0]), tmp_path / "alone", quiet=True)
    assert _untimed(result.histories[good["run"]]) == _untimed(alone.history)
    assert good["final_test_accuracy"] == alone.summary["test_accuracy"]
    assert good["best_epoch"] == alone.summary["best_epoch"] and good["epochs_run"] == 3
    assert diverged["epochs_run"] < 3 and diverged["stop_reason"] == "non_finite_loss"
    assert diverged["stopped_epoch"] == diverged["epochs_run"] + 1  # as a run's summary names it
    assert sorted(p.name for p in (tmp_path / "sweep" / "chunks").iterdir()) == ["group0_chunk0", "group1_chunk0"]


def test_chunks_sharded_over_two_devices_match_one_run_at_a_time(tmp_path):
    assert len(jax.devices()) >= 2
    base = tiny_config({**PER_CALL, "train.epochs": "3"})
    grid = grid_lib.expand(base, {"seed": "0,1,2"})  # chunks of 2: [r0 r1] sharded, [r2 + a padding run]
    together = jaxepochs.sweep(base, grid, tmp_path / "two", quiet=True, chunk=2)
    apart = jaxepochs.sweep(base, grid, tmp_path / "one", quiet=True, chunk=1)
    for name in apart.histories:
        _close(together.histories[name], apart.histories[name])
    assert sorted(p.name for p in (tmp_path / "two" / "chunks").iterdir()) == ["group0_chunk0", "group0_chunk1"]


def test_sweep_resumes_from_its_checkpoints_exactly(tmp_path):
    base = tiny_config({**PER_CALL, "train.epochs": "6", "checkpoint.every_seconds": "0"})
    grid = grid_lib.expand(base, {"seed": "0,1"})
    first = jaxepochs.sweep(base, grid, tmp_path, quiet=True)
    checkpoints = tmp_path / "chunks" / "group0_chunk0" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())[-1] == 6
    shutil.rmtree(checkpoints / "6")  # as if stopped after epoch 3's call: resumes there
    resumed = jaxepochs.sweep(base, grid, tmp_path, quiet=True)
    assert _untimed(resumed.histories["r0"]) == _untimed(first.histories["r0"])
    with pytest.raises(grid_lib.SweepError, match="holds another sweep"):
        jaxepochs.sweep(base, grid_lib.expand(base, {"seed": "0,1,2"}), tmp_path, quiet=True)


def test_fold_indices_partition_the_training_split():
    folds = [grid_lib.fold_indices(103, 4, k, seed=0) for k in range(4)]
    vals = np.concatenate([val for _, val in folds])
    assert len(vals) == len(set(vals)) == 4 * (103 // 4)  # disjoint validation folds of 25
    for train, val in folds:
        assert len(train) == 103 - 25 and not set(train) & set(val)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"cv": 1}, r"K >= 2"), ({"cv": 5000}, r"more folds than the 4000"), ({"refit": True}, r"add --cv K")],
)
def test_bad_cross_validation(tmp_path, kwargs, match):
    base = tiny_config({"train.epochs": "1"})
    with pytest.raises(grid_lib.SweepError, match=match):
        jaxepochs.sweep(base, grid_lib.expand(base, {"seed": "0,1"}), tmp_path, quiet=True, **kwargs)


def cv_rows_of(workdir) -> list[dict]:
    with (workdir / "cv.csv").open() as f:
        return list(csv.DictReader(f))


def test_sweep_command_cross_validates_refits_and_writes_its_outputs(tmp_path, capsys):
    argv = [
        "sweep",
        "--config",
        str(EXPERIMENT),
        "--workdir",
        str(tmp_path),
        "--config.train.epochs=3",
        "--config.model.hidden_sizes=(16,)",
        "--config.model.residual=False",
        "--sweep.optimizer.learning_rate=3e-3,2e-2",
        "--cv",
        "3",
        "--refit",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| rank |" in out and "3-fold CV recommends" in out and "refit test accuracy" in out
    best = re.search(
        r'Best configuration: (r[01]) \{"optimizer.learning_rate": ([0-9.e-]+)\}, trained for (\d) epochs', out
    )
    assert best and "Best: r" not in out  # a configuration, not one of its folds
    cv_by_config = {row["config"]: row for row in cv_rows_of(tmp_path)}
    assert int(best.group(3)) == int(cv_by_config[best.group(1)]["recommended_epochs"])
    assert float(best.group(2)) == float(cv_by_config[best.group(1)]["optimizer.learning_rate"])
    rows = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert {row["optimizer.learning_rate"] for row in rows} == {3e-3, 2e-2}  # numbers, not the typed text
    assert len(rows) == 2 * 3 * 3 and {r["run"] for r in rows} == {f"r{i}_fold{k}" for i in (0, 1) for k in range(3)}
    with (tmp_path / "results.csv").open() as f:
        results = list(csv.DictReader(f))
    assert len(results) == 6 and "best_val_loss" in results[0] and "final_test_accuracy" in results[0]
    cv_rows = cv_rows_of(tmp_path)
    assert len(cv_rows) == 2
    for row in cv_rows:
        assert 1 <= int(row["recommended_epochs"]) <= 3
        assert 0.1 < float(row["refit_test_accuracy"]) <= 1.0
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert cli.main([*argv[:-3], "--sweep.optimizer.learning_rte=1e-3"]) == 2
    assert 'Did you mean "learning_rate"' in capsys.readouterr().err


def test_a_diverged_member_stays_diverged_when_the_sweep_resumes(tmp_path):
    """A run halted by a non-finite loss is saved as halted: resuming the sweep (from a middle checkpoint, or once
    finished) neither trains it again nor forgets why it stopped."""
    base = tiny_config({"train.epochs": "6", "optimizer.name": "sgd", "checkpoint.every_epochs": "2"})
    grid = grid_lib.expand(base, {"optimizer.learning_rate": "0.1,1e30"})
    first = jaxepochs.sweep(base, grid, tmp_path, quiet=True)
    assert first.summaries["r1"]["stop_reason"] == "non_finite_loss" and len(first.histories["r1"]) < 4
    again = jaxepochs.sweep(base, grid, tmp_path, quiet=True)  # finished: nothing to train
    assert again.summaries == first.summaries
    shutil.rmtree(tmp_path / "chunks" / "group0_chunk0" / "checkpoints" / "6")  # resume from epoch 4
    resumed = jaxepochs.sweep(base, grid, tmp_path, quiet=True)
    assert resumed.summaries == first.summaries
    for name in ("r0", "r1"):
        assert _untimed(resumed.histories[name]) == _untimed(first.histories[name])


def test_a_plateau_floor_keeps_learning_rates_apart():
    """reduce_on_plateau's floor is min_learning_rate / learning_rate, a static setting: with a floor, runs at
    other learning rates are other programs (without one, the learning rate is a traced value)."""
    plateau = {"optimizer.schedule.name": "reduce_on_plateau"}
    for floor, groups in (("0.0", 1), ("1e-4", 2)):
        base = tiny_config({**plateau, "optimizer.schedule.min_learning_rate": floor})
        runs = grid_lib.make_runs(base, grid_lib.expand(base, {"optimizer.learning_rate": "1e-3,1e-2"}))
        assert len(grid_lib.group_runs(runs)) == groups, floor


def test_sweep_png_puts_a_learning_rate_on_a_log_axis_and_seeds_in_categories():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxepochs.sweep.report import swept_axis

    fig, (rate, seed, name, many) = plt.subplots(1, 4)
    rates = ["0.003", "0.001", "0.01", "0.003"]
    assert swept_axis(rate, "optimizer.learning_rate", rates) == [0.003, 0.001, 0.01, 0.003]
    assert rate.get_xscale() == "log"  # a decade spanned
    assert [t.get_text() for t in rate.get_xticklabels()] == ["0.001", "0.003", "0.01"]  # the swept values, short
    assert swept_axis(seed, "seed", [2, 0, 1, 0]) == [2, 0, 1, 0]  # positions of the categories 0, 1, 2
    assert [t.get_text() for t in seed.get_xticklabels()] == ["0", "1", "2"] and seed.get_xscale() == "linear"
    assert swept_axis(name, "optimizer.name", ["sgd", "adam", "sgd"]) == [1, 0, 1]
    assert [t.get_text() for t in name.get_xticklabels()] == ["adam", "sgd"]
    values = [str(0.5 + i / 10) for i in range(12)]  # 12 values within a factor of 3: matplotlib's linear ticks
    assert swept_axis(many, "optimizer.b1", values) == [float(v) for v in values] and many.get_xscale() == "linear"
    assert len(many.get_xticks()) < 12
    plt.close(fig)
