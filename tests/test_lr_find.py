"""`jaxepochs lr-find`: the range test (one compiled scan; Lightning's smoothing, stop and suggestion) and the K
constant rates (one vmapped sweep, each rate its solo run's numbers), through the CLI and the module."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import jax.stages
import numpy as np
import pytest
from conftest import EXPERIMENT, tiny_config

import jaxepochs
from jaxepochs import cli
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.studies import lr_find

# mnist1d_mlp.py made as small as tiny_config: a 16-unit MLP, batch 64 (3600 / 64: 56 whole batches, so 100
# steps wrap into a second epoch), one device. Adam from 1e-5 to 10 diverges before the end.
SMALL = ["--config.model.hidden_sizes=(16,)", "--config.train.batch_size=64", "--config.mesh.data=1"]
RANGE = ["--min", "1e-5", "--max", "10", "--steps", "100", "--rates", "4", "--epochs", "2"]


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """One `jaxepochs lr-find` through the CLI: (its workdir, lr_find.json, what it printed)."""
    workdir = tmp_path_factory.mktemp("lr_find") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(["lr-find", "--config", str(EXPERIMENT), "--workdir", str(workdir), *RANGE, *SMALL])
    assert rc == 0
    return workdir, json.loads((workdir / "lr_find.json").read_text()), printed.getvalue()


def test_the_files_are_written_and_the_suggestions_printed(found):
    workdir, result, printed = found
    assert (workdir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "constant_rates" / "results.csv").is_file()  # the sweep's own outputs
    r, c = result["range_test"], result["constant_rates"]
    assert (r["min_lr"], r["max_lr"], r["steps"], r["beta"], r["divergence_threshold"]) == (1e-5, 10.0, 100, 0.98, 4.0)
    kept = len(r["learning_rates"])
    assert len(r["losses"]) == len(r["smoothed_losses"]) == kept
    assert r["learning_rates"][0] == pytest.approx(1e-5) and result["optimizer"] == "adam"
    assert r["suggested_learning_rate"] == r["learning_rates"][r["suggestion_step"]]
    assert result["suggested_learning_rate"] == r["suggested_learning_rate"]
    assert len(c["runs"]) == len(c["learning_rates"]) == 4 and c["epochs"] == 2 and c["selected_by"] == "val_loss"
    assert {"learning_rate", "train_loss", "val_loss", "val_accuracy", "diverged"} <= set(c["runs"][0])
    assert result["suggested_learning_rate_constant"] == c["suggested_learning_rate"]
    lines = [line for line in printed.splitlines() if line.startswith("lr-find: ")]  # (and TFDS's first build)
    assert len(lines) == 2
    assert f"{r['suggested_learning_rate']:.3g}" in lines[0]
    assert f"{c['suggested_learning_rate']:.3g}" in lines[1]


def test_the_curve_falls_then_diverges_and_the_suggestion_is_where_it_falls(found):
    r = found[1]["range_test"]
    rates, losses, smoothed = (np.asarray(r[k]) for k in ("learning_rates", "losses", "smoothed_losses"))
    kept = len(rates)
    assert r["stop_reason"] == "diverged" and r["stopped_at_step"] == kept - 1 < 99  # before max_lr
    assert rates[-1] < 10
    # Lightning's stop: the last point's smoothed loss is above 4x the best before it, and no earlier one was.
    assert smoothed[-1] > 4 * smoothed[:-1].min()
    assert all(smoothed[i] <= 4 * smoothed[:i].min() for i in range(1, kept - 1))
    np.testing.assert_allclose(smoothed, lr_find.smooth(losses))
    np.testing.assert_allclose(rates, 1e-5 * 1e6 ** (np.arange(kept) / 99), rtol=1e-12)
    s = r["suggestion_step"]
    assert 10 <= s < kept - 1 and 1e-3 <= rates[s] <= 1  # adam on this MLP: where the loss falls
    assert smoothed[s] < losses[:10].mean() and losses[s - 5 : s + 5].mean() < losses[:10].mean() - 0.1
    assert np.argmin(np.gradient(smoothed[10:-1])) + 10 == s  # the steepest descent, as Lightning's suggestion()


def test_each_constant_rate_is_its_solo_run(found, tmp_path):
    """The vmapped rates against `jaxepochs run` of the same config at one of them (here the best), same seed."""
    c = found[1]["constant_rates"]
    assert c["learning_rates"] == sorted(c["learning_rates"]) and c["learning_rates"][-1] < 10
    row = next(row for row in c["runs"] if row["learning_rate"] == c["suggested_learning_rate"])
    overrides = {o.removeprefix("--config.").split("=")[0]: o.split("=")[1] for o in SMALL}
    config = jaxepochs.apply_overrides(
        jaxepochs.load_config_file(EXPERIMENT),
        {**overrides, "train.epochs": "2", "optimizer.learning_rate": repr(row["learning_rate"])},
    )
    alone = jaxepochs.train_and_evaluate(config, tmp_path / "alone", quiet=True).history[-1]
    assert row["epochs_completed"] == 2 and not row["diverged"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert row[key] == pytest.approx(alone[key], rel=1e-5), key
    valid = [r["val_loss"] for r in c["runs"] if not r["diverged"]]
    assert row["val_loss"] == min(valid) and len(set(valid)) == len(valid)  # the rates trained differently


def test_the_range_test_is_one_compiled_scan(compile_counter, monkeypatch):
    """The training step is traced once, inside a scan over all the steps; that program runs once; the test
    compiles the same programs whatever its length. A Python loop over a jitted step would trace it outside any
    scan and call a program per step."""
    config = tiny_config({"optimizer.name": "sgd"})
    lr_find.range_test(config, 1e-4, 10.0, 20)  # the first use in a process compiles small eager ops as well
    traced, scans, calls = [], [], []
    step, scan, call = epoch_lib.train_step, jax.lax.scan, jax.stages.Compiled.__call__

    def in_scan(body, init, xs, *args, **kwargs):
        scans.append(jax.tree.leaves(xs)[0].shape[0])
        return scan(lambda c, x: (traced.append(len(scans)), body(c, x))[1], init, xs, *args, **kwargs)

    monkeypatch.setattr(epoch_lib, "train_step", lambda *a, **k: traced.append("step") or step(*a, **k))
    monkeypatch.setattr(jax.lax, "scan", in_scan)
    monkeypatch.setattr(jax.stages.Compiled, "__call__", lambda self, *a, **k: calls.append(1) or call(self, *a, **k))
    counts = []
    for steps in (30, 90):
        traced.clear(), scans.clear(), calls.clear()
        with compile_counter() as counter:
            test = lr_find.range_test(config, 1e-4, 10.0, steps)
        counts.append(counter.count)
        assert scans == [steps] and traced == [1, "step"]  # the step traced once, in the body of that one scan
        assert calls == [1] and len(test.losses) == steps and np.isfinite(test.losses[:10]).all()
    assert counts[0] == counts[1] <= 4  # the initialisation's programs and the scan


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--min", "0"], "--min 0.0"),
        (["--min=-1e-3"], "--min -0.001"),
        (["--min", "1e-2", "--max", "1e-3"], "--max 0.001 must be above --min 0.01"),
        (["--min", "1", "--max", "1"], "--max 1.0 must be above --min 1.0"),
        (["--steps", "19"], "--steps 19: too few to smooth the loss; use --steps 20 or more"),
        (["--rates", "1"], "--rates 1: the constant-rate comparison needs 2 rates or more"),
        (["--epochs", "0"], "--epochs 0: train each constant rate for 1 epoch or more"),
        (["--rates-range", "1", "0.1"], "--rates-range 1.0 0.1: give LOW HIGH with 0 < LOW < HIGH"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_anything_runs(tmp_path, capsys, flags, named):
    workdir = tmp_path / "out"
    assert cli.main(["lr-find", "--config", str(EXPERIMENT), "--workdir", str(workdir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxepochs: error: ") and named in err and err.count("\n") == 1
    assert not workdir.exists()


@pytest.mark.parametrize(
    "override, named",
    [
        ({"train.profile_epochs": "(1,)"}, "lr-find does not profile"),
        ({"train.epochs": "5", "finetune.unfreeze_epochs": "(3, 1)"}, "unfreezes a group at epoch 3, after the"),
    ],
)
def test_settings_lr_find_cannot_honour_are_refused_before_anything_trains(tmp_path, override, named):
    with pytest.raises(ValueError, match=named):
        lr_find.lr_find(tiny_config(override), tmp_path / "lr", epochs=2, quiet=True)
    assert not (tmp_path / "lr").exists()
