"""checkpoint.keep_best: a run's k best epochs' checkpoints, kept beside the latest."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_config

import jaxepochs

NOISY = {"optimizer.learning_rate": "0.3", "checkpoint.every_epochs": "1", "checkpoint.max_to_keep": "2"}


def _kept(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _expected(history: list[dict], k: int, latest: int) -> list[int]:
    losses = {row["epoch"]: row["val_loss"] for row in history}
    return sorted({*sorted(losses, key=losses.get)[:k], *sorted(losses)[-latest:]})


def test_the_k_best_epochs_are_kept_beside_the_latest_across_a_resume_and_load_reads_them(tmp_path):
    config = tiny_config({**NOISY, "train.epochs": "7", "checkpoint.keep_best": "2"})
    first = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    assert _kept(tmp_path) == _expected(first.history, 2, 2)
    assert len(_kept(tmp_path)) > 2  # the noisy rate's best epochs are not its last two (else the test says little)
    longer = jaxepochs.apply_overrides(config, {"train.epochs": "10"})
    resumed = jaxepochs.train_and_evaluate(longer, tmp_path, quiet=True)  # the ranking continues from disk
    assert _kept(tmp_path) == _expected(resumed.history, 2, 2)
    best = min(resumed.history, key=lambda row: row["val_loss"])["epoch"]
    at_best = jaxepochs.load(tmp_path, best)
    assert int(at_best.step) == best * resumed.summary["steps_per_epoch"]
    best_params = jaxepochs.load(tmp_path, "best").params
    for got, want in zip(jax.tree.leaves(at_best.params), jax.tree.leaves(best_params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # the best epoch's, both ways


def test_keep_best_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(jaxepochs.ConfigError, match="keep_best >= 0"):
        tiny_config({"checkpoint.keep_best": "-1"})
    with pytest.raises(jaxepochs.SweepError, match="Set checkpoint.keep_best = 0 for a sweep"):
        jaxepochs.sweep(tiny_config({"checkpoint.keep_best": "2"}), [{"seed": "0"}], tmp_path / "sweep", quiet=True)
    assert not (tmp_path / "sweep").exists()
