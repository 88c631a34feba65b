"""Where a user's model and objective enter: a built-in or an experiment module's model (flax linen or NNX), the
task's loss and metrics, and the checks that they fit the data, all before anything compiles.

A `ModelSource` turns a run's config and seed into (params, model_state, run_key) and gives the core's `Task` its
apply: linen modules initialise in one jitted program (per model, cached across runs); an NNX module is built by
the experiment's get_model(config), eagerly, as NNX modules are, and split into its parameters, its other state
(BatchNorm's statistics) and its random streams, which the trainer reseeds from each step's key.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxepochs import models
from jaxepochs.core import task as task_lib
from jaxepochs.core.epoch import WEIGHT
from jaxepochs.host import config as config_lib
from jaxepochs.host.hooks import Hooks

# The parameters' initialisation runs once per run: XLA's optimisation level 1 compiles it in a third of the
# time (the MNIST-1D MLP's random initialisers: 0.3 s against 0.9 s on CPU) and runs it as fast (a 4 x 2048^2
# MLP: 0.13 s either way). Its values are this program's, for runs and sweeps alike.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


class ModelSource(NamedTuple):
    kind: str  # "linen" or "nnx"
    module: Any  # the model of the config it was made from
    apply: Callable  # the Task's apply
    init: Callable  # (config, x_1) -> (params, model_state, run_key), computed (linen: a compiled program)
    trace_init: Callable  # the same, to trace under jax.eval_shape (nothing compiled)
    what: str  # how errors name it: "model.name=mlp", or "get_model in experiments/x.py"


def _run_key(seed) -> jax.Array:
    return jax.random.split(jax.random.PRNGKey(seed))[1]  # raw uint32[2], checkpointable


def _linen_init(module, seed, x_1):
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    params, model_state = task_lib.linen_init(module, init_key, x_1)
    return params, model_state, run_key


def init_params_program(module):
    """(seed uint32[], x_1) -> (params, model state, run key), jitted. It depends on the model alone, so runs
    that differ in anything else find it in the compilation cache; in one process (a notebook, a study, the
    tests) an equal module reuses the jitted function itself, and with it JAX's trace (0.7 s a run otherwise)."""
    try:
        return _init_program_of(module)
    except TypeError:  # a module with an unhashable field: a program of its own
        return _init_program(module)


def _init_program(module):
    return jax.jit(functools.partial(_linen_init, module), compiler_options=INIT_COMPILER_OPTIONS)


_init_program_of = functools.lru_cache(maxsize=16)(_init_program)  # linen modules are equal when their fields are


def _is_nnx(module) -> bool:
    from flax import nnx

    return isinstance(module, nnx.Module)


def _nnx_source(module, get_model: Callable, what: str) -> ModelSource:
    from flax import nnx

    graphdef, _, rng_state, _ = nnx.split(module, nnx.Param, nnx.RngState, ...)
    with_train, with_rngs = task_lib.takes_train(module), task_lib.takes(module, "rngs")
    fresh = lambda tree: jax.tree.map(lambda a: a, tree)  # new Variables, made in the trace that uses them
    # The module's own streams (nnx.Rngs(0, noise=1)): each reseeded from the step's key too, else it would
    # repeat its first key every step (the random state starts afresh each step, from the module's).
    own = sorted({x.tag for _, x in nnx.iter_graph(module) if isinstance(x, nnx.RngStream)} - {"default", "dropout"})

    def apply(params, model_state, x_b, key, train: bool):
        model = nnx.merge(graphdef, fresh(params), fresh(rng_state), fresh(model_state))
        model.train() if train else model.eval()
        if key is not None:
            streams = {tag: jax.random.fold_in(key, zlib.crc32(tag.encode())) for tag in own}
            nnx.reseed(model, default=key, dropout=key, **streams)
        kwargs = {"train": train} if with_train else {}
        if with_rngs:  # the Flax mnist example's __call__(x, rngs): the step's keys (evaluation: a fixed one)
            step_key = key if key is not None else jax.random.PRNGKey(0)
            kwargs["rngs"] = nnx.Rngs(default=step_key, dropout=step_key)
        outputs = model(x_b, **kwargs)
        if not train:
            return outputs, model_state
        return outputs, nnx.split(model, nnx.Param, nnx.RngState, ...)[3]

    def init(config, x_1):
        built = get_model(config)
        _, params, _, model_state = nnx.split(built, nnx.Param, nnx.RngState, ...)
        return params, model_state, _run_key(config.seed)

    return ModelSource("nnx", module, apply, init, init, what)


def model_source(config, num_outputs: int, hooks: Hooks) -> ModelSource:
    """The config's model: the experiment module's get_model(config), or the built-in `model.name`."""
    if hooks.get_model is None:
        module = models.make_model(config.model, num_outputs)
        what = f"model.name={config.model.name}"
    else:
        what = f"get_model in {hooks.module}"
        module = hooks.get_model(config)
        _check_call(module, what)
        if _is_nnx(module):
            return _nnx_source(module, hooks.get_model, what)
        import flax.linen as nn

        if not isinstance(module, nn.Module):
            raise config_lib.ConfigError(
                f"{what} returned {type(module).__name__}; return a flax linen nn.Module or a flax nnx.Module."
            )
    program = init_params_program(module)
    init = lambda config, x_1: program(jnp.asarray(config.seed, jnp.uint32), jax.tree.map(jnp.asarray, x_1))
    trace_init = lambda config, x_1: _linen_init(module, jnp.asarray(config.seed, jnp.uint32), x_1)
    return ModelSource("linen", module, task_lib.linen_apply(module), init, trace_init, what)


# What other code calls the training flag: the trainer passes `train` alone, so under these names it never changes.
TRAIN_ALIASES = ("training", "is_training", "deterministic", "use_running_average", "train_mode")


def _check_call(module, what: str) -> None:
    """A ConfigError for a __call__ argument the trainer would never pass: a training flag under another name
    (left at its default, dropout and BatchNorm would stay in one mode), or any other one without a default."""
    try:
        parameters = list(inspect.signature(module.__call__).parameters.values())[1:]  # after the inputs
    except (TypeError, ValueError):
        return
    for p in parameters:
        if p.name in ("train", "rngs") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in TRAIN_ALIASES:
            raise config_lib.ConfigError(
                f"{what}: {type(module).__name__}.__call__ takes `{p.name}`, which the trainer does not pass. Name "
                f"the training flag `train` (True in training, False in evaluation): the trainer passes that one"
                + (
                    " (for `deterministic`/`use_running_average`, use `not train`)."
                    if p.name in TRAIN_ALIASES[2:4]
                    else "."
                )  # fmt: skip
            )
        if p.default is p.empty:
            raise config_lib.ConfigError(
                f"{what}: {type(module).__name__}.__call__ requires `{p.name}`, which the trainer does not pass: it "
                "calls model(x), with `train` and `rngs` where __call__ names them. Give it a default, or take it "
                "from the config in get_model."
            )


def make_task(task: str, source: ModelSource, hooks: Hooks, hparams: bool = False, class_weight=None) -> task_lib.Task:
    """The core's Task of the config's `task` (a name), with the module's loss_fn and metrics_fn where given;
    `hparams`: its functions take config.hparams' numbers as a third argument (core/task.make_task)."""
    return task_lib.make_task(source.apply, task, hooks.loss_fn, hooks.metrics_fn, hparams=hparams,
                              class_weight=class_weight)  # fmt: skip


def _brief(error: Exception, limit: int = 400) -> str:
    """An error's message, cut to `limit` characters (JAX's shape errors can list hundreds of shapes)."""
    text = str(error) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _with_fix(error: Exception) -> str:
    """A model error's message, with the fix where a port meets a known one (JAX's own fix does not apply)."""
    if "unbound axis name" in str(error):
        return (
            f"{str(error).split('. ')[0]}. Drop the `axis_name` (BatchNorm's, or any collective's): the trainer "
            "compiles one program over the whole batch, spread over the devices by XLA, so a mean over the batch is "
            "already the whole batch's and no named axis exists to reduce over."
        )
    return _brief(error)


def _shape(tree) -> str:
    shapes = [tuple(a.shape) for a in jax.tree.leaves(tree)]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def check(task_name: str, trace_init, source: ModelSource, task: task_lib.Task, hooks: Hooks, train_split,
          num_outputs: int, hparams=None):  # fmt: skip
    """Traces the model (`trace_init(x)`: a run's initialisation), the loss and the metrics on two training
    examples without compiling (`hparams`: config.hparams' numbers, abstract, or None); a ConfigError names the
    part that does not fit (and its shapes). Returns "loss" and the metrics' names (and Metrics.WEIGHT entries of
    the weighted ones)."""
    from jaxepochs.data.splits import as_batch, take

    batch = as_batch(take(train_split, slice(0, 2)), np.asarray)
    n = jax.tree.leaves(batch["y"])[0].shape[0]
    extra = () if hparams is None else (hparams,)
    mode = "initialising"
    try:
        params, model_state, _ = jax.eval_shape(trace_init, batch["x"])
        mode = "evaluating"
        outputs, _ = jax.eval_shape(lambda p, s, x: task.apply(p, s, x, None, False), params, model_state, batch["x"])
        mode = "training"  # BatchNorm's batch statistics, dropout, random streams: what evaluation does not trace
        key = jax.random.PRNGKey(0)
        jax.eval_shape(lambda p, s, x, k: task.apply(p, s, x, k, True), params, model_state, batch["x"], key)
    except Exception as e:  # a model, loss or metric that cannot trace raises anything (ZeroDivisionError...)
        raise config_lib.ConfigError(
            f"{source.what} cannot take inputs of shape {_shape(batch['x'])} ({mode}): {_with_fix(e)}"
        ) from e
    loss_name = f"loss_fn in {hooks.module}" if hooks.loss_fn else f'task "{task_name}"'
    try:
        loss = jax.eval_shape(lambda o, b, *h: task.loss(o, b, *h), outputs, batch, *extra)
    except Exception as e:  # a model, loss or metric that cannot trace raises anything (ZeroDivisionError...)
        raise config_lib.ConfigError(
            f"{loss_name} cannot take the model's outputs {_shape(outputs)} and labels {_shape(batch['y'])}: {e}"
        ) from e
    weighted = _per_example_pair(loss_name, "loss", loss, n)
    _check_float(loss_name, "loss", loss[0] if weighted else loss)
    metric_names = _check_metrics(task_name, task, hooks, outputs, batch, n, extra)
    if task_name == "classification" and hooks.loss_fn is None:
        classes, top = outputs.shape[-1], int(np.max(train_split.y))
        if top >= classes:
            raise config_lib.ConfigError(
                f"{source.what} gives {classes} outputs per example, but the labels go up to {top}. Give the model "
                "one output per class."
            )
    return ("loss", *(["loss" + WEIGHT] if weighted else []), *metric_names)


def _per_example_pair(where: str, what: str, value, n: int) -> bool:
    """Whether `value` is a weighted pair (values [B], weights [B]); ConfigError unless it or the pair is [B]."""
    pair = isinstance(value, tuple) and len(value) == 2
    for part in value if pair else (value,):
        if hasattr(part, "shape") and tuple(part.shape) == (n,):
            continue
        shape = tuple(part.shape) if hasattr(part, "shape") else ()
        if len(shape) >= 2 and shape[0] == n:
            fix = (
                f"it has {len(shape) - 1} more axes per example: reduce over them in the hook (values.mean(axis="
                f"{tuple(range(1, len(shape)))}), or, for the mean over all tokens, give each example's mean over "
                "its tokens weighted by their count: ((v * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1), "
                "mask.sum(-1)))"
            )
        else:
            fix = "do not average it over the batch"
        fix += "; or give a pair (values [B], weights [B]) for a weighted mean"  # fmt: skip
        if what == "loss":
            raise config_lib.ConfigError(
                f"{where} returned {_shape(value)} for a batch of {n}; it must return the per-example loss [B] (the "
                f"trainer masks the padding and takes the mean): {fix}."
            )
        raise config_lib.ConfigError(
            f"{where}: {what} is {_shape(value)} for a batch of {n}; give its per-example values [B]: {fix}."
        )
    return pair


def _check_metrics(task_name: str, task, hooks, outputs, batch, n: int, extra=()) -> list[str]:
    where = f"metrics_fn in {hooks.module}" if hooks.metrics_fn else f'task "{task_name}"'
    try:
        values = jax.eval_shape(lambda o, b, *h: task.metrics(o, b, *h), outputs, batch, *extra)
    except Exception as e:  # a model, loss or metric that cannot trace raises anything (ZeroDivisionError...)
        raise config_lib.ConfigError(f"{where} cannot take the model's outputs {_shape(outputs)}: {e}") from e
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise config_lib.ConfigError(f"{where} returned {type(values).__name__}; return a dict {{name: values [B]}}.")
    names = []
    for name, value in sorted(values.items()):
        if name == "loss" or not name.isidentifier():
            raise config_lib.ConfigError(f'{where}: a metric named "{name}"; use another name (a Python identifier).')
        weighted = _per_example_pair(where, f'metric "{name}"', value, n)
        _check_float(where, f'metric "{name}"', value[0] if weighted else value)
        names += [name, name + WEIGHT] if weighted else [name]
    return names


def _check_float(where: str, what: str, value) -> None:
    """A loss or metric of integers (or booleans) trains nothing (an integer loss has no gradient) and averages
    wrongly: refused, naming the hook, the dtype and the fix."""
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise config_lib.ConfigError(
            f"{where} returned a {what} of dtype {value.dtype}; it must be floating point (an integer loss has no "
            "gradient, so nothing would train, and integer means round). Return float per-example values, e.g. "
            "`values.astype(jnp.float32)`."
        )
