"""Where a run's rows go besides metrics.jsonl: metrics.csv, TensorBoard and (optionally) MLflow and W&B.

    logging.csv = True           # WORKDIR/metrics.csv: Keras's CSVLogger columns (epoch, then the metrics)
    logging.tensorboard = True   # WORKDIR/tensorboard/: event files, one scalar per metric (step = epoch)
    logging.mlflow = False       # a run in an MLflow store: the config as params, every epoch, the outputs
    logging.wandb = False        # a Weights & Biases run (offline unless told): the config, every epoch, the summary

Every writer starts from the rows a resumed run restored from its checkpoint (the rows past it are trained
again, bit for bit): metrics.csv and the event files are rewritten from them, and MLflow and W&B skip the epochs
their run already holds, so a run killed at any moment and resumed has each epoch once in each of them. A sweep
writes one TensorBoard directory (and MLflow and W&B run) per member, with its swept values in TensorBoard's hparams
plugin. W&B's writer is host/wandb_writer.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

from jaxepochs.host import config as config_lib
from jaxepochs.host import report
from jaxepochs.host.tensorboard import NOT_SCALARS, TensorBoardLog, scalars  # noqa: F401  (writers' names)
from jaxepochs.host.wandb_writer import WandbLog, finish_wandb, import_wandb

MLFLOW_RECORD = "mlflow.json"  # the workdir's MLflow run: a resumed run logs into the same one

MetricWriter = report.MetricWriter  # the writers' interface: write_rows(rows), close()


class NullWriter(MetricWriter):
    """Writes nothing: the log of a process that is not process 0 (its rows are process 0's)."""

    def write_rows(self, rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class CsvLog(MetricWriter):
    """metrics.csv, one row per epoch, epoch first, then the metrics in the order metrics.jsonl logs them; a
    column first seen later (the validation split every n epochs) rewrites the file with it (empty where an
    epoch has none). Rows are appended whole; a rewrite replaces the file atomically."""

    def __init__(self, path: pathlib.Path, rows: list[dict], first: tuple[str, ...] = ("epoch",)):
        self._path, self._rows = path, []
        self._columns: list[str] = list(first)
        for row in rows:
            self._rows.append(row)
            self._columns += [k for k in row if k not in self._columns]
        self._rewrite()

    def _line(self, row: dict) -> str:
        return ",".join(_csv_value(row.get(column)) for column in self._columns) + "\n"

    def _rewrite(self) -> None:
        text = ",".join(self._columns) + "\n" + "".join(self._line(row) for row in self._rows)
        report.replace_file(self._path, text.encode())

    def write_rows(self, rows: list[dict]) -> None:
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        self._rows.append(row)
        new = [k for k in row if k not in self._columns]
        if new:
            self._columns += new
            self._rewrite()
            return
        try:
            with self._path.open("a") as f:
                f.write(self._line(row))
        except OSError as e:  # a full disk: name the file (the run's error says where, and what to do)
            e.filename = e.filename or str(self._path)
            raise

    def close(self) -> None:
        pass


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def import_mlflow():
    """mlflow, or a ConfigError with the pip command."""
    try:
        import mlflow
    except ImportError:
        raise config_lib.ConfigError(
            "config.logging.mlflow = True, but mlflow is not installed. Install it with "
            "`pip install 'jaxepochs[mlflow]'` (or `pip install mlflow-skinny`), or set logging.mlflow = False."
        ) from None
    return mlflow


def check_trackers(logging) -> None:
    """The trackers config.logging turns on are installed: else a ConfigError with the pip command, before
    anything is written or compiled."""
    if logging.mlflow:
        import_mlflow()
    if logging.wandb:
        import_wandb()


MLFLOW_NAMED_URIS = ("databricks", "databricks-uc", "uc")  # MLflow's tracking URIs with no scheme that are not paths


@dataclasses.dataclass(frozen=True)
class LogSpec:
    """What the writers need of a config (its `logging` section, and the whole config flattened: MLflow's
    params). Built once, after validation; a sweep's members each have theirs."""

    csv: bool
    tensorboard: bool
    mlflow: bool
    mlflow_tracking_uri: str
    mlflow_experiment: str
    params: tuple = ()  # the flattened config's (key, value) pairs
    curves: bool = True  # curves.png at the end of a run
    wandb: bool = False
    wandb_project: str = "jaxepochs"
    wandb_dir: str = ""  # "": $WANDB_DIR, else the workdir (wandb's files in WORKDIR/wandb/)
    wandb_mode: str = ""  # "": $WANDB_MODE, else "offline"


def tracking_uri(setting: str) -> str:
    """logging.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlruns (a local file store). A plain path
    (./mlruns2, /data/mlruns, ~/mlruns) is the file store it names: the file: URI of its absolute path (MLflow
    takes file: URIs for a local store; a relative path would also move with the working directory)."""
    uri = setting or os.environ.get("MLFLOW_TRACKING_URI", "")
    uri = uri or (pathlib.Path.cwd() / "mlruns").as_uri()
    if _is_plain_path(uri):
        uri = pathlib.Path(uri).expanduser().absolute().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless told: the local default here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _is_plain_path(uri: str) -> bool:
    """Whether `uri` has no scheme (http://, file:, sqlite:///...) and is no named store ("databricks"): a path.
    A Windows drive ("C:\\mlruns") has a one-letter "scheme", and is a path too."""
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    return uri not in MLFLOW_NAMED_URIS and (not scheme or (len(scheme) == 1 and scheme.isalpha()))


class MlflowLog(MetricWriter):
    """One MLflow run per workdir (recorded in WORKDIR/mlflow.json, so a resumed run goes on in it): the flattened
    config as params, each epoch's metrics at step `epoch` (an epoch it already holds is not logged again)."""

    def __init__(self, workdir: pathlib.Path, spec: LogSpec, rows: list[dict], name: str | None = None):
        import_mlflow()
        from mlflow.tracking import MlflowClient

        self._uri = tracking_uri(spec.mlflow_tracking_uri)
        self._client = MlflowClient(self._uri)
        self._record = workdir / MLFLOW_RECORD
        self.run_id = self._existing_run() or self._new_run(spec, name or workdir.name, workdir)
        history = self._client.get_metric_history(self.run_id, "train_loss")
        self._logged = max((m.step for m in history), default=0)
        self.write_rows(rows)

    def _existing_run(self) -> str | None:
        if not self._record.exists():
            return None
        record = json.loads(self._record.read_text())
        return record["run_id"] if record.get("tracking_uri") == self._uri else None

    def _new_run(self, spec: LogSpec, name: str, workdir: pathlib.Path) -> str:
        from mlflow.entities import Param

        experiment = spec.mlflow_experiment
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        run = self._client.create_run(experiment_id, run_name=name, tags={"jaxepochs.workdir": str(workdir)})
        params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in spec.params]
        self._client.log_batch(run.info.run_id, params=params)
        self._record.write_text(json.dumps({"tracking_uri": self._uri, "run_id": run.info.run_id}) + "\n")
        return run.info.run_id

    def write(self, row: dict) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[dict]) -> None:
        """A call's rows in batches of MLflow's 1000 metrics (one log_batch a row cost 12% of a 5 ms epoch)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        new = [row for row in rows if row["epoch"] > self._logged]
        metrics = [
            Metric(k, float(v), stamp, row["epoch"]) for row in new for k, v in scalars(row).items() if math.isfinite(v)
        ]
        for start in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        self._logged = max([self._logged, *(row["epoch"] for row in new)])

    def finish(self, files: list[pathlib.Path], status: str) -> None:
        """The run's outputs as artifacts, and its end (FINISHED, KILLED at Ctrl-C, FAILED)."""
        for path in files:
            if path.exists():
                self._client.log_artifact(self.run_id, str(path))
        self._client.set_terminated(self.run_id, status)

    def close(self) -> None:
        pass


WORKDIR_WRITERS = ("metrics.csv", "tensorboard")  # files in the workdir: a disk that refuses them is the run's


class Logs(MetricWriter):
    """metrics.jsonl and the writers the config turns on, written together. metrics.jsonl's errors (a full disk)
    are the run's, and so are the OSErrors of the workdir's other files (metrics.csv, the TensorBoard event file):
    the disk that refuses them holds the checkpoints too, so the run saves and stops with the disk-full message.
    Another failure (MLflow's tracking server) is reported once and that writer dropped: the run goes on."""

    def __init__(self, primary: MetricWriter, others: dict[str, MetricWriter]):
        self._primary, self._others = primary, dict(others)

    def write_rows(self, rows: list[dict]) -> None:
        """A call's rows: metrics.jsonl's first, then each writer's (MLflow's in one batch)."""
        self._primary.write_rows(rows)
        for name, writer in list(self._others.items()):
            try:
                writer.write_rows(rows)
            except OSError as error:
                if name in WORKDIR_WRITERS:
                    raise
                self._drop(name, error)
            except Exception as error:  # noqa: BLE001 - a side writer's other failures never stop the run
                self._drop(name, error)

    def _drop(self, name: str, error: Exception) -> None:
        with contextlib.suppress(Exception):  # closed as it can be: W&B's run then waits for finish_run's end
            self._others.pop(name).close()
        _warn(name, error)

    def close(self) -> None:
        self._primary.close()
        for writer in self._others.values():
            with contextlib.suppress(Exception):
                writer.close()


def open_logs(primary, workdir: pathlib.Path, spec: LogSpec, rows: list[dict]) -> Logs:
    """`primary` (metrics.jsonl) and the writers config.logging turns on (`spec`), each started from `rows`."""
    others = {}
    if spec.csv:
        others["metrics.csv"] = CsvLog(workdir / "metrics.csv", rows)
    if spec.tensorboard:
        others["tensorboard"] = TensorBoardLog(workdir / "tensorboard", rows)
    if spec.mlflow:
        try:
            others["mlflow"] = MlflowLog(workdir, spec, rows)
        except Exception as error:  # noqa: BLE001 - an unreachable tracking server does not stop the run
            _warn("mlflow", error)
    if spec.wandb:
        try:
            others["wandb"] = WandbLog(workdir, spec, rows)
        except Exception as error:  # noqa: BLE001 - W&B online without a login, say, does not stop the run
            _warn("wandb", error)
    return Logs(primary, others)


def _warn(name: str, error: Exception) -> None:
    print(f"warning: {name} is not logging: {error}. metrics.jsonl and the run go on.", file=sys.stderr)


def finish_run(workdir: pathlib.Path, spec: LogSpec, history: list[dict], summary: dict, status: str) -> None:
    """A run's end in its trackers: summary.json's final validation and test metrics in TensorBoard as
    `final_<name>` at the last epoch (as a sweep's members have theirs), MLflow's end (`finish_mlflow`), and W&B's:
    summary.json in the run's summary (`finish_wandb`)."""
    if spec.tensorboard:
        finals = {f"final_{k}": v for k, v in summary.items() if k.startswith(("val_", "test_"))}
        try:
            board = TensorBoardLog(workdir / "tensorboard", history)  # the rows, then the final metrics once
            board.write({"epoch": summary["epochs_completed"], **finals})
            board.close()
        except OSError as error:  # the run's own outputs are written; the tracker's are extra
            _warn("tensorboard", error)
    finish_mlflow(workdir, spec, status)
    if spec.wandb:
        try:
            finish_wandb(workdir, spec, history, summary, status)
        except Exception as error:  # noqa: BLE001 - the run's own outputs are written; the tracker's are extra
            _warn("wandb", error)


def finish_mlflow(workdir: pathlib.Path, spec: LogSpec, status: str) -> None:
    """The workdir's MLflow run gets the outputs as artifacts and its end status (after summary.json)."""
    if not spec.mlflow:
        return
    names = ("config.json", "summary.json", "metrics.jsonl", "metrics.csv", "curves.png")
    try:
        MlflowLog(workdir, spec, []).finish([workdir / name for name in names], status)
    except Exception as error:  # noqa: BLE001 - the run's own outputs are written; the tracker's are extra
        _warn("mlflow", error)


def sweep_outputs(workdir: pathlib.Path, csv: bool, logs: dict[str, LogSpec], runs, histories: dict,
                  results_rows: list[dict]) -> None:  # fmt: skip
    """A sweep's rows in WORKDIR/metrics.csv (with the sweep's logging.csv, `csv`; a `run` column first), and its
    members in TensorBoard (a directory each, with its swept values as hparams), MLflow and W&B (a run each, W&B's
    with the best and final metrics in its summary), as each member's logging (`logs`, by run name) says; written
    once the sweep has finished (sweep.jsonl holds the same rows)."""
    if csv:
        rows = [{"run": run.name, **row} for run in runs for row in histories[run.name] if logs[run.name].csv]
        CsvLog(workdir / "metrics.csv", rows, first=("run", "epoch"))
    finals = {row["run"]: row for row in results_rows}
    for run in runs:
        final = {k: v for k, v in finals[run.name].items() if k.startswith(("best_", "final_")) and k != "best_epoch"}
        values = {k: finals[run.name][k] for k in run.values}
        if logs[run.name].tensorboard:
            board = TensorBoardLog(workdir / "tensorboard" / run.name, histories[run.name])
            board.hparams(values, final)
            board.close()
        if logs[run.name].mlflow or logs[run.name].wandb:
            _member_runs(workdir, run.name, logs[run.name], histories[run.name], final)


def _member_runs(workdir: pathlib.Path, name: str, spec: LogSpec, history: list[dict], final: dict) -> None:
    """A sweep member's MLflow and W&B runs (each recorded in WORKDIR/members/<name>/), named `<sweep>/<name>`:
    its epochs, and in W&B's summary its best and final metrics."""
    member = workdir / "members" / name
    member.mkdir(parents=True, exist_ok=True)
    if spec.mlflow:
        try:
            MlflowLog(member, spec, history, name=f"{workdir.name}/{name}").finish([], "FINISHED")
        except Exception as error:  # noqa: BLE001 - the sweep's own outputs are written
            _warn(f"mlflow ({name})", error)
    if spec.wandb:
        try:
            WandbLog(member, spec, history, f"{workdir.name}/{name}", home=workdir).finish(final, "FINISHED")
        except Exception as error:  # noqa: BLE001 - the sweep's own outputs are written
            _warn(f"wandb ({name})", error)
