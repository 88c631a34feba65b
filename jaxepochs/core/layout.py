"""Where a run's arrays live on a device mesh: the batch split over the `data` axis, a sweep's runs over `runs`.

    layout = Layout(mesh)          # mesh axes ("runs", "data"); None: one device, no annotations at all
    layout.rows(batch, axis=0)     # inside a program: this axis of every array split over "data"
    layout.state(tree)             # inside a program: parameters and optimizer state where they live

Programs stay the code one device runs; the layout only annotates (`jax.lax.with_sharding_constraint`) and XLA's
SPMD partitioner does the rest: each device computes the forward and backward pass of its rows, the gradients
are summed over "data" by an all-reduce, and the replicated update is the same on every device. With
`shard_params` the parameters and the optimizer's moments are split over "data" too (FSDP, ZeRO-3): each lives
on one device in D, gathered for the step where it is needed; the numbers are those of the replicated layout.
Under `jax.vmap(..., spmd_axis_name="runs")` (a sweep) every annotation gains the run axis on "runs".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

RUNS, DATA = "runs", "data"
# A parameter smaller than this stays replicated under shard_params: splitting it saves nothing and costs a
# collective per step.
MIN_SHARDED_ELEMENTS = 1 << 14


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    mesh: Mesh  # axes (RUNS, DATA)
    shard_params: bool = False

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def runs_size(self) -> int:
        return self.mesh.shape[RUNS]

    def rows(self, tree, axis: int = 0):
        """`tree` with axis `axis` of each array split over "data" (left alone where it does not divide)."""
        if self.data_size == 1:
            return tree

        def constrain(a):
            if a.ndim <= axis or a.shape[axis] % self.data_size:
                return a
            return jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, P(*[None] * axis, DATA)))

        return jax.tree.map(constrain, tree)

    def param_spec(self, shape: tuple[int, ...]) -> P:
        """A parameter's (or an optimizer moment's) partition, without a run axis: replicated, or with
        `shard_params` its largest axis that "data" divides split over it."""
        if not self.shard_params or self.data_size == 1 or _size(shape) < MIN_SHARDED_ELEMENTS:
            return P()
        fits = [i for i, n in enumerate(shape) if n % self.data_size == 0]
        if not fits:
            return P()
        axis = max(fits, key=lambda i: shape[i])
        return P(*[None] * axis, DATA)

    def state(self, tree):
        """Inside a program: every array of `tree` (a TrainState, a carry) where `param_spec` puts it."""
        if not self.shard_params or self.data_size == 1:
            return tree
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, self.sharding(a.shape)), tree)

    def sharding(self, shape: tuple[int, ...], run_axis: bool = False) -> NamedSharding:
        """The NamedSharding of an array of `shape` (with a leading run axis on "runs" where `run_axis`)."""
        if run_axis:
            return NamedSharding(self.mesh, P(RUNS, *self.param_spec(tuple(shape[1:]))))
        return NamedSharding(self.mesh, self.param_spec(tuple(shape)))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def per_run(self) -> NamedSharding:
        """Arrays whose leading axis is the run axis, their other axes replicated (a CV fold's data)."""
        return NamedSharding(self.mesh, P(RUNS))


def _size(shape) -> int:
    size = 1
    for n in shape:
        size *= int(n)
    return size


def make_mesh(devices, runs: int, data: int) -> Mesh:
    """A (runs, data) mesh over the first runs * data of `devices` (jax.devices(): every process's, in order)."""
    import numpy as np

    chosen = np.asarray(devices[: runs * data], dtype=object).reshape(runs, data)
    return Mesh(chosen, (RUNS, DATA))


def carry_shardings(layout: Layout, abstract_carry: Any):
    """The NamedSharding of every array of a carry with a leading run axis."""
    return jax.tree.map(lambda a: layout.sharding(a.shape, run_axis=True), abstract_carry)
