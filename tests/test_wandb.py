"""Weights & Biases as a writer (logging.wandb), offline: what a run logs, read back from wandb's own files (the
.wandb transaction log of each offline session), and a resumed run going on in the same W&B run."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from conftest import read_jsonl, tiny_config

import jaxepochs
from jaxepochs.host import config as config_lib
from jaxepochs.host.tensorboard import scalars


def _records(path):
    """The protobuf records of an offline run's .wandb file: wandb-core's log format (LevelDB's, with a 7-byte
    ":W&B" header): 32 KiB blocks of chunks, each a CRC, a length, a type (1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk's header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""


def _sessions(workdir, run_id) -> list[dict]:
    """Each offline session of the W&B run `run_id` in WORKDIR/wandb/, in order: its run record, its history
    ({step: values}), its summary updates and its exit code."""
    sessions = []
    for directory in sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}")):
        session = {"history": {}, "summary": {}}
        for record in _records(directory / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                session["run"] = record.run
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                values = {k: json.loads(v) for k, v in items.items() if not k.startswith("_")}  # W&B's _step, ...
                session["history"][record.history.step.num] = values
            elif kind == "summary":
                session["summary"].update({item.key: item.value_json for item in record.summary.update})
            elif kind == "exit":
                session["exit_code"] = record.exit.exit_code
        sessions.append(session)
    return sessions


def test_wandb_logs_the_config_epochs_and_summary_and_a_resumed_run_goes_on_in_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # never a server
    monkeypatch.delenv("WANDB_DIR", raising=False)
    workdir, overrides = tmp_path / "run", {"logging.wandb": "True"}
    result = jaxepochs.train_and_evaluate(tiny_config(overrides), workdir, quiet=True)
    record = json.loads((workdir / "wandb.json").read_text())
    assert record["project"] == "jaxepochs" and record["logged"] == 2
    [first] = _sessions(workdir, record["id"])
    rows = read_jsonl(workdir / "metrics.jsonl")
    assert first["history"] == {row["epoch"]: scalars(row) for row in rows}  # learning_rate, seconds, ... too
    config = {item.key: json.loads(item.value_json) for item in first["run"].config.update if item.key != "_wandb"}
    assert config == config_lib.flatten(config_lib.validate(tiny_config(overrides)))  # as config.json spells it
    assert first["run"].display_name == "run" and config["train.batch_size"] == 64
    assert json.loads(first["summary"]["final_test_accuracy"]) == result.summary["test_accuracy"]
    assert json.loads(first["summary"]["stop_reason"]) == "completed" and first["exit_code"] == 0

    longer_config = tiny_config({**overrides, "train.epochs": "3", "logging.curves": "True"})
    longer = jaxepochs.train_and_evaluate(longer_config, workdir, quiet=True)
    assert json.loads((workdir / "wandb.json").read_text()) == {**record, "logged": 3}
    first_again, second = _sessions(workdir, record["id"])
    assert first_again["history"] == first["history"]
    assert second["history"] == {3: scalars(longer.history[2])}  # epochs 1 and 2 not logged twice
    assert json.loads(second["summary"]["epochs_completed"]) == 3 and second["exit_code"] == 0
    assert json.loads(second["summary"]["curves"])["_type"] == "image-file"  # curves.png, as an image


def test_wandb_on_but_not_installed_or_an_unknown_mode_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match=r"wandb is not installed. Install it with `pip install 'jaxepochs\[wandb\]'`"):
        jaxepochs.train_and_evaluate(tiny_config({"logging.wandb": "True"}), tmp_path / "missing", quiet=True)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match=r'config.logging.wandb_mode = "onlin" Did you mean "online"\?'):
        config = tiny_config({"logging.wandb": "True", "logging.wandb_mode": "onlin"})  # overrides are validated
        jaxepochs.train_and_evaluate(config, tmp_path / "mode", quiet=True)
    assert not (tmp_path / "mode").exists()
