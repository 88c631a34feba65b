"""The seam where a model and its objective enter the epoch: a `Task` of pure functions.

    apply(params, model_state, x_b, key, train) -> (outputs, model_state)   # the model, linen or NNX behind it
    loss(outputs, batch) -> per-example loss [B]     # the epoch applies the padding mask and takes the mean
    metrics(outputs, batch) -> {name: per-example values [B]}

A batch is a pytree of arrays with one leading example axis, holding "x" (any pytree: the model's input) and "y".
`model_state` holds what a model changes as it trains (BatchNorm's statistics); `key` is the step's key for
dropout and other randomness. The built-in tasks are these functions for classification (today's exact
cross-entropy and accuracy), regression (mean squared error; mse, mae) and binary labels (sigmoid cross-entropy;
accuracy); a user's experiment module may give its own loss and metrics.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

TASKS = ("classification", "regression", "binary", "custom")  # custom: the module's loss_fn, no label checks


class Task(NamedTuple):
    apply: Callable  # (params, model_state, x_b, key, train: bool) -> (outputs, model_state)
    loss: Callable  # (outputs, batch) -> float [B]
    metrics: Callable  # (outputs, batch) -> {name: float [B]}
    eval_loss: Callable | None = None  # evaluation's loss, where it differs (classification: classes summed in order)

    def evaluation_loss(self) -> Callable:
        return self.eval_loss or self.loss


def _class_sum(x_bc: jax.Array, fixed_order: bool) -> jax.Array:
    """x.sum(-1); with `fixed_order`, halves added pairwise. XLA's row reduction sums in an order that depends on
    the shape around it (the number of runs in a sweep), so a run's held-out loss differed in its last bit
    between a sweep and the run alone; evaluation sums in the fixed order. Training does not (it costs 0.4 us a
    step at batch size 1 on CPU, half the step) and has not needed to: its sums came out the same."""
    if not fixed_order:
        return x_bc.sum(-1)
    width = 1 << max(x_bc.shape[-1] - 1, 0).bit_length()
    x_bc = jnp.pad(x_bc, [(0, 0)] * (x_bc.ndim - 1) + [(0, width - x_bc.shape[-1])])
    while x_bc.shape[-1] > 1:
        half = x_bc.shape[-1] // 2
        x_bc = x_bc[..., :half] + x_bc[..., half:]
    return x_bc[..., 0]


def cross_entropy(logits_bc: jax.Array, y_b: jax.Array, fixed_order: bool = False) -> jax.Array:
    """-log softmax(logits)[y] per row [B], accurate to float32's relative precision at any confidence.

    With z = logits - logits[y] and m = max(z) >= 0, -log p_y = m + log1p(sum_{j != y} exp(z_j - m) + expm1(-m)).
    The usual logsumexp form rounds 1 + tiny to 1 once p_y > 1 - 6e-8, so the loss and the gradient on the
    correct logit become exactly 0 while weight decay still pulls; Nanda et al. (2023) compute their grokking loss
    in float64 for this reason. This form keeps both in float32, as fast as optax's loss on CPU.
    """
    is_label_bc = jnp.arange(logits_bc.shape[-1]) == y_b[:, None]
    # The answer's logit by a masked sum, not take_along_axis: a gather costs more than the whole loss on CPU.
    z_bc = logits_bc - _class_sum(jnp.where(is_label_bc, logits_bc, 0.0), fixed_order)[:, None]
    m_b = jax.lax.stop_gradient(z_bc.max(-1))  # the identity holds for any m; the max keeps exp() in range
    others_b = _class_sum(jnp.where(is_label_bc, 0.0, jnp.exp(z_bc - m_b[:, None])), fixed_order)
    return m_b + jnp.log1p(others_b + jnp.expm1(-m_b))


def _per_example(values: jax.Array) -> jax.Array:
    """[B, ...] -> [B]: the mean over each example's other axes (several regression targets, several labels)."""
    return values.reshape(values.shape[0], -1).mean(-1) if values.ndim > 1 else values


def classification_loss(outputs, batch, fixed_order: bool = False) -> jax.Array:
    return cross_entropy(outputs, batch["y"], fixed_order)


def classification_metrics(outputs, batch) -> dict[str, jax.Array]:
    return {"accuracy": (jnp.argmax(outputs, -1) == batch["y"]).astype(jnp.float32)}


def regression_loss(outputs, batch) -> jax.Array:
    return _per_example(jnp.square(outputs - batch["y"].reshape(outputs.shape)))


def regression_metrics(outputs, batch) -> dict[str, jax.Array]:
    error = outputs - batch["y"].reshape(outputs.shape)
    return {"mse": _per_example(jnp.square(error)), "mae": _per_example(jnp.abs(error))}


def binary_loss(outputs, batch) -> jax.Array:
    return _per_example(optax.sigmoid_binary_cross_entropy(outputs, batch["y"].reshape(outputs.shape)))


def binary_metrics(outputs, batch) -> dict[str, jax.Array]:
    hits = (outputs > 0) == (batch["y"].reshape(outputs.shape) > 0.5)
    return {"accuracy": _per_example(hits.astype(jnp.float32))}


BUILTIN_LOSSES = {"classification": classification_loss, "regression": regression_loss, "binary": binary_loss}
BUILTIN_METRICS = {
    "classification": classification_metrics,
    "regression": regression_metrics,
    "binary": binary_metrics,
    "custom": lambda outputs, batch: {},
}
# The names of "loss" and of each built-in task's metrics, as rows show them ("loss", then the metrics sorted):
# the names early stopping may monitor, known before anything is traced.
METRIC_NAMES = {
    "classification": ("loss", "accuracy"),
    "regression": ("loss", "mae", "mse"),
    "binary": ("loss", "accuracy"),
    "custom": ("loss",),
}


def make_task(apply: Callable, task: str = "classification", loss=None, metrics=None, *, hparams: bool = False,
              class_weight=None) -> Task:  # fmt: skip
    """The Task of a built-in objective (TASKS), or of the user's `loss` and `metrics` where given.

    `hparams`: the run carries config.hparams (TrainState.hparams), so every function takes a third argument,
    the section's traced numbers (a user's hook gets it where it takes three arguments). `class_weight` (float32
    [C], classification's built-in loss): each training example's loss weighted by its class's weight. A built-in
    loss weights each example by the batch's "weight" where the data has one (a sample weight)."""
    eval_loss = None
    if loss is None:
        builtin = BUILTIN_LOSSES[task]
        base = builtin
        if task == "classification":
            base = lambda outputs, batch: classification_loss(outputs, batch, fixed_order=True)
        eval_loss = _sample_weighted(base, ones=class_weight is not None)
        loss = _sample_weighted(builtin, class_weight)
    task_obj = Task(apply, loss, metrics or BUILTIN_METRICS[task], eval_loss)
    if not hparams:
        return task_obj
    return task_obj._replace(
        loss=takes_hparams(task_obj.loss),
        metrics=takes_hparams(task_obj.metrics),
        eval_loss=None if eval_loss is None else takes_hparams(eval_loss),
    )


def _sample_weighted(loss: Callable, class_weight=None, ones: bool = False) -> Callable:
    """A built-in loss that returns (values [B], weights [B]) where the batch has a "weight" (a sample weight)
    or `class_weight` is given (`ones`: weights of 1, so that evaluation's sums have training's structure);
    the loss itself, unchanged, otherwise (decided when traced: nothing is added to a run without weights)."""

    def weighted(outputs, batch):
        values = loss(outputs, batch)
        weights = None
        if class_weight is not None:
            weights = jnp.asarray(class_weight, jnp.float32)[batch["y"]]
        if "weight" in batch:
            w = batch["weight"].astype(jnp.float32)
            weights = w if weights is None else weights * w
        if weights is None and ones:
            weights = jnp.ones_like(values)
        return values if weights is None else (values, weights)

    return weighted


def positional_count(function) -> int:
    """How many positional arguments `function` takes (a large number for *args; 0 where it cannot be read)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 0
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return 1 << 10
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


class HParams:
    """config.hparams' numbers as a hook sees them: `hparams.weight` or `hparams["weight"]` (traced scalars)."""

    def __init__(self, values: dict):
        self._values = dict(values)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(
                f"config.hparams has no number {name!r}; its numbers are {sorted(self._values)} (set it in "
                "get_config: config.hparams.NAME = value)."
            ) from None

    def __getitem__(self, name: str):
        return self.__getattr__(name)

    def __contains__(self, name) -> bool:
        return name in self._values

    def keys(self):
        return self._values.keys()


def takes_hparams(function: Callable, extra_at: int = 2) -> Callable:
    """`function` called with the hparams (an HParams view) as its third argument where it takes one, else
    without them."""
    if positional_count(function) > extra_at:
        return lambda first, second, hparams: function(first, second, HParams(hparams))
    return lambda first, second, hparams: function(first, second)


def cast_floats(tree, dtype):
    """Every floating array of `tree` in `dtype` (integer inputs, labels and keys untouched)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def in_compute_dtype(apply: Callable, dtype) -> Callable:
    """A Task's apply that computes in `dtype` (bfloat16): the parameters and floating inputs cast on the way
    in (the parameters stay float32 in the state: their gradients come back through the cast in float32), the
    floating outputs cast to float32 on the way out, so the loss and the metrics reduce in float32."""

    def apply_in_dtype(params, model_state, x_b, key, train: bool):
        outputs, new_state = apply(cast_floats(params, dtype), model_state, cast_floats(x_b, dtype), key, train)
        # BatchNorm's statistics keep their dtype in the carry, whatever the model computed them in.
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, model_state)
        return cast_floats(outputs, jnp.float32), new_state

    return apply_in_dtype


def takes(module, name: str) -> bool:
    """Whether a flax module's __call__ takes an argument `name` ("train", "rngs")."""
    try:
        return name in inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        return False


def takes_train(module) -> bool:
    """Whether a flax module's __call__ takes `train` (the trainer then passes True in training, False else)."""
    return takes(module, "train")


OTHER_STREAMS = 1  # fold_in(step key, 1): the streams of a linen module's own (see linen_apply)


def linen_apply(module) -> Callable:
    """The Task's apply of a flax linen module: its mutable collections are the model state (updated in
    training only), `key` is the "dropout" stream, and `train` is passed where __call__ takes it. Any other
    stream the module asks for (`self.make_rng("noise")`) draws from a "params" stream folded from `key`:
    linen falls back to "params" for a stream it is not given, so each is keyed from the step as dropout is."""
    with_train = takes_train(module)

    def apply(params, model_state, x_b, key, train: bool):
        kwargs = {"train": train} if with_train else {}
        if key is not None:
            kwargs["rngs"] = {"dropout": key, "params": jax.random.fold_in(key, OTHER_STREAMS)}
        variables = {"params": params, **(model_state or {})}
        if train and model_state:
            outputs, updated = module.apply(variables, x_b, mutable=list(model_state), **kwargs)
            return outputs, dict(updated)
        return module.apply(variables, x_b, **kwargs), model_state

    return apply


def linen_init(module, key: jax.Array, x_1) -> tuple[Any, Any]:
    """(params, model_state) of a linen module: its "params" collection and every other one."""
    kwargs = {"train": False} if takes_train(module) else {}
    # "params" draws from `key` itself, as module.init(key, x) does: the built-in models' parameters are theirs.
    variables = dict(module.init({"params": key, "dropout": jax.random.fold_in(key, 1)}, x_1, **kwargs))
    params = variables.pop("params")
    return params, variables
