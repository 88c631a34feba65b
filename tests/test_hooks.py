"""Users' own experiments: a module's model (linen or NNX), loss, metrics, data and augmentation; the tasks; and
the errors a module's hooks meet before anything compiles."""

from __future__ import annotations

import json
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO, TIMED

import jaxepochs
from jaxepochs.data.loading import DataError
from jaxepochs.host import report
from jaxepochs.host.config import ConfigError

EXPERIMENTS = REPO / "experiments"
UNTIMED = lambda rows: [{k: v for k, v in row.items() if k not in TIMED} for row in rows]  # noqa: E731

MODULE = """
import numpy as np
import jaxepochs


def get_config():
    config = jaxepochs.base_config()
    config.model.hidden_sizes = (8,)
    config.train.epochs = 2
    config.train.batch_size = 16
{config}
    return config


def get_data(config):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
{data}
    return {{"train": {{"x": x[:64], "y": y[:64]}}, "test": {{"x": x[64:], "y": y[64:]}}}}
{extra}
"""


def _module(tmp_path, config: str = "", data: str = "", extra: str = "", name: str = "exp.py"):
    path = tmp_path / name
    indent = lambda text: textwrap.indent(textwrap.dedent(text).strip("\n"), "    ") if text else ""
    path.write_text(MODULE.format(config=indent(config), data=indent(data), extra=textwrap.dedent(extra)))
    return path


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_nnx_model_trains_loads_and_sweeps_as_its_runs(tmp_path):
    # mesh.data = 1: the run on one device, as each sweep member runs (split over two, its sums round otherwise).
    overrides = {"train.epochs": "3", "mesh.data": "1"}
    config = jaxepochs.apply_overrides(jaxepochs.load_config_file(EXPERIMENTS / "wine_nnx.py"), overrides)
    result = jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True)
    assert len(result.history) == 3 and result.summary["test_accuracy"] > 0.6
    assert result.summary["model"] == "WineNet"
    loaded = jaxepochs.load(tmp_path / "run")
    _same(loaded.params, result.state.params)
    _same(loaded.model_state, result.state.model_state)  # BatchNorm's statistics, restored
    swept = jaxepochs.sweep(config, [{"seed": "0"}, {"seed": "1"}], tmp_path / "sweep", quiet=True, chunk=1)
    assert UNTIMED(swept.histories["r0"]) == UNTIMED(result.history)  # a chunk of one: the run's program
    assert UNTIMED(swept.histories["r1"]) != UNTIMED(result.history)  # another seed: other parameters


DIGITS_FIFTH = """
from digits_cnn import DigitsCNN, augment, get_config, get_model  # noqa: F401
from digits_cnn import get_data as all_of_digits


def get_data(config):
    fifth = lambda split, n: {k: v[:n] for k, v in split.items()}
    splits = all_of_digits(config)
    return {"train": fifth(splits["train"], 80), "test": fifth(splits["test"], 40)}
"""


def test_batchnorm_dropout_and_augmentation_resume_exactly(tmp_path):
    """digits_cnn: BatchNorm's statistics in the state, Dropout and the random shift keyed from the step; 2 epochs
    at once equal 1 then 1 more after a resume, bit for bit. On a fifth of its data: XLA:CPU runs a convolution's
    kernel gradient inside the epoch's loop some 10x slower than outside one, and the test is about the state. On 80
    examples in batches of 32 (the last one partial), unoptimised: 20 s against 41 s optimised on 320."""
    (tmp_path / "digits_cnn.py").write_text((EXPERIMENTS / "digits_cnn.py").read_text())
    (tmp_path / "fifth.py").write_text(DIGITS_FIFTH)
    base = jaxepochs.load_config_file(tmp_path / "fifth.py")
    # One device: the mesh has tests of its own, and partitioning a CNN over two devices doubles its compile.
    short = {"train.batch_size": "32", "checkpoint.every_epochs": "1", "mesh.data": "1"}
    whole = jaxepochs.train_and_evaluate(
        jaxepochs.apply_overrides(base, {**short, "train.epochs": "2"}), tmp_path / "whole", quiet=True
    )
    jaxepochs.train_and_evaluate(
        jaxepochs.apply_overrides(base, {**short, "train.epochs": "1"}), tmp_path / "resumed", quiet=True
    )
    resumed = jaxepochs.train_and_evaluate(
        jaxepochs.apply_overrides(base, {**short, "train.epochs": "2"}), tmp_path / "resumed", quiet=True
    )
    assert UNTIMED(resumed.history) == UNTIMED(whole.history)
    _same(resumed.state, whole.state)
    stats = whole.state.model_state["batch_stats"]
    assert float(np.abs(np.asarray(stats["BatchNorm_0"]["mean"])).max()) > 0  # updated by training
    # Streamed, the same run to round-off (issue 28, item 7: with biases before BatchNorm, which Adam moved by
    # round-off alone, val_loss parted by 1e-2 after 2 epochs and the conv biases by 1e-2).
    stream = {**short, "train.epochs": "2", "data.stream": "True", "train.steps_per_call": "4"}
    streamed = jaxepochs.train_and_evaluate(jaxepochs.apply_overrides(base, stream), tmp_path / "streamed", quiet=True)
    assert streamed.summary["streamed"] and not whole.summary["streamed"]
    for a, b in zip(UNTIMED(whole.history), UNTIMED(streamed.history), strict=True):
        assert {k: pytest.approx(v, rel=1e-4) for k, v in a.items()} == {k: b[k] for k in a}
    for a, b in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(streamed.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)


def test_regression_task_logs_mse_and_mae_and_stops_on_val_mae(tmp_path):
    overrides = {"train.epochs": "40", "early_stopping.patience": "3"}
    config = jaxepochs.apply_overrides(jaxepochs.load_config_file(EXPERIMENTS / "diabetes_regression.py"), overrides)
    result = jaxepochs.train_and_evaluate(config, tmp_path, quiet=True)
    row = result.history[0]
    assert {"train_loss", "train_mae", "train_mse", "val_loss", "val_mae", "val_mse"} <= set(row)
    assert row["train_loss"] == pytest.approx(row["train_mse"], rel=1e-5)
    summary = result.summary
    assert summary["best_epoch_metric"] == "val_mae" and summary["stop_reason"] == "patience"
    line = report.format_row(row)  # the progress line: every metric
    assert all(f"{key} " in line for key in ("train_mae", "train_mse", "val_mae", "val_mse"))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert 0.3 < summary["test_mae"] < 0.6  # predicting the mean: 0.59


def test_binary_task_and_a_module_of_its_own_loss_and_metrics(tmp_path):
    binary = _module(tmp_path, config='config.task = "binary"\nconfig.train.epochs = 20', name="binary.py")
    result = jaxepochs.train_and_evaluate(jaxepochs.load_config_file(binary), tmp_path / "binary", quiet=True)
    assert result.summary["test_accuracy"] > 0.8
    own = _module(
        tmp_path,
        config='config.early_stopping.enabled = True\nconfig.early_stopping.monitor = "val_margin"\n'
        'config.early_stopping.mode = "max"',
        extra="""
        import jax.numpy as jnp

        def loss_fn(outputs, batch):
            return jnp.mean((outputs - jnp.eye(outputs.shape[-1])[batch["y"]]) ** 2, axis=-1)

        def metrics_fn(outputs, batch):
            return {"margin": jnp.take_along_axis(outputs, batch["y"][:, None], 1)[:, 0] - outputs.mean(-1)}
        """,
        name="own.py",
    )
    result = jaxepochs.train_and_evaluate(jaxepochs.load_config_file(own), tmp_path / "own", quiet=True)
    assert {"train_margin", "val_margin", "test_margin"} <= set(result.history[0]) | set(result.summary)
    assert "train_accuracy" not in result.history[0]  # the module's metrics replace the task's
    assert result.summary["best_epoch_metric"] == "val_margin"


def test_config_json_records_the_module_and_a_changed_module_is_said(tmp_path):
    path = _module(tmp_path)
    jaxepochs.train_and_evaluate(jaxepochs.load_config_file(path), tmp_path / "run", quiet=True)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["experiment"]
    assert recorded["module"] == str(path.resolve()) and len(recorded["source_sha256"]) == 64
    path.write_text(path.read_text() + "\n# an edit\n")
    config = jaxepochs.apply_overrides(jaxepochs.load_config_file(path), {"train.epochs": "3"})
    with pytest.warns(UserWarning, match="changed since the run"):
        jaxepochs.train_and_evaluate(config, tmp_path / "run", quiet=True)


def test_a_misnamed_hook_is_said(tmp_path):
    path = _module(tmp_path, extra="def get_modle(config):\n    return None\n")
    with pytest.warns(UserWarning, match='get_modle.*Did you mean "get_model"') as caught:
        jaxepochs.train_and_evaluate(jaxepochs.load_config_file(path), tmp_path / "run", quiet=True)
    assert sum("get_modle" in str(w.message) for w in caught) == 1  # said once, not per epoch


AXIS_NAME_MODEL = """
import flax.linen as nn

class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, axis_name="batch")(nn.Dense(8, use_bias=False)(x))
        return nn.Dense(2)(x)

def get_model(config):
    return Net()
"""

CALL_WITH = """
import flax.linen as nn

class Net(nn.Module):
    @nn.compact
    def __call__(self, x, {args}):
        return nn.Dense(2)(x)

def get_model(config):
    return Net()
"""

NOISE_MODEL = """
import flax.linen as nn
import jax

class Noisy(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        if train:  # a stream of the model's own, as a VAE's sampling or noise injection asks
            x = x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)
        return nn.Dense(2)(x)

def get_model(config):
    return Noisy()
"""

BAD_HOOKS = [
    (
        "",
        "",
        "import jax.numpy as jnp\ndef loss_fn(outputs, batch):\n    return jnp.mean(outputs)\n",
        ConfigError,
        r"loss_fn in .*exp\.py returned \(\) for a batch of 2; it must return the per-example loss \[B\]",
    ),
    (
        "",
        "",
        "def metrics_fn(outputs, batch):\n    return {'width': outputs.shape[-1] * 1.0}\n",
        ConfigError,
        r'metric "width" is .* give its per-example values \[B\]',
    ),
    ("", "", "def get_model():\n    return None\n", ConfigError, r"cannot be called as get_model\(config\)"),
    ("", "", "def augment(batch):\n    return batch\n", ConfigError, r"cannot be called as augment\(key, batch\)"),
    ("", "y = y.astype(np.float32)", "", DataError, r'not integer class ids.*config\.task = "regression"'),
    ('config.task = "regression"', "", "", DataError, r'task "regression" takes float targets'),
    ("", "x[3, 1] = np.nan", "", DataError, r"inputs contain NaN or inf"),
    ("", "y = y[:-1]", "", DataError, r"test split: 32 inputs but 31 labels"),
    (
        'config.task = "regression"',
        "y = np.stack([x[:, 0]] * 3, 1)",
        "import flax.linen as nn\n\ndef get_model(config):\n    return nn.Dense(2)\n",
        ConfigError,
        r"task \"regression\" cannot take the model's outputs \(2, 2\) and labels \(2, 3\)",
    ),
    (  # Keras's name for the flag: with its default, dropout would never drop (issue 29)
        "",
        "",
        CALL_WITH.format(args="training: bool = False"),
        ConfigError,
        r"Net\.__call__ takes `training`, which the trainer does not pass\. Name the training flag `train`",
    ),
    (
        "",
        "",
        CALL_WITH.format(args="mask"),
        ConfigError,
        r"Net\.__call__ requires `mask`, which the trainer does not pass: it calls model\(x\)",
    ),
    (  # the Flax imagenet ResNet's BatchNorm: the named axis exists only under pmap (issue 29)
        "",
        "",
        AXIS_NAME_MODEL,
        ConfigError,
        r"get_model in .*exp\.py cannot take inputs of shape \(2, 5\) \(training\): Found an unbound axis name: "
        r"batch\. Drop the `axis_name`",
    ),
]


@pytest.mark.parametrize(("config", "data", "extra", "error", "match"), BAD_HOOKS)
def test_bad_hooks_and_data_name_the_hook_and_the_fix(tmp_path, config, data, extra, error, match):
    path = _module(tmp_path, config=config, data=data, extra=extra)
    with pytest.raises(error, match=match):
        jaxepochs.train_and_evaluate(jaxepochs.load_config_file(path), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # nothing written, nothing compiled


def test_a_linen_model_s_own_random_stream_is_keyed_from_the_step(tmp_path):
    """`self.make_rng("noise")` draws a key (issue 29: a traceback before), a new one each step (the loss differs
    from the same model's without noise), and the run repeats itself bit for bit."""
    noisy = jaxepochs.load_config_file(_module(tmp_path, extra=NOISE_MODEL, name="noisy.py"))
    runs = [jaxepochs.train_and_evaluate(noisy, tmp_path / name, quiet=True) for name in ("a", "b")]
    assert UNTIMED(runs[0].history) == UNTIMED(runs[1].history)
    quiet = NOISE_MODEL.replace("if train:", "if False:")
    plain = jaxepochs.load_config_file(_module(tmp_path, extra=quiet, name="plain.py"))
    plain_run = jaxepochs.train_and_evaluate(plain, tmp_path / "plain", quiet=True)
    assert runs[0].history[0]["train_loss"] != plain_run.history[0]["train_loss"]
    assert runs[0].summary["test_loss"] != plain_run.summary["test_loss"]  # trained on other inputs


FLAX_MNIST_STYLE = """
import jax
from flax import nnx

class Net(nnx.Module):  # as the Flax mnist NNX example writes its CNN: __call__ takes the rngs
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 8, use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)
        self.rngs = rngs

    def __call__(self, x, rngs: nnx.Rngs):  # required, as the issue met it
        h = self.dropout(nnx.relu(self.norm(self.hidden(x))), rngs=rngs)
        return self.out(h) + 0.1 * jax.random.normal(self.rngs.noise(), (2,))  # a stream of its own

def get_model(config):
    return Net(nnx.Rngs(config.seed, noise=config.seed + 1))
"""


def test_an_nnx_model_that_takes_rngs_gets_the_step_s_keys_for_every_stream(tmp_path):
    """The Flax mnist example's `__call__(self, x, rngs)` (issue 29: refused before) gets the step's keys, and a
    stream of the module's own (`nnx.Rngs(seed, noise=...)`) draws a new key each step, not its first again."""
    from jaxepochs.host import hooks, seam

    config = jaxepochs.load_config_file(_module(tmp_path, extra=FLAX_MNIST_STYLE, name="flax_mnist_style.py"))
    runs = [jaxepochs.train_and_evaluate(config, tmp_path / name, quiet=True) for name in ("a", "b")]
    assert UNTIMED(runs[0].history) == UNTIMED(runs[1].history)  # keyed from the step: it repeats itself
    no_dropout = FLAX_MNIST_STYLE.replace("nnx.Dropout(0.5", "nnx.Dropout(0.0")  # the noise stream alone
    config = jaxepochs.load_config_file(_module(tmp_path, extra=no_dropout, name="noise_only.py"))
    source = seam.model_source(config, 2, hooks.load_hooks(config))
    params, model_state, _ = source.init(config, np.zeros((1, 5), np.float32))
    x = np.ones((4, 5), np.float32)
    out = lambda key, train: np.asarray(source.apply(params, model_state, x, key, train)[0])
    step_1, step_2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    assert not np.allclose(out(step_1, True), out(step_2, True))  # the own stream follows the step's key
    np.testing.assert_array_equal(out(step_1, True), out(step_1, True))
    np.testing.assert_array_equal(out(None, False), out(None, False))  # evaluation: a fixed key


def test_a_built_in_model_key_that_get_model_reads_is_not_called_unused(tmp_path):
    """Issue 29: config.model.d_model read by the module's own get_model was reported as unused; a key it does
    not read (model.hidden_sizes here) still is."""
    reads = """
import flax.linen as nn

def get_model(config):
    return nn.Dense(2 if config.model.d_model == 32 else 3)
"""
    from jaxepochs.host import hooks

    config = jaxepochs.load_config_file(_module(tmp_path, config="config.model.d_model = 32", extra=reads))
    with pytest.warns(UserWarning, match="get_model gives the model") as caught:
        hooks.load_hooks(config)
    said = " ".join(str(w.message) for w in caught)
    assert "config.model.hidden_sizes is not used" in said and "d_model" not in said


def test_get_data_of_the_wrong_shape_names_the_fix(tmp_path):
    path = _module(tmp_path, extra="def get_data(config):\n    return {'train': ([1.0], [0])}\n")
    with pytest.raises(DataError, match=r'get_data in .* returned \[\'train\'\]; return \{"train": batch, "test"'):
        jaxepochs.train_and_evaluate(jaxepochs.load_config_file(path), tmp_path / "run", quiet=True)
