"""Which run of a workdir a reader means (`jaxepochs.load(workdir, run=...)`, `jaxepochs predict --run`,
`init.from_workdir`): a run's workdir holds one run, "r0"; a sweep's workdir holds its members ("r3", and with
--cv "r3_fold1", each in the checkpoints of its chunk, `chunks/group{g}_chunk{c}/`, at its place on the chunk's
run axis) and, after --cv K --refit, each configuration's refit, an ordinary run in `refit/r3/` (named "r3"
there, or "refit/r3"). A member may also be named in the path: `SWEEPDIR/r3` is `SWEEPDIR` with run "r3".

    where = members.resolve(workdir, run)   # -> Where: the checkpoints' directory, the config, the place
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, NamedTuple

from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host.workdir import WorkdirError

RUN_NAME = "r0"  # a run's one member, as its checkpoints' histories name it
_CHUNK_DIR = re.compile(r"group(\d+)_chunk(\d+)")
_MEMBER = re.compile(r"r(\d+)(?:_fold(\d+))?")


class Where(NamedTuple):
    """Where one run's arrays are: a checkpoints' directory and the run's place on their run axis."""

    directory: pathlib.Path  # holds checkpoints/ (a run's workdir, a sweep's chunk)
    config: Any  # the run's config (a sweep member's: the sweep's with its grid values)
    shapes: dict | None  # run.json's shapes; None for a chunk written before chunks had one
    name: str  # its name in the checkpoints' histories
    index: int  # its place on the run axis
    size: int  # the run axis' length (a sweep's chunk size; 1 for a run)
    label: str  # how messages name it
    cv: int = 0  # a sweep member's K folds (--cv K): its validation split is a fold


def _read_config(path: pathlib.Path):
    try:
        return config_lib.from_json(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path} is damaged ({e}); the run there cannot be read.") from None


def _of_run(workdir: pathlib.Path, run: str | None, label: str) -> Where:
    if run not in (None, RUN_NAME):
        raise WorkdirError(f"{workdir} holds one run ({RUN_NAME}), not {run!r}; leave the run out.")
    if not (workdir / "run.json").exists():
        raise WorkdirError(f"{workdir} holds no jaxepochs run (no run.json); pass the --workdir of a run.")
    shapes = json.loads((workdir / "run.json").read_text())
    return Where(workdir, _read_config(workdir / "config.json"), shapes, RUN_NAME, 0, 1, label)


def _is_sweep(workdir: pathlib.Path) -> bool:
    return (workdir / "sweep.json").exists()


def resolve(workdir: str | pathlib.Path, run: str | None = None) -> Where:
    """Where the run `run` of `workdir` is (a run's workdir: None or "r0"; a sweep's: a member's name, or a
    refit's); WorkdirError naming the members when there is no such run."""
    workdir = pathlib.Path(workdir).expanduser()
    if run is None and not workdir.exists() and _is_sweep(workdir.parent):  # SWEEPDIR/r3
        workdir, run = workdir.parent, workdir.name
    if not _is_sweep(workdir):
        return _of_run(workdir, run, str(workdir))
    if run is not None and run.startswith("refit/"):
        run = run.removeprefix("refit/")
        if not (workdir / "refit" / run / "run.json").exists():
            raise WorkdirError(f"sweep {workdir} has no refit of {run}; {_listing(workdir)}")
        return _of_run(workdir / "refit" / run, None, f"{workdir} refit {run}")
    chunks = _chunks(workdir)
    if run is None:
        raise WorkdirError(f"{workdir} holds a sweep: name one of its runs (run=..., --run). {_listing(workdir)}")
    for directory, names in chunks:
        if run in names:
            return _member(workdir, directory, names, run)
    if (workdir / "refit" / run / "run.json").exists():  # a --cv sweep's configuration: its refit
        return _of_run(workdir / "refit" / run, None, f"{workdir} refit {run}")
    raise WorkdirError(f"sweep {workdir} has no run {run!r}. {_listing(workdir)}")


def _chunks(workdir: pathlib.Path) -> list[tuple[pathlib.Path, list[str]]]:
    """Each chunk's directory and its members' names, in their order on the run axis (from the newest
    checkpoint's histories; a chunk that saved none yet has none)."""
    found = []
    for directory in sorted((workdir / "chunks").glob("group*_chunk*")):
        if not (directory / checkpoint_lib.CHECKPOINT_DIR).is_dir():
            continue
        ckpt = checkpoint_lib.Checkpointer(directory)
        try:
            epochs = ckpt.epochs()
            names = list(ckpt.meta(epochs[-1])["histories"]) if epochs else []
        finally:
            ckpt.close()
        found.append((directory, names))
    return found


def names(workdir: pathlib.Path) -> list[str]:
    """The runs a reader may name in a sweep's workdir: its members, then its refits ("refit/r3")."""
    members = [name for _, chunk in _chunks(workdir) for name in chunk]
    refits = sorted(f"refit/{p.parent.name}" for p in (workdir / "refit").glob("*/run.json"))
    return sorted(members) + refits


def _listing(workdir: pathlib.Path) -> str:
    found = names(workdir)
    if not found:
        return "It has no checkpoint yet: no run of it has finished an epoch."
    shown = ", ".join(found[:40]) + (f" ... ({len(found)} in all)" if len(found) > 40 else "")
    return f"Its runs: {shown}."


def _member(workdir: pathlib.Path, directory: pathlib.Path, chunk: list[str], run: str) -> Where:
    spec = json.loads((workdir / "sweep.json").read_text())
    match, group = _MEMBER.fullmatch(run), _CHUNK_DIR.fullmatch(directory.name)
    if match is None or group is None:
        raise WorkdirError(f"sweep {workdir}: cannot tell the configuration of run {run!r} in {directory}.")
    config = config_lib.from_json(json.dumps(spec["config"]))
    config = config_lib.apply_overrides(config, spec["grid"][int(match.group(1))])
    chunking = json.loads((workdir / "chunking.json").read_text())
    size = int(chunking[group.group(1)])
    shapes = json.loads((directory / "run.json").read_text()) if (directory / "run.json").exists() else None
    return Where(directory, config, shapes, run, chunk.index(run), size, f"{workdir} run {run}", int(spec["cv"]))
