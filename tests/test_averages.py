"""train.ema_decay and train.swa_start_epoch: averages of the parameters, kept in the optimizer's state and evaluated
(train.eval_weights) by validation, test, the best epoch, `load` and the exports."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import REPO, TIMED, tiny_config
from test_hooks import DIGITS_FIFTH

import jaxepochs
from jaxepochs.host.config import ConfigError, validate
from jaxepochs.sweep import grid as grid_lib

EXPERIMENTS = REPO / "experiments"
untimed = lambda rows: [{k: v for k, v in row.items() if k not in TIMED} for row in rows]
# One full-batch step an epoch with plain SGD: the parameters after each epoch are easy to name.
FULL_BATCH_SGD = {
    "train.batch_size": "3600",
    "optimizer.name": "sgd",
    "optimizer.momentum": "0",
    "optimizer.learning_rate": "0.5",
}


def _close(a, b, rtol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


def test_the_averages_are_the_decayed_and_the_equal_means_and_are_what_is_evaluated(tmp_path):
    run = lambda name, extra: jaxepochs.train_and_evaluate(
        tiny_config({**FULL_BATCH_SGD, "train.epochs": "3", **extra}), tmp_path / name, quiet=True
    )
    p0 = run("start", {"train.epochs": "0"}).state.params  # evaluate only: the initial parameters
    plain = run("plain", {"checkpoint.every_epochs": "1"})
    p1, p2 = (jaxepochs.load(tmp_path / "plain", epoch=e).params for e in (1, 2))
    p3 = plain.state.params
    weighted = lambda *ws: jax.tree.map(lambda *ps: sum(w * p for w, p in zip(ws, ps, strict=True)), p0, p1, p2, p3)
    ema, swa = weighted(0.125, 0.125, 0.25, 0.5), weighted(0, 0, 0.5, 0.5)  # decay 0.5; epochs 2 and 3 averaged
    runs = {}
    # Kept but not evaluated: training and evaluation are the plain run's, exactly ("both" below: EMA's).
    kept = run("kept", {"train.swa_start_epoch": "2", "train.eval_weights": "trained"})
    assert untimed(kept.history) == untimed(plain.history)
    _close(kept.state.opt_state.swa, swa)
    for key, value, average, field in (("ema_decay", "0.5", ema, "ema"), ("swa_start_epoch", "2", swa, "swa")):
        evaluated = runs[field] = run(field, {f"train.{key}": value})
        _close(getattr(evaluated.state.opt_state, field), average)
        assert [r["train_loss"] for r in evaluated.history] == [r["train_loss"] for r in plain.history]
        assert evaluated.history[-1]["val_loss"] != plain.history[-1]["val_loss"]
        _close(jaxepochs.load(tmp_path / field).params, average)  # what load, predict and export take
        _close(jaxepochs.load(tmp_path / field, epoch="best").params, average)  # epoch 3 was the best
    # Before its first epoch, SWA's evaluation sees the trained parameters.
    assert evaluated.history[0]["val_loss"] == plain.history[0]["val_loss"]
    # "both": the average's rows, and validation at the trained parameters beside them.
    both = run("both", {"train.ema_decay": "0.5", "train.eval_weights": "both"})
    for row, plain_row in zip(both.history, plain.history, strict=True):
        assert row["val_trained_loss"] == pytest.approx(plain_row["val_loss"], rel=1e-6)
        assert row["val_trained_accuracy"] == pytest.approx(plain_row["val_accuracy"], rel=1e-6)
    assert untimed(runs["ema"].history) == [
        {k: v for k, v in r.items() if "trained" not in k} for r in untimed(both.history)
    ]


def test_the_average_resumes_bit_for_bit_and_sweeps_per_run(tmp_path):
    ema = {"train.ema_decay": "0.9", "train.epochs": "3"}
    whole = jaxepochs.train_and_evaluate(tiny_config(ema), tmp_path / "whole", quiet=True)
    jaxepochs.train_and_evaluate(tiny_config({**ema, "train.epochs": "1"}), tmp_path / "resumed", quiet=True)
    resumed = jaxepochs.train_and_evaluate(tiny_config(ema), tmp_path / "resumed", quiet=True)
    assert untimed(resumed.history) == untimed(whole.history)
    _close(resumed.state.opt_state.ema, whole.state.opt_state.ema, rtol=0)
    # The decay is per run: a sweep of it is one program, and its member of decay 0.9 is the run above; with a
    # further evaluation set beside, which its members evaluate at their own averages.
    base = tiny_config({**ema, "data.eval_splits": "('again=test',)"})
    grid = grid_lib.expand(base, {"train.ema_decay": "0.9,0.5"})
    assert len(grid_lib.group_runs(grid_lib.make_runs(base, grid))) == 1
    swept = jaxepochs.sweep(base, grid, tmp_path / "sweep", quiet=True)
    for a, b in zip(untimed(whole.history), untimed(swept.histories["r0"]), strict=True):
        assert {k: pytest.approx(v, rel=1e-4) for k, v in a.items()} == {k: b[k] for k in a}
    assert swept.histories["r1"][-1]["val_loss"] != swept.histories["r0"][-1]["val_loss"]
    for name in ("r0", "r1"):
        assert "again_loss" in swept.histories[name][-1] and "again_accuracy" in swept.summaries[name]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train.ema_decay": "1.0"}, r"train\.ema_decay.*decay in \(0, 1\)"),
        ({"train.eval_weights": "ema"}, r'"ema" with train\.ema_decay = 0.*Set train\.ema_decay'),
        ({"train.ema_decay": "0.99", "train.eval_weights": "eam"}, r'train\.eval_weights.*"ema"'),
        ({"train.ema_decay": "0.99", "optimizer.name": "schedule_free_adamw"}, r"average of its own"),
        ({"train.ema_decay": "0.99", "train.swa_start_epoch": "3"}, r"Keep one average"),
        ({"train.eval_weights": "swa"}, r'"swa" with train\.swa_start_epoch = 0'),
        ({"train.swa_start_epoch": "-1"}, r"train\.swa_start_epoch.*the first epoch to average"),
        ({"train.eval_weights": "both"}, r'"both" without an average'),
    ],
)
def test_bad_average_settings_name_the_key_and_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(tiny_config(overrides))


def test_swa_recomputes_batchnorm_statistics_for_its_average(tmp_path):
    """digits_cnn (BatchNorm) on 80 examples: from SWA's first epoch its statistics are recomputed for the average
    (a forward pass over the training split), saved with it, and what `load` gives with the averaged weights;
    streamed data, which that pass would need to read again, is refused before anything is written."""
    (tmp_path / "digits_cnn.py").write_text((EXPERIMENTS / "digits_cnn.py").read_text())
    (tmp_path / "fifth.py").write_text(DIGITS_FIFTH)
    config = jaxepochs.apply_overrides(
        jaxepochs.load_config_file(tmp_path / "fifth.py"),
        {"train.swa_start_epoch": "1", "train.epochs": "2", "train.batch_size": "32", "mesh.data": "1"},
    )
    result = jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True)
    swa = result.state.opt_state
    assert int(swa.taken) == 2
    loaded = jaxepochs.load(tmp_path / "run")
    _close(loaded.params, swa.swa, rtol=0)
    _close(loaded.model_state, swa.stats, rtol=0)  # the average's statistics, not training's
    plain = jaxepochs.apply_overrides(config, {"train.eval_weights": "trained"})  # the same training, its statistics
    trained = jaxepochs.train_and_evaluate(plain, tmp_path / "trained", quiet=True).state.model_state
    assert not np.allclose(np.asarray(jax.tree.leaves(swa.stats)[0]), np.asarray(jax.tree.leaves(trained)[0]))
    streamed = jaxepochs.apply_overrides(config, {"data.stream": "True"})
    with pytest.raises(ConfigError, match=r"swa_start_epoch with a model that keeps state.*on streamed data"):
        jaxepochs.train_and_evaluate(streamed, tmp_path / "streamed", quiet=True)
    assert not (tmp_path / "streamed").exists()


def test_both_on_streamed_data_gives_the_resident_run_s_rows(tmp_path):
    """Validation kept on the device (evaluated inside the concluding program) and read a chunk at a time (a
    budget too small to keep it): both give the trained weights' rows beside the average's."""
    both = {"train.ema_decay": "0.9", "train.eval_weights": "both", "train.epochs": "2"}
    resident = jaxepochs.train_and_evaluate(tiny_config(both), tmp_path / "resident", quiet=True)
    stream = {**both, "data.stream": "True", "train.steps_per_call": "5"}
    small = {**stream, "data.device_memory_bytes": "400000", "data.device_memory_fraction": "0.5"}
    close = lambda k, v: pytest.approx(v, abs=2e-3) if k.endswith("accuracy") else pytest.approx(v, rel=1e-4)
    for name, overrides in (("kept", stream), ("read", small)):
        streamed = jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path / name, quiet=True)
        assert streamed.summary["streamed"]
        for a, b in zip(untimed(resident.history), untimed(streamed.history), strict=True):
            assert "val_trained_loss" in a and {k: close(k, v) for k, v in a.items()} == {k: b[k] for k in a}, name
