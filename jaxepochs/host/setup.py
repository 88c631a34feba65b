"""What a config makes of the core: the model and task (host/seam.py), the optimizer, early stopping, the run
program's spec and the initial carry. Runs and sweeps build their programs here, the same way; nothing here
compiles but `init_carries`.
"""

from __future__ import annotations

import functools
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxepochs.core import averages, optax_optim, optim
from jaxepochs.core import early_stopping as early_stopping_lib
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import layout as layout_lib
from jaxepochs.core import program as program_lib
from jaxepochs.core import task as task_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import devices, finetune, seam, specs, streamed
from jaxepochs.host import hooks as hooks_lib

# With train.epochs_per_call = 0 a call runs up to this many epochs (the size of the rows it returns: 52 bytes a
# run and epoch); the host's pace chooses how many. One program serves every pace and every run length.
AUTO_EPOCHS_PER_CALL = 512


class Pieces(NamedTuple):
    """The parts of a run (or of a sweep's group of runs) that its config and dataset decide."""

    source: seam.ModelSource  # the model: its apply and how a run's parameters start
    task: task_lib.Task  # the model's apply, the loss and the metrics
    metric_names: tuple[str, ...]  # "loss" and the task's metrics, in the order rows show them
    hooks: hooks_lib.Hooks  # the experiment module's (augment is used by the run program)
    tx: optim.TrainerOptimizer  # optim.Optimizer (finetune.configure gives it groups)
    tracker: early_stopping_lib.EarlyStopping
    may_stop: bool  # early stopping is enabled (otherwise the tracker only tracks the best epoch)
    plateau: optim.PlateauState | None
    steps_per_epoch: int
    start: object  # jitted (params, model state, run key, OptHParams) -> the run's carry with a run axis of 1
    warm: object = None  # host/warm_start.WarmStart: the arrays a fresh run takes from init.from_workdir
    hparams_keys: tuple[str, ...] = ()  # config.hparams' numbers, carried per run (TrainState.hparams)
    eval_names: tuple[str, ...] = ()  # the further evaluation sets (Dataset.evals)


def load_data(config: ml_collections.ConfigDict, hooks: hooks_lib.Hooks, quiet: bool) -> data_lib.Dataset:
    """The experiment module's get_data(config), or the config's dataset; streamed (its splits read a chunk at a
    time, host/streamed.py) where it does not fit the device budget or the config asks for it."""
    if hooks.get_data is None:
        estimated = data_lib.estimated_bytes(config, quiet)
        wanted = streamed.wants_stream(config.data, config.train.steps_per_epoch, estimated)
        dataset = data_lib.load_dataset(config, quiet, streamed=wanted)
    else:
        name = f"{pathlib.Path(hooks.module).stem}.get_data"
        dataset = data_lib.from_arrays(config, hooks.get_data(config), f"get_data in {hooks.module}", name)
        arrays = [dataset.train, dataset.val, dataset.test, *dataset.evals.values()]
        size = sum(np.asarray(a).nbytes for split in arrays for a in jax.tree.leaves(tuple(split)))
        streams = streamed.wants_stream(config.data, config.train.steps_per_epoch, size)
        if streams and (dataset.train.extra is not None or not isinstance(dataset.train.y, np.ndarray)):
            raise config_lib.ConfigError(
                f"get_data in {hooks.module}: labels of several arrays or keys beside x and y are kept on the "
                "device only; set data.stream = False (and give data that fits the device)."
            )
        dataset = data_lib.as_streamed(dataset) if streams else dataset
    return dataset


def check_shapes(model, batch_size: int, dataset: data_lib.Dataset, n_train: int | None = None) -> None:
    """ConfigError for a batch larger than the training set, or tokens beyond the transformer's vocabulary
    (`model`: the config's model section)."""
    n_train = data_lib.count(dataset.train) if n_train is None else n_train
    x = dataset.train.x
    if model.name == "transformer" and hasattr(x, "dtype") and np.issubdtype(x.dtype, np.integer):
        vocab = model.vocab_size or dataset.num_classes + 1
        top = max(int(x.max()), int(dataset.test.x.max()))
        if top >= vocab:
            raise config_lib.ConfigError(
                f"{dataset.name} has token ids up to {top}, but the transformer's vocabulary is 0..{vocab - 1}. "
                f"Set model.vocab_size to at least {top + 1}."
            )
    if batch_size > n_train:
        raise config_lib.ConfigError(
            f"config.train.batch_size = {batch_size} is larger than the {n_train} training "
            f"examples of {dataset.name} (after holding out validation). Use batch_size <= {n_train}."
        )


def _check_metric_names(names: tuple[str, ...], norms: bool, both: bool) -> None:
    """ConfigError for a metric whose name logging.norms or train.eval_weights "both" would write over."""
    taken = [n for n in names if (norms and n.startswith(epoch_lib.NORMS)) or (both and n.startswith("trained_"))]
    if taken:
        raise config_lib.ConfigError(
            f'The metrics {taken} have names that logging.norms (grad_norm, ...) or train.eval_weights = "both" '
            "(trained_*) use for their own; rename them in metrics_fn."
        )


def make_tracker(e, has_validation: bool, metric_names=("loss", "accuracy"), evals=()):
    """The early-stopping rule of the config's early_stopping section `e`, and whether it may stop the run
    (disabled, it only tracks the best epoch)."""
    if e.enabled:
        return config_lib.make_early_stopping(e, has_validation, metric_names, evals), True
    # Never stops (a stopped state freezes, and the best epoch must keep being tracked).
    monitor = "val_loss" if has_validation else "train_loss"
    return early_stopping_lib.EarlyStopping(monitor=monitor, patience=2**30, stop_on_nonfinite=False), False


def make_pieces(config, dataset: data_lib.Dataset, hooks: hooks_lib.Hooks, steps_per_epoch: int, has_validation: bool):
    """The model, task, optimizer, tracker and plateau state of `config`; ConfigError naming a setting or hook
    that cannot run (the model, loss and metrics are traced on two training examples, nothing compiles)."""
    s = config.optimizer.schedule
    if s.name == "reduce_on_plateau" and s.monitor == "val_loss" and not has_validation:
        raise config_lib.ConfigError(
            'config.optimizer.schedule.monitor = "val_loss" without a validation split (data.validation_fraction '
            'is 0). Monitor "train_loss", or hold out a validation split.'
        )
    direction = None if hooks.get_optimizer is None else hooks.get_optimizer(config)
    tx, plateau = make_optimizer(config.optimizer, hooks, steps_per_epoch, config.train.epochs, direction)
    source = seam.model_source(config, dataset.num_classes, hooks)
    keys = tuple(sorted(hparams_of(config.hparams)))
    if keys and hooks.augment is not None:  # augment(key, batch[, hparams]) as the run carries them
        hooks = hooks._replace(augment=task_lib.takes_hparams(hooks.augment))
    weights = class_weights(config.train.class_weight, dataset) if hooks.loss_fn is None else None
    task = seam.make_task(config.task, source, hooks, hparams=bool(keys), class_weight=weights)
    if config.train.compute_dtype == "bfloat16":
        task = task._replace(apply=task_lib.in_compute_dtype(task.apply, jnp.bfloat16))
    trace_init = lambda x: source.trace_init(config, x)
    abstract = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in keys} if keys else None
    names = seam.check(config.task, trace_init, source, task, hooks, dataset.train, dataset.num_classes, abstract)
    _check_metric_names(names, config.logging.norms, config.train.eval_weights == "both")
    if "loss" + epoch_lib.WEIGHT in names and config.train.accumulate_steps > 1:
        raise config_lib.ConfigError(
            "A weighted loss (loss_fn giving (values, weights), a sample weight or train.class_weight) with "
            "train.accumulate_steps > 1 is not supported; set train.accumulate_steps = 1."
        )
    tuning = specs.specs_of(config).finetune
    if finetune.in_use(tuning):  # the groups are the model's top-level submodules: traced, nothing compiled
        if not isinstance(tx, optim.Optimizer):
            raise config_lib.ConfigError(
                "Fine-tuning's groups (finetune.*, optimizer.layer_decay) need the built-in optimizer (adam, adamw, "
                "sgd); drop get_optimizer or the optax optimizer.name, or the fine-tuning settings."
            )
        params = jax.eval_shape(lambda x: source.trace_init(config, x), first_example(dataset.train))[0]
        tx = finetune.configure(tx, tuning, params, steps_per_epoch)
    model_state = lambda: jax.eval_shape(lambda x: source.trace_init(config, x), first_example(dataset.train))[1]
    tx = average_of(config.train, tx, steps_per_epoch, model_state, dataset.streamed)
    evals = tuple(dataset.evals)
    tracker, may_stop = make_tracker(config.early_stopping, has_validation, names, evals)
    pieces = Pieces(source, task, names, hooks, tx, tracker, may_stop, plateau, steps_per_epoch, None, None, keys,
                    evals)  # fmt: skip
    return pieces._replace(start=jax.jit(functools.partial(_start, pieces)))


def average_of(t, tx, steps_per_epoch: int, model_state, streamed: bool):
    """`tx` keeping the average of the parameters that train.ema_decay or train.swa_start_epoch asks for (`t`: the
    config's train section), else `tx`. SWA on a model with state (`model_state()`: its shapes) keeps its
    statistics recomputed for the average; ConfigError where the data is streamed (a second pass over it each
    epoch is not built)."""
    evaluate = t.eval_weights != "trained"
    if t.ema_decay:
        return averages.EmaOptimizer(tx, evaluate, decay=float(t.ema_decay))
    if not t.swa_start_epoch:
        return tx
    stats = model_state() if evaluate else None
    if not jax.tree.leaves(stats):
        stats = None
    elif streamed:
        raise config_lib.ConfigError(
            "train.swa_start_epoch with a model that keeps state (BatchNorm's statistics) on streamed data: the "
            "statistics of the averaged weights are recomputed by a pass over the training split on the device, "
            "which streamed data does not allow yet. Use train.ema_decay, data.stream = False, or "
            'train.eval_weights = "trained".'
        )
    return averages.SwaOptimizer(tx, evaluate, start_epoch=int(t.swa_start_epoch), steps_per_epoch=steps_per_epoch,
                                 stats_like=stats)  # fmt: skip


def make_optimizer(o, hooks: hooks_lib.Hooks, steps_per_epoch: int, epochs: int, direction=None):
    """The optimizer of the config's optimizer section `o` and reduce_on_plateau's state: the built-in one, an
    optax alias (optimizer.name), or `direction`, what the module's get_optimizer(config) returned. ConfigError
    naming the fix."""
    spec = o.to_dict()
    try:
        if hooks.get_optimizer is not None:
            if not isinstance(direction, optax.GradientTransformation):
                raise config_lib.ConfigError(
                    f"get_optimizer in {hooks.module} returned {type(direction).__name__}; return an "
                    "optax.GradientTransformation giving the update's direction, e.g. optax.chain("
                    "optax.clip_by_global_norm(1.0), optax.scale_by_lion()): the trainer applies the learning rate."
                )
            tx = optax_optim.make(spec, steps_per_epoch, epochs, direction)
        elif o.name in optax_optim.NAMES:
            tx = optax_optim.make(spec, steps_per_epoch, epochs)
        else:
            tx = optim.make_optimizer(spec, steps_per_epoch, epochs)
        return tx, optim.plateau_init(spec)
    except config_lib.ConfigError:
        raise
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


def hparams_of(section) -> dict[str, float]:
    """config.hparams' numbers (not flags, text or tuples): each run's, traced (TrainState.hparams)."""
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    return {k: float(v) for k, v in section.items() if number(v)}


def class_weights(spec, dataset: data_lib.Dataset):
    """train.class_weight as float32 [classes], or None: "balanced" is N / (classes * count) per class."""
    if spec is None:
        return None
    classes = dataset.num_classes
    if spec == "balanced":
        counts = np.bincount(np.asarray(dataset.train.y), minlength=classes).astype(np.float64)
        return (counts.sum() / (classes * np.maximum(counts, 1))).astype(np.float32)
    if len(spec) != classes:
        raise config_lib.ConfigError(f"config.train.class_weight has {len(spec)} weights for {classes} classes. "
                                     "Give one weight per class.")  # fmt: skip
    return np.asarray(spec, np.float32)


def run_spec(
    t,
    pieces: Pieces,
    eval_sizes: dict[str, int],
    data_axes: dict | None = None,
    layout=None,
    plateau_monitor=None,
    norms: bool = False,
    eval_every: dict[str, int] | None = None,
    layers: tuple[str, ...] = (),
) -> program_lib.RunSpec:
    """The run program's spec from the config's train section `t`: `eval_sizes` names the held-out splits
    evaluated when due (val every train.validate_every epochs, test every train.test_every with train.log_test;
    both after the last) and their batch sizes; `layout` (core/layout.py) where the program spans a mesh;
    `plateau_monitor`, reduce_on_plateau's metric where the schedule is used; `norms`: logging.norms;
    `eval_every`: the further evaluation sets' cadence (their batch sizes are in `eval_sizes`); `layers`: the
    parameter groups whose norms logging.layer_norms sums."""
    return program_lib.RunSpec(
        task=pieces.task,
        tx=pieces.tx,
        metric_names=pieces.metric_names,
        batch_size=t.batch_size,
        eval_batch_sizes=eval_sizes,
        tracker=pieces.tracker,
        may_stop=pieces.may_stop,
        epochs_per_call=t.epochs_per_call or AUTO_EPOCHS_PER_CALL,
        test_every=t.test_every,
        validate_every=t.validate_every,
        shuffle=t.shuffle,
        plateau_monitor=plateau_monitor if pieces.plateau is not None else None,
        data_axes=data_axes or {},
        augment=pieces.hooks.augment,
        accumulate_steps=t.accumulate_steps,
        layout=layout,
        norms=norms,
        eval_every=eval_every or {},
        layers=layers,
        swa_stats=averages.keeps_stats(pieces.tx),
        eval_both=_eval_both(t, eval_sizes),
    )


def _eval_both(t, eval_sizes: dict[str, int]) -> bool:
    """train.eval_weights "both" (`t`: the config's train section): ConfigError without a validation split."""
    if t.eval_weights != "both":
        return False
    if "val" not in eval_sizes:
        raise config_lib.ConfigError(
            'train.eval_weights = "both" evaluates the validation split at the trained weights too, and this run '
            'has none. Hold one out (data.validation_fraction > 0), or use "ema"/"swa".'
        )
    return True


def eval_sizes(eval_batch_size: int, sizes: dict[str, int]) -> dict[str, int]:
    """Batch sizes of the non-empty held-out splits among `sizes` (split -> examples), capped at the split."""
    return {name: min(eval_batch_size, n) for name, n in sizes.items() if n}


def on_device(split, layout=None) -> dict:
    """A split's arrays as the trainer's batch: {"x": ..., "y": ...} on the device, or with a `layout` on every
    device of its mesh (each computes on the rows of each batch that the layout gives it)."""
    if layout is not None:
        return devices.put(data_lib.as_batch(split, lambda a: a), layout.replicated())
    return data_lib.as_batch(split, jnp.asarray)


def jit_on(layout, program, abstract_carry):
    """`jax.jit` of a run program (carry, splits, es_hparams, first, count, last) -> (carry, rows) on a mesh:
    the carry where the layout puts it (a run axis on "runs", parameters replicated or split over "data"),
    everything else replicated."""
    carry = layout_lib.carry_shardings(layout, abstract_carry)
    rest = layout.replicated()
    return jax.jit(program, in_shardings=(carry, rest, rest, rest, rest, rest), out_shardings=(carry, rest))


def place_carry(layout, carry, abstract_carry):
    """A carry (host or one device's arrays) where `layout` puts it; unchanged without a layout."""
    if layout is None:
        return carry
    return devices.put(jax.device_get(carry), layout_lib.carry_shardings(layout, abstract_carry))


def first_example(split):
    """The inputs of the split's first example, a batch of one (to initialise a model with)."""
    return jax.tree.map(lambda a: np.asarray(a[:1]), split.x)


def init_state(model, tx, seed: int, x) -> epoch_lib.TrainState:
    """A linen model's initial TrainState (no run axis), as the run program starts it: for benchmarks and the
    core's functions used directly."""
    params, model_state, run_key = seam.init_params_program(model)(jnp.asarray(seed, jnp.uint32), jnp.asarray(x[:1]))
    return epoch_lib.TrainState(params, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32), run_key, model_state)


def _group_state(pieces: Pieces, spec: finetune.FinetuneSpec):
    """This run's fine-tuning values (its unfreezing epochs and rate multipliers: a sweep may vary them), or None."""
    if pieces.tx.groups is None:
        return None
    starts, rates = finetune.group_values(spec, pieces.tx.group_names)
    return optim.GroupState(np.asarray(starts, np.int32), np.asarray(rates, np.float32), *[np.ones(len(starts),
                            np.float32)] * 2)  # fmt: skip


def _start(
    pieces: Pieces, params, model_state, run_key, opt_hparams, groups=None, hparams=None
) -> program_lib.RunCarry:
    opt_state = pieces.tx.with_hparams(pieces.tx.init(params), opt_hparams, groups)
    state = epoch_lib.TrainState(params, opt_state, jnp.zeros((), jnp.int32), run_key, model_state, hparams)
    carry = program_lib.start_carry(state, pieces.tracker, pieces.plateau)
    return jax.tree.map(lambda a: a[None], carry)


def init_carries(pieces: Pieces, configs: list, opt_hparams: list[optim.OptHParams], x_1):
    """The carry of runs with these configs (their seeds) and optimizer hyperparameters, stacked on a leading run
    axis: each run's parameters from the model's init (for linen one program, compiled once), its optimizer state
    from a second small program."""
    parts = []
    for config, hparams in zip(configs, opt_hparams, strict=True):
        params, model_state, run_key = pieces.source.init(config, x_1)
        if pieces.warm is not None:  # host/warm_start.WarmStart: the arrays taken from init.from_workdir
            params, model_state = pieces.warm.apply(params, model_state)
        hparams = optim.OptHParams(*(np.float32(v) for v in hparams))
        groups = _group_state(pieces, specs.specs_of(config).finetune)
        own = _own_hparams(pieces, config.hparams)
        carry = pieces.start(params, model_state, run_key, hparams, groups, own)
        opt_state = averages.with_decay(pieces.tx, carry.state.opt_state, config.train.ema_decay)
        parts.append(carry._replace(state=carry.state._replace(opt_state=opt_state)))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *jax.device_get(parts))


def abstract_carry(pieces: Pieces, config, x_1) -> program_lib.RunCarry:
    """The shapes and dtypes of a run's carry (leading run axis 1), traced without compiling."""
    hparams = optim.OptHParams(*(np.float32(v) for v in pieces.tx.defaults))
    own = _own_hparams(pieces, config.hparams)
    return jax.eval_shape(lambda x: _start(pieces, *pieces.source.trace_init(config, x), hparams, None, own), x_1)


def _own_hparams(pieces: Pieces, section):
    """The run's config.hparams numbers (float32 [] each; `section`: its hparams) where the pieces carry them."""
    if not pieces.hparams_keys:
        return None
    values = hparams_of(section)
    return {k: np.float32(values[k]) for k in pieces.hparams_keys}


def without_run_axis(tree):
    """A batch of one run's tree as that run's (arrays or shapes)."""
    squeeze = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a[0]
    return jax.tree.map(squeeze, tree)


def with_run_axis(tree):
    return jax.tree.map(lambda a: np.asarray(a)[None], tree)


def es_hparams(trackers: list[early_stopping_lib.EarlyStopping]):
    """Early stopping's numeric hyperparameters of each run, stacked on the run axis."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *[t.hparams() for t in trackers])
