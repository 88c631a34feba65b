"""Weights & Biases as a writer (logging.wandb): one W&B run per workdir, as MLflow has (host/writers.py).

    logging.wandb = False         # a W&B run: the flattened config, every epoch at step `epoch`, the summary
    logging.wandb_project = "jaxepochs"
    logging.wandb_dir = ""        # wandb.init's dir (its files in DIR/wandb/): "" = $WANDB_DIR, else the workdir
    logging.wandb_mode = ""       # "offline" or "online"; "" = $WANDB_MODE, else "offline"

WORKDIR/wandb.json records the run's id and the last epoch it logged, so a resumed run goes on in the same W&B
run (resume="allow") and logs each epoch once, whether wandb is offline (where nothing but this record says what
the run holds) or online. wandb is imported here only, when a run turns it on (it takes 1.5 s to import).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

from jaxepochs.host import config as config_lib
from jaxepochs.host import report
from jaxepochs.host.tensorboard import scalars

LogSpec = Any  # host/writers.LogSpec (the logging section's settings); not imported: writers imports this module

WANDB_RECORD = "wandb.json"  # the workdir's W&B run and its last logged epoch
WANDB_LEAST = (0, 19, 10)  # reinit="create_new": a run of ours beside any run the user's code has open

_ENDED: dict[pathlib.Path, WandbLog] = {}  # runs whose training loop ended, open until finish_wandb


def import_wandb():
    """wandb, or a ConfigError with the pip command."""
    try:
        import wandb
    except ImportError:
        raise config_lib.ConfigError(
            "config.logging.wandb = True, but wandb is not installed. Install it with "
            "`pip install 'jaxepochs[wandb]'` (or `pip install wandb`), or set logging.wandb = False."
        ) from None
    version = tuple(int(part) for part in re.findall(r"\d+", wandb.__version__)[:3])
    if version < WANDB_LEAST:
        raise config_lib.ConfigError(
            f"config.logging.wandb = True, but wandb is {wandb.__version__}; jaxepochs needs wandb >= 0.19.10. "
            "Upgrade it with `pip install -U 'jaxepochs[wandb]'`, or set logging.wandb = False."
        )
    return wandb


def wandb_mode(setting: str) -> str | None:
    """logging.wandb_mode, else wandb's own choice where $WANDB_MODE makes one (None: wandb reads it), else
    "offline": without the user's word no run contacts a server (`wandb sync DIR/wandb/offline-run-*` uploads)."""
    return setting or (None if os.environ.get("WANDB_MODE") else "offline")


class WandbLog(report.MetricWriter):
    """The W&B run of `workdir` (its id in WORKDIR/wandb.json): the flattened config as its config, each epoch's
    metrics at step `epoch` (an epoch it already logged is not logged again), and at `finish` summary.json's
    fields in its summary. `home`: the workdir whose wandb/ holds the files (a sweep's, for its members)."""

    def __init__(self, workdir: pathlib.Path, spec: LogSpec, rows: list[dict], name: str | None = None,
                 home: pathlib.Path | None = None):  # fmt: skip
        wandb = import_wandb()
        stale = _ENDED.pop(workdir, None)
        if stale is not None:  # its command raised before finish_wandb: the run failed
            stale.finish({}, "FAILED")
        self._record, self.workdir = workdir / WANDB_RECORD, workdir
        record = self._read_record(spec.wandb_project)
        directory = spec.wandb_dir or (None if os.environ.get("WANDB_DIR") else str(home or workdir))
        if directory:
            directory = str(pathlib.Path(directory).expanduser())
            pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=spec.wandb_project, dir=directory, id=record.get("id"), name=name or workdir.name,
            config=dict(spec.params), resume="allow", mode=wandb_mode(spec.wandb_mode), reinit="create_new",
            settings=wandb.Settings(console="off"),  # the terminal is the progress bar's; the rows are logged
        )  # fmt: skip
        self._project = spec.wandb_project
        # Online, a resumed run starts past the steps the server holds; offline, only the record knows.
        self._logged = max(record.get("logged", 0), self.run.starting_step - 1)
        self._write_record()  # the id before any row: a run killed now resumes in this W&B run
        self.write_rows(rows)

    def _read_record(self, project: str) -> dict:
        """The record of this workdir's W&B run; none (a new run) if it is of another project."""
        if not self._record.exists():
            return {}
        record = json.loads(self._record.read_text())
        return record if record.get("project") == project else {}

    def _write_record(self) -> None:
        record = {"project": self._project, "id": self.run.id, "logged": self._logged}
        report.replace_file(self._record, (json.dumps(record) + "\n").encode())

    def write_rows(self, rows: list[dict]) -> None:
        """The rows past the last logged epoch; the record is written after them, so a kill in between logs an
        epoch twice at worst (online, W&B drops a step it holds), never skips one."""
        new = [row for row in rows if row["epoch"] > self._logged]
        for row in new:
            self.run.log(scalars(row), step=row["epoch"])
        if new:
            self._logged = new[-1]["epoch"]
            self._write_record()

    def close(self) -> None:
        """The run stays open past the training loop: summary.json's final metrics come after the final
        evaluation (finish_wandb). A command that raises before then leaves it to the next WandbLog of this
        workdir, or to wandb's exit hook, to end it as failed."""
        _ENDED[self.workdir] = self

    def finish(self, summary: dict, status: str, curves: pathlib.Path | None = None) -> None:
        """summary.json's fields in the run's summary (the final validation and test metrics as
        `final_<name>`, as TensorBoard has them: the history's `val_loss` stays the last epoch's), curves.png as
        an image, and the run's end: finished, or failed (a non-finite loss, a Ctrl-C: exit code 1)."""
        import wandb

        _ENDED.pop(self.workdir, None)
        self.run.summary.update({(f"final_{k}" if k.startswith(("val_", "test_")) else k): v
                                 for k, v in summary.items()})  # fmt: skip
        if curves is not None and curves.exists():
            self.run.summary["curves"] = wandb.Image(str(curves))
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def finish_wandb(workdir: pathlib.Path, spec: LogSpec, history: list[dict], summary: dict, status: str) -> None:
    """The end of the workdir's W&B run (its training loop's, still open; else opened again, logging no epoch
    twice), with summary.json's fields and curves.png."""
    log = _ENDED.pop(workdir, None) or WandbLog(workdir, spec, history)
    log.finish(summary, status, workdir / "curves.png")
