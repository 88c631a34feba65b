"""Compaction: the runs of a chunk that have halted leave its program, and the others go on as a smaller batch.

A halted run is frozen inside the run program (core/program.py) but still computes: under `jax.vmap` its lane
costs what a training one does, so a sweep whose runs mostly stop early would cost as much as one in which none
stop. At a compaction point (every `EVERY` epochs, and after each rung of a pruned sweep: calls end there), once
the runs still training fit a batch of half the size or less, their lanes are gathered into a batch of the next
power of two (padded with a halted copy of the first), trained by the same program compiled for that size (each
size once, kept for the other chunks of the group). The halted runs' last state is kept on the host, and
whoever reads the carry (a checkpoint, the final evaluation) gets every run's, in the chunk's order: a
checkpoint's format does not change.

Which lanes train which epoch is a function of the rows alone (replayed from the histories at each call), so a
resumed chunk trains each epoch in the batch the uninterrupted one did: XLA's kernels may sum a lane's numbers
in another order in a batch of another size (float32 round-off in the metrics), and a resume stays bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxepochs.host import devices
from jaxepochs.host.batch import RunBatch

EVERY = 10  # epochs between compaction points (besides a pruned sweep's rungs)


def bucket(active: int, full: int, shards: int = 1) -> int:
    """The batch size for `active` runs still training: the next power of two (at least `shards`, the devices
    the run axis is split over), at most the chunk's size."""
    return min(full, max(shards, 1 << max(active - 1, 0).bit_length()))


class Lanes:
    """Which of a chunk's runs (`batch`) the program in use trains: lane j trains member `index[j]` for j <
    `count`; the lanes after are padding. `call` is the program of the whole chunk; `programs`: compiled
    programs by size, shared by the chunks of a group; `rungs`: a pruned sweep's rung epochs."""

    def __init__(self, batch: RunBatch, call, programs: dict, enabled: bool, rungs=()):
        self.batch, self._call, self.programs = batch, call, programs
        # A mesh with a data axis keeps its batch, and so do several processes; runs split over 2**k devices stay
        # whole shards when compacted.
        self.shards = batch.comp.runs_devices
        whole_shards = self.shards & (self.shards - 1) == 0
        self.enabled = enabled and batch.comp.layout is None and whole_shards and not devices.multi_process()
        epochs = batch.comp.loop.epochs
        self.points = sorted({e for e in range(EVERY + 1, epochs + 1, EVERY)} | {r + 1 for r in rungs})
        self.index = np.arange(len(batch.members))
        self.count = len(batch.names)
        self.full = None  # every member's carry on the host, once the program trains fewer

    def boundaries(self) -> frozenset[int]:
        """The epochs a call must start at: the compaction points."""
        return frozenset(self.points) if self.enabled else frozenset()

    def lane_names(self) -> list[str | None]:
        return [self.batch.names[i] if j < self.count else None for j, i in enumerate(self.index)]

    def call(self, carry, first: int, count: int):
        """The driver's call: compacts first where the replayed layout for epoch `first` is smaller; rows are
        the whole chunk's."""
        if self.enabled:
            layout = self._layout(first, carry)
            if len(layout) < len(self.index):
                carry = self._compact(carry, layout)
        carry, rows = self._call(carry, first, count)
        return carry, self._expanded(rows)

    def _layout(self, first: int, carry) -> np.ndarray:
        """The lanes that train epoch `first`: from the whole chunk, at each compaction point up to it, the runs
        still training after the epoch before, once they fit a batch of half the size (or less)."""
        done = first - 1  # the last epoch trained: its halted flags are the carry's, earlier ones the rows'
        halted_now = None
        index = np.arange(len(self.batch.members))
        for point in (p for p in self.points if p <= first):
            if point - 1 == done and halted_now is None:
                halted_now = self._halted(carry)
            active = [i for i, name in enumerate(self.batch.names) if self._trained(name, point, done, halted_now, i)]
            size = bucket(len(active), len(self.batch.members), self.shards)
            if active and size < len(index):
                index = np.array(active + active[:1] * (size - len(active)))
        return index

    def _trained(self, name: str, epoch: int, done: int, halted_now, i: int) -> bool:
        """Whether member `name` (the chunk's i-th) trained epoch `epoch` (is still training after the one
        before): its row, or a non-finite epoch there; for the next epoch, its halted flag now."""
        if epoch - 1 == done:
            return not halted_now[i]
        return len(self.batch.histories[name]) >= epoch or self.batch.non_finite.get(name, 0) >= epoch

    def _halted(self, carry) -> np.ndarray:
        """Each member's halted flag now, in the chunk's order."""
        lanes = np.asarray(jax.device_get(carry.halted))
        if self.full is None:
            return lanes
        halted = np.asarray(self.full.halted).copy()
        halted[self.index[: self.count]] = lanes[: self.count]
        return halted

    def whole(self, carry):
        """The chunk's carry, every member in its place: `carry` itself while the program trains them all."""
        if self.full is None:
            return carry
        lanes = devices.fetch(carry)

        def put(full, lane):
            full = np.array(full)
            full[self.index[: self.count]] = np.asarray(lane)[: self.count]
            return full

        self.full = jax.tree.map(put, self.full, lanes)
        return self.full

    def _compact(self, carry, index: np.ndarray):
        full = self.whole(carry) if self.full is not None else devices.fetch(carry)
        self.full = jax.tree.map(np.asarray, full)
        count = len(set(index.tolist()))
        size = len(index)
        sub = RunBatch(self.batch.comp, [self.batch.members[i] for i in index])
        splits, es_hparams = sub.splits(), sub.es_hparams()
        compiled = self.programs.get(("lanes", size))
        if compiled is None:
            compiled = self.programs[("lanes", size)] = sub.compile(splits, es_hparams)
        self._call = sub.caller(compiled, splits, es_hparams)
        self.index, self.count = index, count
        gathered = jax.tree.map(lambda a: a[index], self.full)
        padding = np.arange(size) >= count
        gathered = gathered._replace(halted=np.asarray(gathered.halted) | padding)
        return sub.place(gathered) if sub.sharding is not None else jax.device_put(gathered)

    def _expanded(self, rows):
        """A call's rows with the whole chunk's run axis: the lanes' rows in their members' places, the members
        outside the program halted and untrained."""
        if self.full is None:
            return rows
        members, lanes = len(self.batch.members), self.index[: self.count]

        def expand(leaf, fill=0):
            full = np.full((members, *leaf.shape[1:]), fill, leaf.dtype)
            full[lanes] = np.asarray(leaf)[: self.count]
            return full

        rows = devices.fetch(rows)
        expanded = jax.tree.map(expand, rows._replace(ran=None, halted=None))
        return expanded._replace(ran=rows.ran, halted=expand(rows.halted, True))
