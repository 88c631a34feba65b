"""The workdir of a run: what it holds, whether a new command may resume it, and its config.json."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import warnings

import ml_collections

from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import report as report_lib
from jaxepochs.host import tensorboard

RUN_FILES = ("metrics.jsonl", "metrics.csv", "summary.json", "curves.png", "run.json", "mlflow.json", "wandb.json")
RESUMABLE_KEYS = (  # may change when resuming
    "train.epochs",
    "train.epochs_per_call",
    "train.host_interval_seconds",
    "train.steps_per_call",  # how a streamed epoch is cut into calls, not what it computes
    "data.stream",  # a run may switch between device-resident and streamed data: the same batches either way
    "data.device_memory_",
    "checkpoint.",
    "data.data_dir",
    "train.compilation_cache_dir",
    "mesh.",  # where the arrays live, not what they compute: a checkpoint restores onto any mesh
    "experiment.",  # a changed module is said when resuming (workdir.prepare_workdir), not refused
    "logging.",  # where the rows are written besides metrics.jsonl: each writer starts from the restored rows
    "train.profile_epochs",  # which epochs are traced, not what they compute
)


class WorkdirError(ValueError):
    """The workdir holds a run that this one cannot continue."""


KIND_FILE = "jaxepochs.json"  # {"kind": "run"}: what a workdir holds, so that no other command writes there
KINDS = {
    "run": "a run (`jaxepochs run`)",
    "sweep": "a sweep (`jaxepochs sweep`)",
    "lr-find": "a learning-rate range test (`jaxepochs lr-find`)",
    "study": "a study (`jaxepochs reproduce`)",
    "search": "an Optuna search (`jaxepochs sweep --search optuna`)",
}


def kind_of(workdir: pathlib.Path) -> str | None:
    """What `workdir` holds: "run", "sweep", "lr-find", "study", "search", or None (missing, empty, or none of
    these). Read from its jaxepochs.json, else (a workdir written before it) from the files each kind writes: a
    search's search.json and optuna.db, a sweep's sweep.json, lr-find's lr_find.json and constant_rates/, a
    study's report.md, runs/ and histories/, a run's."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        return None
    try:
        kind = json.loads((workdir / KIND_FILE).read_text()).get("kind")
        if kind in KINDS:
            return kind
    except (OSError, ValueError, AttributeError):  # no marker (or a damaged one): the files say
        pass
    has = lambda *names: any((workdir / name).exists() for name in names)
    if has("search.json", "optuna.db"):
        return "search"
    if has("sweep.json", "sweep.jsonl", "chunking.json"):
        return "sweep"
    if has("lr_find.json", "constant_rates"):
        return "lr-find"
    if has("histories") or (has("report.md") and has("runs", "sweeps")):
        return "study"
    if has(*RUN_FILES, "config.json", checkpoint_lib.CHECKPOINT_DIR, checkpoint_lib.IN_EPOCH_DIR):
        return "run"
    return None


def check_kind(workdir: pathlib.Path, kind: str) -> None:
    """WorkdirError if `workdir` holds another kind of output than `kind`'s (a run into a sweep's workdir would
    overwrite its metrics.csv and delete its TensorBoard directories); writes nothing. --restart does not lift it:
    it discards a workdir's own kind only."""
    held = kind_of(workdir)
    if held is not None and held != kind:
        raise WorkdirError(
            f"--workdir {workdir} holds {KINDS[held]}, not {KINDS[kind]}; writing there would overwrite its "
            f"outputs. Give this {kind} a new --workdir (or delete that directory first if it is no longer needed)."
        )


def claim(workdir: pathlib.Path, kind: str) -> None:
    """`check_kind`, then records `kind` in workdir/jaxepochs.json (creating the workdir)."""
    check_kind(workdir, kind)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / KIND_FILE).exists():
        report_lib.write_text(workdir / KIND_FILE, json.dumps({"kind": kind}) + "\n")


def _say_if_the_module_changed(workdir: pathlib.Path, old: dict, new: dict) -> None:
    was, now = old.get("experiment.source_sha256", ""), new.get("experiment.source_sha256", "")
    if was and now and was != now:
        warnings.warn(
            f"The experiment module {new.get('experiment.module')} changed since the run in {workdir} started; it "
            "resumes with the module as it is now. Use --restart to train the new one from the start.",
            stacklevel=3,
        )


def as_workdir(workdir) -> pathlib.Path:
    """`workdir` as a path that can be a run's directory: TypeError for what is not a path, WorkdirError for a
    path that is a file, lies under a file or cannot be written. Checked before anything else runs."""
    if not isinstance(workdir, str | os.PathLike) or not str(workdir):
        raise TypeError(
            f"workdir is {workdir!r} ({type(workdir).__name__}); pass the run's directory as a str or pathlib.Path."
        )
    path = pathlib.Path(workdir).expanduser()
    if path.is_symlink() and not path.exists():
        raise WorkdirError(
            f"--workdir {path} is a symbolic link to {os.readlink(path)}, which does not exist (a dangling link). "
            "Create that directory, point the link at one, or give another --workdir."
        )
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir {path} is a file, not a directory. Give a directory (it is created if missing).")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise WorkdirError(f"--workdir {path} cannot be created: {existing} is a file. Give a path under a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(
            f"--workdir {path}: {existing} is not writable (permission denied, or a read-only file system). Give a "
            "directory you can write to."
        )
    return path


def checkpointed_epochs(workdir: pathlib.Path) -> list[int]:
    """The epochs of the finished checkpoints in `workdir` (orbax names each by its epoch; a temporary
    directory of an unfinished save has a longer name)."""
    directory = workdir / checkpoint_lib.CHECKPOINT_DIR
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def in_epoch_steps(workdir: pathlib.Path) -> list[int]:
    """The keys of a streamed run's finished checkpoints inside an epoch (the optimizer steps done before them)."""
    directory = workdir / checkpoint_lib.IN_EPOCH_DIR
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _has_finished_epoch(workdir: pathlib.Path) -> bool:
    """Whether an earlier command in `workdir` left something to keep: a checkpointed epoch, a streamed run's
    position inside its first epoch, or a finished run's summary (with checkpoints off). Epochs logged but not
    checkpointed would be trained again anyway."""
    finished = bool(in_epoch_steps(workdir))
    return bool(checkpointed_epochs(workdir)) or finished or (workdir / "summary.json").exists()


def _discard(workdir: pathlib.Path) -> None:
    shutil.rmtree(workdir / checkpoint_lib.CHECKPOINT_DIR, ignore_errors=True)
    shutil.rmtree(workdir / checkpoint_lib.IN_EPOCH_DIR, ignore_errors=True)
    tensorboard.discard(workdir / "tensorboard")  # a link or a mount point kept, with what it holds besides
    shutil.rmtree(workdir / "profile", ignore_errors=True)
    for name in (*RUN_FILES, "config.json"):
        (workdir / name).unlink(missing_ok=True)


def _read_config_json(workdir: pathlib.Path) -> dict:
    try:
        return json.loads((workdir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(
            f"{workdir / 'config.json'} is damaged ({e}), so the run there cannot be resumed. Use a new --workdir, "
            "or --restart (restart=True) to discard it."
        ) from None


def _check_epochs(workdir: pathlib.Path, epochs: int) -> None:
    """A run trained past the epochs asked for now cannot be resumed to them: refused, not silently kept."""
    done = max(checkpointed_epochs(workdir), default=0)
    if done > epochs:
        raise WorkdirError(
            f"{workdir} holds a run trained to epoch {done}, past train.epochs={epochs}. To continue "
            f"it, set train.epochs to {done} or more; for an earlier epoch's state, jaxepochs.load(workdir, "
            "epoch=N) reads any kept checkpoint; --restart (restart=True) trains afresh."
        )


def _check_resumable(workdir: pathlib.Path, new: dict) -> None:
    """WorkdirError unless `workdir`'s run is the config's (`new`, flattened), up to the keys that may change,
    and can be resumed."""
    if not (workdir / "config.json").exists():
        raise WorkdirError(
            f"{workdir} holds run outputs but no config.json, so it cannot be resumed. Use a new --workdir, "
            "or --restart (restart=True) to discard them."
        )
    old = config_lib.flatten(_read_config_json(workdir))
    # A key that the run's jaxepochs did not have yet resumes at its default (the behaviour it had then).
    defaults = config_lib.flatten(json.loads(config_lib.base_config().to_json_best_effort()))
    old.update({k: v for k, v in new.items() if k not in old and defaults.get(k, object()) == v})
    differing = [
        k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS)
    ]
    if differing:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing[:8])
        raise WorkdirError(
            f"{workdir} holds a run with another config ({shown}). Use a new --workdir, or --restart "
            "(restart=True) to discard that run. Only "
            + ", ".join(k + "*" if k.endswith((".", "_")) else k for k in RESUMABLE_KEYS)
            + " may change when resuming."
        )
    _say_if_the_module_changed(workdir, old, new)
    if not new["checkpoint.enabled"]:
        raise WorkdirError(
            f"{workdir} holds a run, and checkpoint.enabled=False cannot resume it. Enable checkpoints, use a "
            "new --workdir, or --restart (restart=True) to start over."
        )
    if not any((workdir / d).exists() for d in (checkpoint_lib.CHECKPOINT_DIR, checkpoint_lib.IN_EPOCH_DIR)):
        raise WorkdirError(
            f"{workdir} holds a run without checkpoints to resume from. Use a new --workdir, or --restart "
            "(restart=True) to start over."
        )
    _check_epochs(workdir, new["train.epochs"])


def prepare_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, restart: bool, say=print) -> bool:
    """Makes `workdir` ready; True when it holds a run of the same config to resume. A workdir whose earlier
    command finished no epoch (it failed or was killed first) holds nothing to resume: it starts afresh. A
    workdir of another kind (a sweep's, lr-find's, a study's) is refused before anything is written."""
    check_kind(workdir, "run")
    used = any((workdir / name).exists() for name in (*RUN_FILES, "config.json", checkpoint_lib.CHECKPOINT_DIR))
    if used and not restart and not _has_finished_epoch(workdir):
        say(f"{workdir} holds no finished epoch of an earlier run; starting afresh.")
        restart = True
    if used and restart:
        _discard(workdir)
        used = False
    if used:
        _check_resumable(workdir, config_lib.flatten(json.loads(config.to_json_best_effort())))
    claim(workdir, "run")
    report_lib.write_text(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    return used
