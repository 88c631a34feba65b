"""The workdir of a run: what it holds, whether a new command may resume it, and its config.json."""

from __future__ import annotations

import json
import pathlib
import shutil
import warnings

import ml_collections

from jaxepochs.host import checkpoint as checkpoint_lib
from jaxepochs.host import config as config_lib

RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "run.json")
RESUMABLE_KEYS = (  # may change when resuming
    "train.epochs",
    "train.epochs_per_call",
    "train.host_interval_seconds",
    "checkpoint.",
    "data.data_dir",
    "train.compilation_cache_dir",
    "experiment.",  # a changed module is said when resuming (workdir.prepare_workdir), not refused
)


class WorkdirError(ValueError):
    """The workdir holds a run that this one cannot continue."""


def _say_if_the_module_changed(workdir: pathlib.Path, old: dict, new: dict) -> None:
    was, now = old.get("experiment.source_sha256", ""), new.get("experiment.source_sha256", "")
    if was and now and was != now:
        warnings.warn(
            f"The experiment module {new.get('experiment.module')} changed since the run in {workdir} started; it "
            "resumes with the module as it is now. Use --restart to train the new one from the start.",
            stacklevel=3,
        )


def prepare_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, restart: bool) -> bool:
    """Makes `workdir` ready; True when it holds a run of the same config to resume."""
    used = any((workdir / name).exists() for name in (*RUN_FILES, "config.json", checkpoint_lib.CHECKPOINT_DIR))
    if used and restart:
        shutil.rmtree(workdir / checkpoint_lib.CHECKPOINT_DIR, ignore_errors=True)
        for name in (*RUN_FILES, "config.json"):
            (workdir / name).unlink(missing_ok=True)
        used = False
    if used:
        if not (workdir / "config.json").exists():
            raise WorkdirError(
                f"{workdir} holds run outputs but no config.json, so it cannot be resumed. Use a new --workdir, "
                "or --restart (restart=True) to discard them."
            )
        old = config_lib.flatten(json.loads((workdir / "config.json").read_text()))
        new = config_lib.flatten(json.loads(config.to_json_best_effort()))
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
                "(restart=True) to discard that run. Only train.epochs, train.epochs_per_call, "
                "train.host_interval_seconds, checkpoint.* and data.data_dir may change when resuming."
            )
        _say_if_the_module_changed(workdir, old, new)
        if not config.checkpoint.enabled:
            raise WorkdirError(
                f"{workdir} holds a run, and checkpoint.enabled=False cannot resume it. Enable checkpoints, use a "
                "new --workdir, or --restart (restart=True) to start over."
            )
        if not (workdir / checkpoint_lib.CHECKPOINT_DIR).exists():
            raise WorkdirError(
                f"{workdir} holds a run without checkpoints to resume from. Use a new --workdir, or --restart "
                "(restart=True) to start over."
            )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    return used
