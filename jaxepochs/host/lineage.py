"""What a run's checkpoints carry of its history besides its rows, so that a resumed run's summary.json still says
it: the run it was initialised from (init.from_workdir: read on the fresh start only), and each mesh it trained
on with the epochs it trained there.

    lineage = {"initialised_from": {...} or None, "meshes": [{"epochs": [1, 3], "mesh": {...}, "devices": 2}, ...]}
"""

from __future__ import annotations

import math

from jaxepochs.core import layout as layout_lib
from jaxepochs.host import devices


def mesh_entry(layout: layout_lib.Layout | None) -> dict:
    """The mesh a batch trains on, as summary.json's `meshes` name it: its axes and its number of devices."""
    mesh = devices.describe(layout)["mesh"]
    return {"mesh": mesh, "devices": math.prod(mesh.values()), "shard_params": bool(layout and layout.shard_params)}


def meshes(earlier: list[dict], entry: dict, first: int, last: int) -> list[dict]:
    """`earlier`'s meshes (restored with a checkpoint) and `entry`'s epochs `first`..`last` (none when `last` <
    `first`): the same mesh continued is one entry."""
    out = [dict(e) for e in earlier]
    if last < first:
        return out
    if out and out[-1]["epochs"][1] == first - 1 and _same(out[-1], entry):
        out[-1]["epochs"] = [out[-1]["epochs"][0], last]
        return out
    return [*out, {"epochs": [first, last], **entry}]


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("mesh", "devices", "shard_params"))


def changed(earlier: list[dict], entry: dict) -> str | None:
    """What to say when a run resumes on another mesh than its checkpoint's, or None."""
    if not earlier or _same(earlier[-1], entry):
        return None
    was = earlier[-1]
    return (
        f"Resuming on {entry['devices']} device{'s' * (entry['devices'] != 1)} (mesh {entry['mesh']}); the "
        f"checkpoint was written on {was['devices']} (mesh {was['mesh']}): the last digits may differ from an "
        "uninterrupted run (a sum over other shards rounds otherwise)."
    )
