"""A trained run as a model to call: `load_model(workdir, epoch, run)` (exported as `jaxepochs.load_model`).

    model = jaxepochs.load_model("runs/mlp", "best")      # or a sweep's member: run="r3", or "runs/sweep/r3"
    probs = jax.nn.softmax(model.predict(x_test))        # [N, classes]: every example, in batches
    model.state                                          # the TrainState that jaxepochs.load returns
    model.apply(x_b)                                     # the forward pass of one batch

`predict` is the run's evaluation forward pass (BatchNorm's statistics, no dropout; the run's compute dtype):
compiled once per batch size, over batches of `batch_size` (the config's train.eval_batch_size by default) with
the last one padded (its last example repeated) and the padding dropped, on the devices the run would use
(its batches' rows over the mesh's "data" axis). Inputs are checked against the shapes and dtypes the run was
trained on (run.json) before anything runs: a ValueError names the expected ones.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxepochs.core import layout as layout_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import devices, saved_run


class InputError(ValueError):
    """Inputs that do not fit the model; the message names the shapes and dtypes it takes."""


def _is_spec(spec) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], np.dtype)


def describe(specs) -> str:
    """ "[N, 40] float32" (or each input's, by name) for messages."""
    one = lambda spec: f"[N, {', '.join(map(str, spec[0]))}] {spec[1].name}".replace("[N, ]", "[N]")
    if _is_spec(specs):
        return one(specs)
    named = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]
    return "{" + ", ".join(f"{jax.tree_util.keystr(path)}: {one(spec)}" for path, spec in named) + "}"


def _check_leaf(a, spec, where: str, expected: str):
    shape, dtype = spec
    a = a if isinstance(a, np.ndarray | jax.Array) else np.asarray(a)
    got = f"{list(a.shape)} {np.dtype(a.dtype).name}"
    if tuple(a.shape[1:]) != tuple(shape) or a.ndim != len(shape) + 1:
        hint = " (one example: add a leading batch axis, x[None])" if tuple(a.shape) == tuple(shape) else ""
        raise InputError(f"{where}: the model takes inputs {expected}; got {got}{hint}.")
    if a.dtype != dtype:
        if not np.can_cast(a.dtype, dtype, "same_kind"):
            raise InputError(f"{where}: the model takes inputs {expected}; got {got}, which does not cast to {dtype}.")
        a = np.asarray(a).astype(dtype)
    return a


def check_inputs(x, specs, what: str = "predict"):
    """`x` as the model takes it (each array [N, ...] of the run's input shapes, cast to its dtype where that
    loses no kind: float64 to float32); InputError naming the expected shapes and dtypes otherwise."""
    expected = describe(specs)
    if isinstance(x, dict) and _is_spec(specs) and len(x) == 1:
        x = next(iter(x.values()))  # an .npz of one array
    structure = jax.tree.structure(specs, is_leaf=_is_spec)
    if jax.tree.structure(x) != structure:
        raise InputError(f"{what}: the model takes inputs {expected}; got {jax.tree.structure(x)}.")
    leaves = [_check_leaf(a, s, what, expected) for a, s in zip(jax.tree.leaves(x), jax.tree.leaves(specs,
              is_leaf=_is_spec), strict=True)]  # fmt: skip
    sizes = {a.shape[0] for a in leaves}
    if len(sizes) != 1:
        raise InputError(f"{what}: the inputs hold different numbers of examples {sorted(sizes)}.")
    return jax.tree.unflatten(structure, leaves)


class SavedModel:
    """A run's checkpoint as a model: `state` (the TrainState), `predict(x)`, `apply(x_b)`, `inference_fn`."""

    def __init__(self, saved: saved_run.SavedRun):
        self.saved = saved
        self.state = saved.state
        self.config = saved.config
        self.epoch = saved.epoch  # the checkpoint's
        self.name = saved.where.label
        self.input_specs = saved_run.input_specs(saved.shapes)  # per example: (shape, dtype), a pytree of them
        self.num_classes = saved.shapes["num_classes"]
        self.weights = {"params": saved.state.params, "model_state": saved.state.model_state}
        self._programs: dict[int, tuple] = {}  # batch size -> (jitted program, layout)

    def inference_fn(self, weights, x_b):
        """The evaluation forward pass, pure: (weights {"params", "model_state"}, a batch) -> outputs."""
        return self.saved.pieces.task.apply(weights["params"], weights["model_state"], x_b, None, False)[0]

    def apply(self, x_b):
        """The outputs of one batch (any size; compiled per size)."""
        return self.predict(x_b, batch_size=jax.tree.leaves(x_b)[0].shape[0])

    def _program(self, batch_size: int):
        """(the jitted forward pass, the weights placed, how a batch is placed) for batches of `batch_size`."""
        if batch_size not in self._programs:
            layout = _layout(self.config.mesh, batch_size)
            if layout is None:
                weights, rows = self.weights, lambda batch: batch
            else:
                weights = devices.put(self.weights, jax.tree.map(lambda a: layout.sharding(a.shape), self.weights))
                rows = lambda batch: devices.put(batch, NamedSharding(layout.mesh, P(layout_lib.DATA)))
            self._programs[batch_size] = (jax.jit(self.inference_fn), weights, rows)
        return self._programs[batch_size]

    def predict(self, x, batch_size: int | None = None):
        """The model's outputs for every example of `x` ([N, ...], or a pytree of such as the run's inputs), as
        numpy: batches of `batch_size` (default train.eval_batch_size), the last padded and its padding dropped."""
        x = check_inputs(x, self.input_specs)
        n = jax.tree.leaves(x)[0].shape[0]
        if n == 0:
            raise InputError("predict: no examples (the inputs' leading axis is 0).")
        batch_size = int(batch_size or self.config.train.eval_batch_size)
        if batch_size < 1:
            raise InputError(f"predict: batch_size {batch_size}: give 1 or more.")
        program, weights, rows = self._program(min(batch_size, n))
        size = min(batch_size, n)
        outputs = []
        for start in range(0, n, size):
            # the last batch: its last example repeated (a slice elsewhere: no copy)
            rows_of = (
                slice(start, start + size) if start + size <= n else np.minimum(np.arange(start, start + size), n - 1)
            )
            batch = jax.tree.map(lambda a, i=rows_of: a[i], x)
            outputs.append(program(weights, rows(batch)))
        outputs = jax.device_get(outputs)
        return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *outputs)


def _layout(mesh, batch_size: int):
    """The run's layout for batches of `batch_size` (its rows over the "data" devices that divide it); None on
    one device, or where the run's devices are not all here."""
    try:
        return devices.run_layout(mesh, batch_size, 1, False, lambda text: None)
    except config_lib.ConfigError:
        return None


def load_model(workdir: str | pathlib.Path, epoch: int | str | None = None, run: str | None = None) -> SavedModel:
    """A run's checkpoint as a SavedModel: the newest (None), "best" or epoch N; `run` a sweep's member ("r3",
    "r3_fold1") or refit ("refit/r3"), also given as the path SWEEPDIR/r3."""
    return SavedModel(saved_run.open_run(workdir, epoch, run))
