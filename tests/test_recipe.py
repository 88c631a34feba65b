"""Issue #29: config.hparams (traced, sweepable as one program), custom labels, weighted means, optax optimizers."""

from __future__ import annotations

import json
import runpy
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

import jaxepochs
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import task as task_lib
from jaxepochs.data.loading import DataError
from jaxepochs.host import hooks as hooks_lib
from jaxepochs.host import setup
from jaxepochs.host.config import ConfigError
from jaxepochs.sweep import grid

TWO_HEADS = REPO / "experiments" / "two_heads.py"
MODULE = """
import numpy as np
import jax.numpy as jnp
import optax
import flax.linen as nn
from jaxepochs import base_config


def get_config():
    config = base_config()
    config.train.epochs = 1
    config.train.batch_size = 8
    config.mesh.data = 1
    return config


def get_model(config):
    return nn.Dense(3)


def get_data(config):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = {{"a": (x[:, 0] > 0).astype(np.int32), "b": x[:, :2]}}
    split = {{"x": x, "y": y, "weight": np.ones(40, np.float32)}}
    return {{"train": split, "test": split}}

{extra}
"""
LOSS = (
    "def loss_fn(outputs, batch):\n    return jnp.sum((outputs[:, :2] - batch['y']['b']) ** 2, -1), batch['weight']\n"
)


def _module(tmp_path, extra: str):
    path = tmp_path / "exp.py"
    path.write_text(MODULE.format(extra=textwrap.dedent(extra)))
    return jaxepochs.load_config_file(path)


def _compose(config):
    hooks = hooks_lib.load_hooks(config)
    dataset = setup.load_data(config, hooks, True)
    return setup.make_pieces(config, dataset, hooks, 5, True)


def test_hparams_are_known_keys_with_did_you_mean():
    config = jaxepochs.load_config_file(TWO_HEADS)
    assert jaxepochs.apply_overrides(config, {"hparams.parity_weight": "0.25"}).hparams.parity_weight == 0.25
    with pytest.raises(ConfigError, match='Did you mean "parity_weight"'):
        jaxepochs.apply_overrides(config, {"hparams.parity_wieght": "0.25"})
    assert json.loads(config.to_json_best_effort())["hparams"] == {"parity_weight": 0.5, "hidden": 64}
    assert config.task == "custom"  # its own loss_fn: no built-in label checks


def test_a_swept_loss_weight_is_one_program_and_a_width_is_not():
    config = jaxepochs.load_config_file(TWO_HEADS)
    static = grid.hparams_read_by_builders(config.to_dict(), hooks_lib.load_hooks(config))
    assert static == {"hidden"}  # get_model reads it: a width
    weights = grid.make_runs(config, grid.expand(config, {"hparams.parity_weight": "0.1,0.3,1.0"}))
    widths = grid.make_runs(config, grid.expand(config, {"hparams.hidden": "16,32"}))
    assert len(grid.group_runs(weights, static)) == 1 and len(grid.group_runs(widths, static)) == 2


def test_two_heads_sweep_trains_its_weights_in_one_program(tmp_path):
    config = jaxepochs.apply_overrides(jaxepochs.load_config_file(TWO_HEADS), {"train.epochs": "1"})
    runs = grid.expand(config, {"hparams.parity_weight": "0.1,1.0"})
    result = jaxepochs.sweep(config, runs, tmp_path / "sweep", quiet=True)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["programs"] == 1
    losses = [s["test_loss"] for s in result.summaries.values()]
    assert losses[0] < losses[1]  # the heavier parity weight adds more loss: each run got its own number


def test_dict_labels_and_extra_keys_reach_the_loss_and_wrong_forms_are_named(tmp_path):
    pieces = _compose(_module(tmp_path, LOSS))
    assert pieces.metric_names == ("loss", "loss/weight")  # a weighted loss
    with pytest.raises(ConfigError, match=r"more axes per example: reduce over them"):
        _compose(_module(tmp_path, "def loss_fn(outputs, batch):\n    return outputs\n"))
    bad = MODULE.replace('"b": x[:, :2]', '"b": x[:5, :2]')
    path = tmp_path / "bad.py"
    path.write_text(bad.format(extra=LOSS))
    with pytest.raises(DataError, match="disagree on the number of examples"):
        _compose(jaxepochs.load_config_file(path))
    with pytest.raises(ConfigError, match=r"get_optimizer in .* returned dict; return an optax.GradientTransformation"):
        _compose(_module(tmp_path, LOSS + "def get_optimizer(config):\n    return {}\n"))
    with pytest.raises(ConfigError, match=r"arguments swapped.*def augment\(key, batch\)"):
        _module_hooks = _module(tmp_path, LOSS + "def augment(batch, key):\n    return batch\n")
        hooks_lib.load_hooks(_module_hooks)


def test_weighted_means_are_sum_wv_over_sum_w():
    apply = lambda params, state, x, key, train: (x, state)
    loss = lambda outputs, batch: (outputs, batch["w"])
    metrics = lambda outputs, batch: {"m": (outputs * 2, batch["w"]), "plain": outputs}
    task = task_lib.make_task(apply, "custom", loss, metrics)
    batch = {"x": jnp.array([1.0, 2.0, 3.0, 4.0]), "y": jnp.zeros(4), "w": jnp.array([1.0, 3.0, 0.0, 5.0])}
    mask = jnp.array([True, True, True, False])
    mean, (m, _) = epoch_lib.loss_and_metrics(task, None, None, batch, None, True, mask)
    assert float(mean) == pytest.approx(7 / 4)  # (1 + 6) / (1 + 3): the padded row's weight is masked
    means = m.means("train")
    assert means == pytest.approx({"train_loss": 7 / 4, "train_m": 14 / 4, "train_plain": 2.0})


def test_class_weights_balanced_and_their_checks(make_config):
    loading = jaxepochs.data.loading
    dataset = loading.Dataset("d", loading.Split(np.zeros((4, 1)), np.array([0, 0, 0, 1])), None, None, 2)
    np.testing.assert_allclose(setup.class_weights("balanced", dataset), [4 / 6, 2.0])
    with pytest.raises(ConfigError, match="one weight per class"):
        setup.class_weights((1.0,), dataset)
    with pytest.raises(ConfigError, match="train.class_weight"):
        make_config({"task": "regression", "train.class_weight": "(1.0, 2.0)"})
    # An experiment's "balanced" can be turned off or replaced from the command line (it was the string 'None').
    balanced = jaxepochs.load_config_file(REPO / "experiments" / "imbalanced_class_weight.py")
    assert balanced.train.class_weight == "balanced"
    assert jaxepochs.apply_overrides(balanced, {"train.class_weight": "None"}).train.class_weight is None
    assert jaxepochs.apply_overrides(balanced, {"train.class_weight": "(1.0, 5.0)"}).train.class_weight == (1.0, 5.0)


@pytest.mark.parametrize("name", ["lion", "adafactor", "schedule_free_adamw"])
def test_optax_aliases_and_a_sweep_over_their_rate_stays_one_program(make_config, name):
    config = make_config({"optimizer.name": name, "optimizer.learning_rate": "1e-3"})
    runs = grid.make_runs(config, grid.expand(config, {"optimizer.learning_rate": "1e-3,3e-3"}))
    assert len(grid.group_runs(runs)) == 1
    tx, _ = setup.make_optimizer(config.optimizer, hooks_lib.Hooks(""), 10, 2)
    params = {"w": jnp.ones((3, 2))}
    updates, state = tx.update({"w": jnp.ones((3, 2))}, tx.init(params), params)
    assert jnp.all(updates["w"] < 0) and float(tx.learning_rate(state)) == pytest.approx(1e-3)


def test_rprop_steps_by_the_sign_from_the_learning_rate_as_its_first_step(make_config):
    """optimizer.name = "rprop" (Prechelt's optimizer, for full batches), optax's iRprop-: the first update only
    records the gradient (no sign to compare yet), the next steps the rate against the gradient's sign; a gradient
    of the same sign grows the step by 1.2, a flipped one halves it and skips that update and the next."""
    config = make_config({"optimizer.name": "rprop", "optimizer.learning_rate": "0.01"})
    tx, _ = setup.make_optimizer(config.optimizer, hooks_lib.Hooks(""), 1, 3)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    steps = []
    for g in ([3.0, -0.5], [0.1, -2.0], [0.2, -1.0], [-1.0, -1.0], [-1.0, -1.0]):
        updates, state = tx.update({"w": jnp.array(g)}, state, params)
        steps.append(np.asarray(updates["w"]))
    np.testing.assert_allclose(steps, [[0, 0], [-0.01, 0.01], [-0.012, 0.012], [0, 0.0144], [0, 0.01728]], rtol=1e-6)


def test_class_weights_find_more_of_the_rare_class(tmp_path):
    """experiments/imbalanced_class_weight.py, reduced to 5 epochs: "balanced" recalls more of the 5% positives
    than the unweighted loss, at some accuracy on the common class (the docstring's figures are for 30)."""
    config = jaxepochs.load_config_file(REPO / "experiments" / "imbalanced_class_weight.py")
    runs = {
        weight: jaxepochs.train_and_evaluate(
            jaxepochs.apply_overrides(config, {"train.epochs": "5", "train.class_weight": weight}),
            tmp_path / weight,
            quiet=True,
        ).summary
        for weight in ("balanced", "None")
    }
    assert runs["balanced"]["test_positive_recall"] > runs["None"]["test_positive_recall"] + 0.1
    assert runs["balanced"]["test_accuracy"] < runs["None"]["test_accuracy"]


def test_an_own_optax_chain_sweeps_its_rate_as_one_program(tmp_path):
    """experiments/own_optax_chain.py (clipping, Lion's direction, decay masked to the kernels), reduced to 3
    epochs: two learning rates in one program, each a run that learns (the docstring's 0.964 is for 20)."""
    config = jaxepochs.apply_overrides(
        jaxepochs.load_config_file(REPO / "experiments" / "own_optax_chain.py"), {"train.epochs": "3"}
    )
    runs = grid.expand(config, {"optimizer.learning_rate": "1e-3,3e-3"})
    result = jaxepochs.sweep(config, runs, tmp_path / "sweep", quiet=True)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["programs"] == 1
    accuracies = [s["test_accuracy"] for s in result.summaries.values()]
    assert min(accuracies) > 0.5 and accuracies[0] != accuracies[1]


def test_an_own_module_is_named_by_its_data_hook_and_model_class(tmp_path, monkeypatch, capsys):
    """Issue 29 item 6: summary.json, curves.png's title and `compare` name two_heads.get_data and TwoHeads, not
    the unused defaults (curves.png was titled "two_heads.get_data mlp")."""
    from jaxepochs import cli
    from jaxepochs.host import report

    titles = []
    real = report.plot_curves
    monkeypatch.setattr(report, "plot_curves", lambda history, path, title, *a: titles.append(title) or real(
        history, path, title, *a))  # fmt: skip
    config = jaxepochs.apply_overrides(jaxepochs.load_config_file(TWO_HEADS), {"train.epochs": "1"})
    summary = jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True).summary
    assert (summary["dataset"], summary["model"]) == ("two_heads.get_data", "TwoHeads")
    assert titles == ["two_heads.get_data TwoHeads"]
    assert cli.main(["compare", str(tmp_path / "run"), "--out", str(tmp_path / "cmp")]) == 0
    assert "| run | two_heads.get_data | TwoHeads |" in capsys.readouterr().out


def test_a_causal_lm_s_token_normalised_loss_is_the_summed_token_loss_over_the_token_count(tmp_path):
    """experiments/tiny_lm.py, reduced to 2 epochs: per-token labels [N, T] and a mask in the batch train as the
    task `custom`, it learns (below the tokens' frequencies' 2.55 nats), and the reported test_loss is the test
    split's summed token loss over its token count, recomputed here from the model's own predictions."""
    import optax

    path = REPO / "experiments" / "tiny_lm.py"
    small = {"train.epochs": "2", "hparams.d_model": "32", "hparams.layers": "1"}  # one narrow layer: a quick compile
    config = jaxepochs.apply_overrides(jaxepochs.load_config_file(path), small)
    summary = jaxepochs.train_and_evaluate(config, tmp_path / "lm", quiet=True).summary
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["task"] == "custom"
    assert summary["test_loss"] < 2.5
    test = runpy.run_path(str(path))["get_data"](config)["test"]
    logits = jaxepochs.load_model(tmp_path / "lm").predict(test["x"], batch_size=100)
    nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, test["y"]))
    assert summary["test_loss"] == pytest.approx((nll * test["mask"]).sum() / test["mask"].sum(), rel=1e-4)


ON_A_SUBSET = """
from {name} import *  # noqa: F403  (get_config, the model and get_model as shipped)
from {name} import get_data as all_of_digits


def get_data(config):
    part = lambda split, n: {{k: v[:n] for k, v in split.items()}}
    splits = all_of_digits(config)
    return {{"train": part(splits["train"], 640), "test": part(splits["test"], 160)}}
"""


@pytest.mark.parametrize(
    "name, reduced",
    [  # the NNX CNN's 32- and 64-channel convolutions run slowly unoptimised: XLA's defaults for it
        pytest.param("flax_mnist_nnx", {"train.epochs": "2", "train.batch_size": "32"}, marks=pytest.mark.optimized),
        ("flax_resnet_digits", {"train.epochs": "2", "train.batch_size": "32"}),
    ],
)
def test_the_flax_examples_models_train_as_their_authors_wrote_them(tmp_path, name, reduced):
    """Issue 29 item 5: the Flax mnist example's NNX CNN (`__call__(self, x, rngs)`, BatchNorm, Dropout) and the
    imagenet example's linen ResNet, as shipped experiments, on 640 of digits' training images for 2 epochs
    (XLA:CPU runs a convolution's kernel gradient inside the epoch's loop some 10x slower than outside one): they
    learn, and their BatchNorm statistics are the trainer's state, moved by training (the docstrings' figures are
    for the full runs)."""
    for module in (name, "digits_cnn"):
        (tmp_path / f"{module}.py").write_text((REPO / "experiments" / f"{module}.py").read_text())
    (tmp_path / "subset.py").write_text(ON_A_SUBSET.format(name=name))
    config = jaxepochs.apply_overrides(jaxepochs.load_config_file(tmp_path / "subset.py"), reduced)
    result = jaxepochs.train_and_evaluate(config, tmp_path / name, quiet=True)
    assert result.summary["test_accuracy"] > 0.5  # chance is 0.1
    means = [leaf for p, leaf in jax.tree_util.tree_leaves_with_path(result.state.model_state) if "mean" in str(p)]
    assert means and all(float(np.abs(np.asarray(m)).max()) > 0 for m in means)  # running means, updated


def test_the_resnet_with_the_example_s_axis_name_is_refused_with_the_fix_and_no_workdir(tmp_path):
    """The imagenet example's BatchNorm(axis_name="batch") put back: refused before compiling, naming the fix."""
    source = (REPO / "experiments" / "flax_resnet_digits.py").read_text()
    kept = source.replace('# axis_name="batch": dropped', 'axis_name="batch",  #')
    assert kept != source
    (tmp_path / "resnet_pmap.py").write_text(kept)
    (tmp_path / "digits_cnn.py").write_text((REPO / "experiments" / "digits_cnn.py").read_text())
    config = jaxepochs.load_config_file(tmp_path / "resnet_pmap.py")
    with pytest.raises(ConfigError, match=r"Drop the `axis_name`"):
        jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True)
    assert not (tmp_path / "w").exists()


def test_schedule_free_adamw_trains_at_the_trainer_s_rate_and_is_evaluated_at_its_average(tmp_path, make_config):
    """optimizer.name = "schedule_free_adamw" (issue 29 item 4): optax.contrib's updates at the trainer's rate
    (to float32 round-off: the betas are traced per run), and everything evaluated at its average x, not at the
    gradient point y it trains: validation, the final test metrics, the returned state and `jaxepochs.load`."""
    import optax

    from jaxepochs.core import optax_optim, optim
    from jaxepochs.data import loading

    spec = {**optim.OPTIMIZER_DEFAULTS, "name": "schedule_free_adamw", "learning_rate": 0.05,
            "weight_decay": 0.01, "schedule": dict(optim.SCHEDULE_DEFAULTS)}  # fmt: skip
    tx, ref = optax_optim.make(spec, 10, 3), optax.contrib.schedule_free_adamw(0.05, weight_decay=0.01)
    params = ours = {"w": jnp.arange(3.0), "b": jnp.ones(2)}
    state, ref_state = tx.init(params), ref.init(params)
    for step in range(5):
        grads = lambda p, step=step: jax.tree.map(lambda a: jnp.sin(a * (step + 1)), p)
        updates, state = tx.update(grads(ours), state, ours)
        ours = optax.apply_updates(ours, updates)
        ref_updates, ref_state = ref.update(grads(params), ref_state, params)
        params = optax.apply_updates(params, ref_updates)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    jax.tree.map(close, ours, params)
    jax.tree.map(close, tx.eval_params(state, ours), optax.contrib.schedule_free_eval_params(ref_state, params))

    config = make_config({"optimizer.name": "schedule_free_adamw", "train.epochs": "3"})
    result = jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True)
    loaded = jaxepochs.load(tmp_path / "run")
    for x, returned in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(returned))
    b1 = float(loaded.opt_state.hparams.b1)
    trained_y = jax.tree.map(lambda x, z: b1 * x + (1 - b1) * z, loaded.params, loaded.opt_state.inner.z)
    test = loading.load_dataset(config, quiet=True).test
    model = jaxepochs.load_model(tmp_path / "run")
    loss = lambda logits: float(optax.softmax_cross_entropy_with_integer_labels(logits, test.y).mean())
    at_x = loss(model.predict(test.x))
    assert result.summary["test_loss"] == pytest.approx(at_x, rel=1e-5)
    at_y = loss(model.inference_fn({"params": trained_y, "model_state": loaded.model_state}, test.x))
    assert abs(at_y - at_x) > 1e-3  # y, the point it trains at, is another model: not the one reported
    streamed = jaxepochs.train_and_evaluate(
        make_config({"optimizer.name": "schedule_free_adamw", "train.epochs": "3", "data.stream": "True"}),
        tmp_path / "streamed",
        quiet=True,
    )
    assert streamed.summary["test_loss"] == pytest.approx(result.summary["test_loss"], rel=1e-4)
