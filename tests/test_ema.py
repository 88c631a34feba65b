"""train.ema_decay: an exponential moving average of the parameters, kept in the optimizer's state and evaluated
(train.eval_weights) by validation, test, the best epoch, `load` and the exports."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import TIMED, tiny_config

import jaxepochs
from jaxepochs.host.config import ConfigError, validate
from jaxepochs.sweep import grid as grid_lib

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


def test_the_average_is_the_decayed_mean_of_the_steps_and_is_what_is_evaluated(tmp_path):
    run = lambda name, extra: jaxepochs.train_and_evaluate(
        tiny_config({**FULL_BATCH_SGD, **extra}), tmp_path / name, quiet=True
    )
    p0 = run("start", {"train.epochs": "0"}).state.params  # evaluate only: the initial parameters
    plain = run("plain", {"train.epochs": "2", "checkpoint.every_epochs": "1"})
    kept = run("kept", {"train.epochs": "2", "train.ema_decay": "0.5", "train.eval_weights": "trained"})
    # Kept but not evaluated: training and evaluation are the plain run's, exactly.
    assert untimed(kept.history) == untimed(plain.history)
    p1 = jaxepochs.load(tmp_path / "plain", epoch=1).params
    p2 = plain.state.params
    average = jax.tree.map(lambda a, b, c: 0.25 * a + 0.25 * b + 0.5 * c, p0, p1, p2)  # 0.5 (0.5 p0 + 0.5 p1) + ...
    _close(kept.state.opt_state.ema, average)
    evaluated = run("ema", {"train.epochs": "2", "train.ema_decay": "0.5"})
    assert [r["train_loss"] for r in evaluated.history] == [r["train_loss"] for r in plain.history]
    assert evaluated.history[-1]["val_loss"] != plain.history[-1]["val_loss"]
    _close(jaxepochs.load(tmp_path / "ema").params, average)  # what load, predict and export take
    _close(jaxepochs.load(tmp_path / "ema", epoch="best").params, average)  # epoch 2 was the best


def test_the_average_resumes_bit_for_bit_and_sweeps_per_run(tmp_path):
    ema = {"train.ema_decay": "0.9", "train.epochs": "3"}
    whole = jaxepochs.train_and_evaluate(tiny_config(ema), tmp_path / "whole", quiet=True)
    jaxepochs.train_and_evaluate(tiny_config({**ema, "train.epochs": "1"}), tmp_path / "resumed", quiet=True)
    resumed = jaxepochs.train_and_evaluate(tiny_config(ema), tmp_path / "resumed", quiet=True)
    assert untimed(resumed.history) == untimed(whole.history)
    _close(resumed.state.opt_state.ema, whole.state.opt_state.ema, rtol=0)
    base = tiny_config(ema)
    swept = jaxepochs.sweep(base, grid_lib.expand(base, {"seed": "0,1"}), tmp_path / "sweep", quiet=True)
    for a, b in zip(untimed(whole.history), untimed(swept.histories["r0"]), strict=True):
        assert {k: pytest.approx(v, rel=1e-4) for k, v in a.items()} == {k: b[k] for k in a}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train.ema_decay": "1.0"}, r"train\.ema_decay.*decay in \(0, 1\)"),
        ({"train.eval_weights": "ema"}, r'"ema" with train\.ema_decay = 0.*Set train\.ema_decay'),
        ({"train.ema_decay": "0.99", "train.eval_weights": "eam"}, r'train\.eval_weights.*"ema"'),
        ({"train.ema_decay": "0.99", "optimizer.name": "schedule_free_adamw"}, r"average of its own"),
    ],
)
def test_bad_average_settings_name_the_key_and_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(tiny_config(overrides))
