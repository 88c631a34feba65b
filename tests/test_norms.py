"""logging.norms: each epoch's mean over its steps of the gradient's, the update's and the parameters' global norms,
computed inside the step, the same in a device-resident, a streamed and a swept run."""

from __future__ import annotations

import optax
import pytest
from conftest import TIMED, tiny_config

import jaxepochs
from jaxepochs.sweep import grid as grid_lib

NORMS = ("train_grad_norm", "train_update_norm", "train_param_norm", "train_update_ratio", "train_grad_norm_max")
untimed = lambda rows: [{k: v for k, v in row.items() if k not in TIMED} for row in rows]


def test_one_full_batch_step_logs_its_gradient_update_and_parameter_norms(tmp_path):
    """One step an epoch (the batch is the training split) with plain SGD: the update is -rate * gradient, so its
    norm is rate times the gradient's, the parameters' norm is the trained parameters', the ratio is the update's
    over the initial parameters', and the largest gradient norm of one step is its norm."""
    sgd = {"optimizer.name": "sgd", "optimizer.momentum": "0", "optimizer.learning_rate": "0.5"}
    config = tiny_config({**sgd, "train.batch_size": "3600", "train.epochs": "1", "logging.norms": "True"})
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    (row,) = result.history
    assert row["steps"] == 1 and row["train_grad_norm"] > 0
    assert row["train_update_norm"] == pytest.approx(0.5 * row["train_grad_norm"], rel=1e-5)
    assert row["train_param_norm"] == pytest.approx(float(optax.global_norm(result.state.params)), rel=1e-5)
    initial = jaxepochs.train_and_evaluate(jaxepochs.apply_overrides(config, {"train.epochs": "0"}), tmp_path / "0")
    p0 = float(optax.global_norm(initial.state.params))
    assert row["train_update_ratio"] == pytest.approx(row["train_update_norm"] / p0, rel=1e-5)
    assert row["train_grad_norm_max"] == row["train_grad_norm"]


def test_norms_change_nothing_else_and_are_the_same_streamed_and_swept(tmp_path):
    norms = {"logging.norms": "True", "train.epochs": "2"}
    off = jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "2"}), tmp_path / "off", quiet=True)
    on = jaxepochs.train_and_evaluate(tiny_config(norms), tmp_path / "on", quiet=True)
    for row_off, row_on in zip(untimed(off.history), untimed(on.history), strict=True):
        assert set(row_on) - set(row_off) == set(NORMS)
        assert {k: pytest.approx(v, rel=1e-6) for k, v in row_off.items()} == {k: row_on[k] for k in row_off}
    grad, update, param, ratio, grad_max = (on.history[1][name] for name in NORMS)
    assert grad > 0 and 0 < update < param  # Adam's steps: about the rate times sqrt(parameters) each
    assert 0 < ratio < 1 and grad_max > grad  # 57 steps: the largest above the mean
    # metrics.csv and TensorBoard take the new fields as any other
    assert "train_grad_norm" in (tmp_path / "on" / "metrics.csv").read_text().splitlines()[0]
    streamed = jaxepochs.train_and_evaluate(
        tiny_config({**norms, "data.stream": "True", "train.steps_per_call": "8"}), tmp_path / "streamed", quiet=True
    )
    base = tiny_config(norms)
    swept = jaxepochs.sweep(base, grid_lib.expand(base, {"seed": "0,1"}), tmp_path / "sweep", quiet=True)
    for other in (untimed(streamed.history), untimed(swept.histories["r0"])):
        for a, b in zip(untimed(on.history), other, strict=True):
            assert {k: pytest.approx(v, rel=1e-4) for k, v in a.items()} == {k: b[k] for k in a}
    assert swept.histories["r1"][0]["train_grad_norm"] != swept.histories["r0"][0]["train_grad_norm"]


def test_layer_norms_are_each_top_level_group_s(tmp_path):
    """The default MLP's groups Dense_0 (hidden) and Dense_1 (head): their norms' squares add up to the global
    norms' (each step, so their means nearly do; a full batch's one step exactly)."""
    config = tiny_config({"train.batch_size": "3600", "train.epochs": "1", "logging.norms": "True",
                          "logging.layer_norms": "True"})  # fmt: skip
    (row,) = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True).history
    for kind in ("grad", "param"):
        layers = [row[f"train_{kind}_norm_Dense_{i}"] for i in (0, 1)]
        assert sum(n**2 for n in layers) == pytest.approx(row[f"train_{kind}_norm"] ** 2, rel=1e-5)
