"""What a config makes of the core: the model, the optimizer, early stopping, the run program's spec and the
initial carry. Runs and sweeps build their programs here, the same way; nothing here compiles but `init_carries`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxepochs import models
from jaxepochs.core import early_stopping as early_stopping_lib
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import optim
from jaxepochs.core import program as program_lib
from jaxepochs.core import task as task_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import config as config_lib

# With train.epochs_per_call = 0 a call runs up to this many epochs (the size of the rows it returns: 52 bytes a
# run and epoch); the host's pace chooses how many. One program serves every pace and every run length.
AUTO_EPOCHS_PER_CALL = 512


class Pieces(NamedTuple):
    """The parts of a run (or of a sweep's group of runs) that its config and dataset decide."""

    model: Any  # a flax module
    task: task_lib.Task  # the model's apply, the loss and the metrics
    metric_names: tuple[str, ...]  # "loss" and the task's metrics, in the order rows show them
    tx: optim.Optimizer
    tracker: early_stopping_lib.EarlyStopping
    may_stop: bool  # early stopping is enabled (otherwise the tracker only tracks the best epoch)
    plateau: optim.PlateauState | None
    steps_per_epoch: int
    init_params: Any  # jitted (seed, x_1) -> (params, model state, run key): see init_params_program
    start: Any  # jitted (params, model state, run key, OptHParams) -> the run's carry with a run axis of 1


def check_shapes(config: ml_collections.ConfigDict, dataset: data_lib.Dataset, n_train: int | None = None) -> None:
    """ConfigError for a batch larger than the training set, or tokens beyond the transformer's vocabulary."""
    n_train = dataset.train.y.shape[0] if n_train is None else n_train
    if config.model.name == "transformer" and np.issubdtype(dataset.train.x.dtype, np.integer):
        vocab = config.model.vocab_size or dataset.num_classes + 1
        top = max(int(dataset.train.x.max()), int(dataset.test.x.max()))
        if top >= vocab:
            raise config_lib.ConfigError(
                f"{dataset.name} has token ids up to {top}, but the transformer's vocabulary is 0..{vocab - 1}. "
                f"Set model.vocab_size to at least {top + 1}."
            )
    if config.train.batch_size > n_train:
        raise config_lib.ConfigError(
            f"config.train.batch_size = {config.train.batch_size} is larger than the {n_train} training "
            f"examples of {dataset.name} (after holding out validation). Use batch_size <= {n_train}."
        )


def make_tracker(config, has_validation: bool) -> tuple[early_stopping_lib.EarlyStopping, bool]:
    """The early-stopping rule, and whether it may stop the run; disabled, it only tracks the best epoch."""
    if config.early_stopping.enabled:
        return config_lib.make_early_stopping(config.early_stopping, has_validation), True
    # Never stops (a stopped state freezes, and the best epoch must keep being tracked).
    monitor = "val_loss" if has_validation else "train_loss"
    return early_stopping_lib.EarlyStopping(monitor=monitor, patience=2**30, stop_on_nonfinite=False), False


def metric_names(task: task_lib.Task, model, example) -> tuple[str, ...]:
    """ "loss" and the names of the task's metrics, traced on `example` (a batch of one) without compiling."""

    def names(x, y):
        params, model_state = task_lib.linen_init(model, jax.random.PRNGKey(0), x)
        outputs, _ = task.apply(params, model_state, x, None, False)
        return task.metrics(outputs, {"x": x, "y": y})

    return ("loss", *sorted(jax.eval_shape(names, example["x"], example["y"])))


def make_pieces(config, num_classes: int, steps_per_epoch: int, has_validation: bool, example) -> Pieces:
    """The model, task, optimizer, tracker and plateau state of `config`; ConfigError naming a setting that cannot
    run. `example`: a batch of one example, to trace the model and its metrics with."""
    s = config.optimizer.schedule
    if s.name == "reduce_on_plateau" and s.monitor == "val_loss" and not has_validation:
        raise config_lib.ConfigError(
            'config.optimizer.schedule.monitor = "val_loss" without a validation split (data.validation_fraction '
            'is 0). Monitor "train_loss", or hold out a validation split.'
        )
    steps = steps_per_epoch
    try:
        tx = optim.make_optimizer(config.optimizer.to_dict(), steps, config.train.epochs)
        plateau = optim.plateau_init(config.optimizer.to_dict())
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    tracker, may_stop = make_tracker(config, has_validation)
    model = models.make_model(config.model, num_classes)
    task = task_lib.make_task(task_lib.linen_apply(model))
    names = metric_names(task, model, example)
    pieces = Pieces(model, task, names, tx, tracker, may_stop, plateau, steps, init_params_program(model), None)
    return pieces._replace(start=jax.jit(functools.partial(_start, pieces)))


def run_spec(config, pieces: Pieces, eval_sizes: dict[str, int], data_axes: dict | None = None) -> program_lib.RunSpec:
    """The run program's spec: `eval_sizes` names the held-out splits evaluated every epoch (val) or when due
    (test, with train.log_test) and their batch sizes."""
    return program_lib.RunSpec(
        task=pieces.task,
        tx=pieces.tx,
        metric_names=pieces.metric_names,
        batch_size=config.train.batch_size,
        eval_batch_sizes=eval_sizes,
        tracker=pieces.tracker,
        may_stop=pieces.may_stop,
        epochs_per_call=config.train.epochs_per_call or AUTO_EPOCHS_PER_CALL,
        test_every=config.train.test_every,
        shuffle=config.train.shuffle,
        plateau_monitor=config.optimizer.schedule.monitor if pieces.plateau is not None else None,
        data_axes=data_axes or {},
    )


def eval_sizes(config, sizes: dict[str, int]) -> dict[str, int]:
    """Batch sizes of the non-empty held-out splits among `sizes` (split -> examples), capped at the split."""
    return {name: min(config.train.eval_batch_size, n) for name, n in sizes.items() if n}


def on_device(split) -> dict:
    """A split's arrays as the trainer's batch: {"x": ..., "y": ...} on the device."""
    return {"x": jnp.asarray(split.x), "y": jnp.asarray(split.y)}


def example_of(split) -> dict:
    """A batch of the split's first example, to trace with."""
    return {"x": np.asarray(split.x[:1]), "y": np.asarray(split.y[:1])}


def check_model(config, dataset: data_lib.Dataset) -> None:
    """Traces the parameters' shapes without compiling: a model that cannot take the inputs fails here, first."""
    model = models.make_model(config.model, dataset.num_classes)
    try:
        jax.eval_shape(functools.partial(task_lib.linen_init, model, jax.random.PRNGKey(0)), dataset.train.x[:1])
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(
            f"model.name={config.model.name} cannot take {dataset.name}'s inputs of shape "
            f"{dataset.train.x.shape[1:]}: {e}"
        ) from e


def _init_params(model, seed, x_1):
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    params, model_state = task_lib.linen_init(model, init_key, x_1)
    return params, model_state, run_key  # the run key: raw uint32[2], checkpointable


# The parameters' initialisation runs once per run: XLA's optimisation level 1 compiles it in a third of the
# time (the MNIST-1D MLP's random initialisers: 0.3 s against 0.9 s on CPU) and runs it as fast (a 4 x 2048^2
# MLP: 0.13 s either way). Its values are this program's, for runs and sweeps alike.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_params_program(model):
    """(seed uint32[], x_1) -> (params, model state, run key), jitted. It depends on the model alone, so runs that
    differ in anything else find it in the compilation cache."""
    return jax.jit(functools.partial(_init_params, model), compiler_options=INIT_COMPILER_OPTIONS)


def init_state(model, tx, seed: int, x) -> epoch_lib.TrainState:
    """A run's initial TrainState (no run axis), as the run program starts it: for benchmarks and the core's
    functions used directly."""
    params, model_state, run_key = init_params_program(model)(jnp.asarray(seed, jnp.uint32), jnp.asarray(x[:1]))
    return epoch_lib.TrainState(params, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32), run_key, model_state)


def _start(pieces: Pieces, params, model_state, run_key, opt_hparams) -> program_lib.RunCarry:
    opt_state = pieces.tx.init(params)._replace(hparams=opt_hparams)
    state = epoch_lib.TrainState(params, opt_state, jnp.zeros((), jnp.int32), run_key, model_state)
    carry = program_lib.start_carry(state, pieces.tracker, pieces.plateau)
    return jax.tree.map(lambda a: a[None], carry)


def init_carries(pieces: Pieces, seeds: list[int], opt_hparams: list[optim.OptHParams], x_1f):
    """The carry of runs with these seeds and optimizer hyperparameters, stacked on a leading run axis: each run's
    parameters from the init program (compiled once), its optimizer state from a second small program."""
    x_1f = jnp.asarray(x_1f[:1])
    parts = []
    for seed, hparams in zip(seeds, opt_hparams, strict=True):
        params, model_state, run_key = pieces.init_params(jnp.asarray(seed, jnp.uint32), x_1f)
        hparams = optim.OptHParams(*(np.float32(v) for v in hparams))
        parts.append(pieces.start(params, model_state, run_key, hparams))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *jax.device_get(parts))


def abstract_carry(pieces: Pieces, x_1f) -> program_lib.RunCarry:
    """The shapes and dtypes of a run's carry (leading run axis 1), traced without compiling."""
    hparams = optim.OptHParams(*(np.float32(v) for v in pieces.tx.defaults))

    def init(seed, x):
        return _start(pieces, *_init_params(pieces.model, seed, x), hparams)

    return jax.eval_shape(init, jnp.zeros((), jnp.uint32), jnp.asarray(x_1f[:1]))


def without_run_axis(tree):
    """A batch of one run's tree as that run's (arrays or shapes)."""
    squeeze = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a[0]
    return jax.tree.map(squeeze, tree)


def with_run_axis(tree):
    return jax.tree.map(lambda a: np.asarray(a)[None], tree)


def es_hparams(trackers: list[early_stopping_lib.EarlyStopping]):
    """Early stopping's numeric hyperparameters of each run, stacked on the run axis."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *[t.hparams() for t in trackers])
