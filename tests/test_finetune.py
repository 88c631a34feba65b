"""Fine-tuning's groups inside the compiled program: frozen groups bitwise unchanged, gradual unfreezing driven by
the epoch (no recompile; a resumed run continues exactly), per-layer rates, and the errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import EXPERIMENT, REPO, TIMED, tiny_config

import jaxepochs

GROUPS = ("Dense_0", "Dense_1")  # tiny_config's MLP: one hidden layer and the head, bottom to top


def _run(tmp_path, name: str, overrides: dict):
    return jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path / name, quiet=True)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_a_frozen_group_is_bitwise_unchanged_and_its_moments_stay_zero(tmp_path):
    start = _run(tmp_path, "start", {"train.epochs": "0"})
    frozen = _run(tmp_path, "frozen", {"finetune.freeze": "('Dense_0',)"})
    assert _same(frozen.state.params["Dense_0"], start.state.params["Dense_0"])
    assert not _same(frozen.state.params["Dense_1"], start.state.params["Dense_1"])
    moments = frozen.state.opt_state
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves((moments.mu["Dense_0"], moments.nu["Dense_0"])))
    steps = frozen.history[-1]["steps"]  # Dense_1's updates: its bias correction counts them, Dense_0's none
    assert list(np.asarray(moments.groups.b1_power)) == [1.0, pytest.approx(0.9**steps, rel=1e-4)]


def test_gradual_unfreezing_follows_the_epoch_without_recompiling_and_resumes_exactly(tmp_path, compile_counter):
    gradual = {"train.epochs": "3", "finetune.unfreeze_epochs": "(3, 1)", "checkpoint.every_epochs": "1"}
    counts = []
    for name, unfreeze in (("all", "(1, 1)"), ("gradual", "(3, 1)")):
        with compile_counter() as counter:
            _run(tmp_path, name, {**gradual, "finetune.unfreeze_epochs": unfreeze, "train.epochs_per_call": "1"})
        counts.append(counter.count)
    assert counts[0] == counts[1]  # Dense_0 unfreezing at epoch 3 compiled nothing more
    start = _run(tmp_path, "start", {"train.epochs": "0"})
    whole = _run(tmp_path, "whole", gradual)
    for epoch, unchanged in ((1, True), (2, True), (3, False)):
        state = jaxepochs.load(tmp_path / "whole", epoch=epoch)
        assert _same(state.params["Dense_0"], start.state.params["Dense_0"]) == unchanged, epoch
    # A run stopped after epoch 2 (its later checkpoints gone) resumes through the unfreezing epoch exactly.
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    (tmp_path / "resumed" / "summary.json").unlink()
    resumed = _run(tmp_path, "resumed", gradual)
    assert _same(resumed.state, whole.state)


def test_layer_decay_scales_each_group_s_rate_from_the_top(tmp_path):
    one_step = {"train.epochs": "1", "train.batch_size": "3600", "optimizer.name": "sgd", "optimizer.momentum": "0"}
    start = _run(tmp_path, "start", {**one_step, "train.epochs": "0"})
    plain = _run(tmp_path, "plain", one_step)
    decayed = _run(tmp_path, "decayed", {**one_step, "optimizer.layer_decay": "0.5"})
    moved = lambda run, group: np.asarray(run.state.params[group]["kernel"] - start.state.params[group]["kernel"])
    assert np.array_equal(moved(decayed, "Dense_1"), moved(plain, "Dense_1"))  # the top: lr itself
    # Half the step below it, up to the rounding of parameter + step (a few ulps of the parameters, ~0.1).
    np.testing.assert_allclose(moved(decayed, "Dense_0"), 0.5 * moved(plain, "Dense_0"), rtol=1e-3, atol=3e-8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"finetune.freeze": "('Conv_0',)"},
            "names 'Conv_0', which is not a group of the model. Its groups, bottom to top: Dense_0, Dense_1",
        ),  # fmt: skip
        ({"finetune.unfreeze_epochs": "(1,)"}, "gives 1 values for the model's 2 groups"),
        ({"finetune.rate_scales": "(1.0, 2.0, 3.0)"}, "rate_scales = \\(1.0, 2.0, 3.0\\) gives 3 values"),
        ({"finetune.rate_scales": "(0.5, 1.0)", "optimizer.layer_decay": "0.5"}, "with optimizer.layer_decay"),
        ({"finetune.groups": "('a=Dense_0/*',)"}, "which nothing uses"),
        ({"finetune.groups": "('Dense_0/*',)", "finetune.freeze": "('a',)"}, 'is not "name=pattern'),
        (
            {"finetune.groups": "('a=Dense_0/*', 'b=Conv_*')", "finetune.freeze": "('a',)"},
            "group 'b''s pattern 'Conv_\\*' matches no parameter. The model's parameters: Dense_0/bias, Dense_0/kernel",
        ),  # fmt: skip
        (
            {"finetune.groups": "('a=Dense_0/*',)", "finetune.freeze": "('a',)"},
            "Dense_1/bias, Dense_1/kernel in no group",
        ),
        ({"finetune.unfreeze_epochs": "(1, 2)"}, "Dense_0 unfreezes \\(epoch 1\\) before Dense_1 above it"),
        ({"finetune.unfreeze_epochs": "(5, 1)"}, "each must be an epoch of the run, 1 to train.epochs = 2"),
        ({"optimizer.layer_decay": "1.5"}, r"optimizer.layer_decay = 1.5. Use a factor in \(0, 1\]"),
        ({"optimizer.layer_decay": "0.0"}, r"optimizer.layer_decay = 0.0"),
    ],
)
def test_groups_that_do_not_fit_are_refused_before_the_workdir(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, "run", overrides)
    assert not (tmp_path / "run").exists()


def test_unfreezing_epochs_sweep_as_one_program_and_equal_their_solo_runs(tmp_path):
    from jaxepochs.sweep import grid as grid_lib

    base = tiny_config({"train.epochs": "3", "finetune.unfreeze_epochs": "(1, 1)"})
    grid = grid_lib.expand(base, {"finetune.unfreeze_epochs": "(3, 1),(2, 1)", "optimizer.layer_decay": "1.0,0.5"})
    assert len(grid_lib.group_runs(grid_lib.make_runs(base, grid))) == 1  # one compiled program for the four
    result = jaxepochs.sweep(base, grid, tmp_path / "sweep", quiet=True, chunk=4)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate")
    table = lambda rows: np.array([[row[k] for k in keys] for row in rows])
    for run, values in zip(sorted(result.histories), grid, strict=True):
        alone = _run(tmp_path, run, {"train.epochs": "3", **values})
        # Equal to float32 round-off: on the tests' two devices XLA may sum a batch of runs' evaluation in
        # another order than one run's (README, "Sweeps in one program").
        np.testing.assert_allclose(table(result.histories[run]), table(alone.history), rtol=1e-6, err_msg=run)
    curves = [table(result.histories[run]).tobytes() for run in sorted(result.histories)]
    assert len(set(curves)) == 4  # each unfreezing schedule and decay trained its own way
    late = next(
        r for r, v in zip(sorted(result.histories), grid, strict=True) if v["finetune.unfreeze_epochs"] == "(3, 1)"
    )
    assert [row["learning_rate/Dense_0"] for row in result.histories[late]][:2] == [0.0, 0.0]
    with pytest.raises(ValueError, match="Dense_0 unfreezes"):
        jaxepochs.sweep(base, [{"finetune.unfreeze_epochs": "(1, 3)"}], tmp_path / "bad", quiet=True)


def test_groups_by_path_pattern_freeze_what_they_match_and_log_each_group_s_rate(tmp_path):
    start = _run(tmp_path, "start", {"train.epochs": "0"})
    by_pattern = {"finetune.groups": "('body=Dense_0/*', 'head=*')", "finetune.freeze": "('body',)"}
    by_module = _run(tmp_path, "module", {"finetune.freeze": "('Dense_0',)"})
    assert _same(_run(tmp_path, "pattern", by_pattern).state, by_module.state)  # first match wins: head = Dense_1
    kernels = _run(tmp_path, "kernels", {"finetune.groups": "('kernels=*/kernel', 'biases=*/bias')",
                                         "finetune.freeze": "('kernels',)"})  # fmt: skip
    for layer in GROUPS:
        assert np.array_equal(kernels.state.params[layer]["kernel"], start.state.params[layer]["kernel"])
        assert not np.array_equal(kernels.state.params[layer]["bias"], start.state.params[layer]["bias"])
    decayed = _run(tmp_path, "decayed", {"finetune.unfreeze_epochs": "(2, 1)", "optimizer.layer_decay": "0.5"})
    first, second = decayed.history
    assert (first["learning_rate/Dense_0"], first["learning_rate/Dense_1"]) == (0.0, first["learning_rate"])
    assert second["learning_rate/Dense_0"] == pytest.approx(0.5 * second["learning_rate"], rel=1e-7)
    assert kernels.history[-1]["learning_rate/kernels"] == 0.0  # frozen throughout
    # Explicit multipliers are the same optimizer as the layer decay that gives them.
    scaled = _run(tmp_path, "scaled", {"finetune.unfreeze_epochs": "(2, 1)", "finetune.rate_scales": "(0.5, 1.0)"})
    timeless = lambda history: [{k: v for k, v in row.items() if k not in TIMED} for row in history]
    assert _same(scaled.state.params, decayed.state.params) and timeless(scaled.history) == timeless(decayed.history)


# The CLI's experiment with these overrides is tiny_config's (as in test_resume.py), unfreezing Dense_0 at
# epoch 8 of 12 at half the head's rate; a checkpoint every epoch (about 0.15 s each) leaves time to kill it.
KILLED = {"model.hidden_sizes": "(16,)", "model.residual": "False", "train.batch_size": "64", "mesh.data": "1",
          "train.epochs": "12", "finetune.unfreeze_epochs": "(8, 1)", "optimizer.layer_decay": "0.5"}  # fmt: skip


def test_sigkill_before_an_unfreezing_epoch_then_resume_ends_bitwise_where_the_uninterrupted_run_does(
    tmp_path, jax_compilation_cache
):
    workdir, log = tmp_path / "killed", tmp_path / "killed.stderr"
    command = [sys.executable, "-m", "jaxepochs.cli", "run", "--config", str(EXPERIMENT), "--workdir", str(workdir)]
    command += ["--quiet", *(f"--config.{k}={v}" for k, v in {**KILLED, "checkpoint.every_epochs": "1"}.items())]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(jax_compilation_cache)}
    with log.open("w") as stderr:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    saved = lambda: sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.name.isdigit())
    deadline = time.monotonic() + 120
    while len(saved()) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-2000:]
    assert 2 <= max(saved()) < 8  # killed before Dense_0 unfreezes: the resume crosses epoch 8
    resumed = _run(tmp_path, "killed", KILLED)
    whole = _run(tmp_path, "whole", KILLED)
    assert _same(resumed.state, whole.state)
    untimed = lambda history: [{k: v for k, v in row.items() if k not in TIMED} for row in history]
    assert untimed(resumed.history) == untimed(whole.history)
    assert resumed.history[7]["learning_rate/Dense_0"] > 0 == resumed.history[6]["learning_rate/Dense_0"]
