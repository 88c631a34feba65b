"""TensorBoard's event files, written directly (no TensorFlow, no tensorboardX): each row's metrics as scalars at
step `epoch`, one TFRecord a row, and a sweep member's swept values in the hparams plugin."""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import shutil
import socket
import struct
import time

from jaxepochs.host import report

NOT_SCALARS = ("epoch", "steps")  # the step of every scalar, and its step count


def scalars(row: dict) -> dict[str, float]:
    """The row's numbers that TensorBoard and MLflow plot: every number but the epoch (their step) and steps."""
    return {
        key: value
        for key, value in row.items()
        if key not in NOT_SCALARS and isinstance(value, int | float) and not isinstance(value, bool)
    }


class TensorBoardLog(report.MetricWriter):
    """WORKDIR/tensorboard/ (or a sweep member's directory under it): each row's metrics as scalars at step
    `epoch`, tagged as in metrics.jsonl (`train_loss`, `val_accuracy`, `learning_rate/Dense_0`).

    The event file is written here, one record per row holding every scalar, flushed at each row: about 8 us a
    row, against 217 for tensorboardX's add_scalar per value through its writer thread. The records are encoded
    by hand (an Event is three fields, the hparams plugin's data a few more): importing tensorboardX for its
    protocol buffers would import PyTorch where it is installed (a second and 170 MB at every run's start)."""

    def __init__(self, directory: pathlib.Path, rows: list[dict]):
        # Rows past the resumed checkpoint are trained again: the event file is rebuilt from `rows` in a temporary
        # file beside it and renamed over it (under its old name), so a kill while it is written leaves the old one.
        # A symbolic link (to another disk) or a mount point is written through: its target is made where missing,
        # and nothing there but this writer's own event files is ever removed.
        directory.resolve().mkdir(parents=True, exist_ok=True)
        old = sorted(p for p in directory.glob("events.out.tfevents.*.jaxepochs") if p.is_file())
        name = old[-1].name if old else f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.jaxepochs"
        self._path = directory / name
        data = _tf_record(_event(field=_bytes_field(3, b"brain.Event:2")))  # file_version
        data += b"".join(_tf_record(_row_event(row)) for row in rows)
        report.replace_file(self._path, data)
        for stale in _event_files(directory):  # an earlier writer's (TensorBoard would show both)
            if stale.name != name:
                stale.unlink(missing_ok=True)
        self._fd = os.open(self._path, os.O_WRONLY)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)

    def _record(self, data: bytes) -> None:
        """One TFRecord, written through at once. A write the disk does not take (ENOSPC) is cut back to the last
        whole record, so the event file never ends in half of one, and the OSError is raised naming the file: the
        run saves its epochs and stops, as at metrics.jsonl's."""
        record = _tf_record(data)
        report.append_whole(self._fd, record, self._size, self._path)
        self._size += len(record)

    def write_rows(self, rows: list[dict]) -> None:
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        self._record(_row_event(row))

    def hparams(self, values: dict, metrics: dict) -> None:
        """The run's hyperparameters and its final metrics, for TensorBoard's hparams plugin (a sweep's runs)."""
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        for summary in _hparams_summaries(values, list(metrics)):
            self._record(_event(0, _bytes_field(5, summary)))
        self.write({"epoch": 0, **metrics})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _event_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The TensorBoard event files in `directory` (and their temporary files): the only files a writer removes."""
    return [p for p in directory.glob("events.out.tfevents.*") if p.is_file() and not p.is_symlink()]


def discard(directory: pathlib.Path) -> None:
    """Removes a run's or a sweep's TensorBoard directory (--restart): a symbolic link or a mount point is kept,
    with what it holds besides the event files written there (its own directories' too)."""
    if not (directory.is_symlink() or os.path.ismount(directory)):
        shutil.rmtree(directory, ignore_errors=True)
        return
    for sub in (directory, *(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())):
        for path in _event_files(sub):
            path.unlink(missing_ok=True)


def _tf_record(data: bytes) -> bytes:
    """One TFRecord: the length, its masked CRC-32C, the event, the event's masked CRC-32C."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _row_event(row: dict) -> bytes:
    """A row's scalars as one Event at step `epoch`."""
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))  # Summary.Value
        for tag, value in scalars(row).items()
    )
    return _event(row["epoch"], _bytes_field(5, values))  # Event.summary


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protocol-buffer field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int = 0, field: bytes = b"") -> bytes:
    """tensorflow.Event: wall_time (1, double), step (2, varint), then `field` (file_version or summary)."""
    return b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + field


def _hparams_summaries(values: dict, metric_tags: list[str]) -> list[bytes]:
    """The three Summary messages of TensorBoard's hparams plugin (tensorboard/plugins/hparams: the experiment with
    each hyperparameter's name and type and the metrics' tags, the session's values, its end), encoded as
    tensorboardX's `summary.hparams` writes them."""
    start = infos = b""
    for name, value in values.items():
        if isinstance(value, bool):
            encoded, kind = b"\x20" + _varint(int(value)), 2  # google.protobuf.Value.bool_value; DATA_TYPE_BOOL
        elif isinstance(value, int | float):
            encoded, kind = b"\x11" + struct.pack("<d", float(value)), 3  # number_value; DATA_TYPE_FLOAT64
        else:
            encoded, kind = _bytes_field(3, str(value).encode()), 1  # string_value; DATA_TYPE_STRING
        start += _bytes_field(1, _bytes_field(1, name.encode()) + _bytes_field(2, encoded))  # hparams[name]
        infos += _bytes_field(4, _bytes_field(1, name.encode()) + b"\x20" + _varint(kind))  # HParamInfo
    infos += b"".join(_bytes_field(5, _bytes_field(1, _bytes_field(2, tag.encode()))) for tag in metric_tags)

    def summary(tag: str, data_field: int, payload: bytes) -> bytes:
        content = _bytes_field(data_field, payload)  # HParamsPluginData (version 0: the default, not written)
        metadata = _bytes_field(1, _bytes_field(1, b"hparams") + _bytes_field(2, content))  # SummaryMetadata
        return _bytes_field(1, _bytes_field(1, tag.encode()) + _bytes_field(9, metadata))  # Summary.value

    return [
        summary("_hparams_/experiment", 2, infos),
        summary("_hparams_/session_start_info", 3, start),
        summary("_hparams_/session_end_info", 4, b"\x08\x01"),  # status: STATUS_SUCCESS
    ]


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C (crc32c's C code; the crc32c package is a dependency)."""
    import crc32c

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
