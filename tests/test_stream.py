"""Streamed epochs (issue 17): the same run as the device-resident one, exact resume inside an epoch after SIGKILL,
epochs of S steps over data read round and round, and the faults of an input pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, TIMED, tiny_config

import jaxepochs
from jaxepochs.data import loading
from jaxepochs.data import rows as rows_lib
from jaxepochs.host import streamed
from jaxepochs.host.config import ConfigError

STREAM = {"data.stream": "True", "train.steps_per_call": "8"}
KEEP = (*TIMED, "input_wait_seconds")


def _untimed(rows):
    return [{k: v for k, v in row.items() if k not in KEEP} for row in rows]


def _close(a_rows, b_rows, rel=1e-5):
    assert len(a_rows) == len(b_rows)
    for a, b in zip(_untimed(a_rows), _untimed(b_rows), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-7), (k, a, b)


@pytest.mark.optimized
def test_a_streamed_run_trains_on_the_device_resident_runs_batches(tmp_path):
    """Same config, data on the device or streamed from the host's disk (chosen by the budget here): the same
    metrics epoch by epoch and the same test metrics, to float tolerance (only the order of the sums differs)."""
    overrides = {"train.epochs": "3", "checkpoint.enabled": "False", "train.log_test": "True", "train.test_every": "2"}
    device = jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path / "device", quiet=True)
    budget = {"data.device_memory_bytes": "1000000", "data.device_memory_fraction": "0.5", "train.steps_per_call": "5"}
    stream = jaxepochs.train_and_evaluate(tiny_config({**overrides, **budget}), tmp_path / "stream", quiet=True)
    assert stream.summary["streamed"] and not device.summary["streamed"]
    _close(device.history, stream.history)
    assert all(row["input_wait_seconds"] >= 0 for row in stream.history)
    assert 0 <= stream.summary["input_wait_fraction"] <= 1
    for key in ("test_loss", "test_accuracy", "val_loss"):
        assert stream.summary[key] == pytest.approx(device.summary[key], rel=1e-5)
    for a, b in zip(jax.tree.leaves(device.state.params), jax.tree.leaves(stream.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_batch_order_reads_each_example_once_a_pass_across_epochs_of_s_steps():
    n, batch, per_pass = 10, 4, 3  # passes of 3 batches, the last with 2 real rows
    order = streamed.BatchOrder(jax.random.key(0), n, batch, True, steps=2)  # epochs of 2 steps
    idx, mask = zip(*(order.epoch(e) for e in range(1, 7)), strict=True)  # 12 steps: 4 passes
    idx, mask = np.concatenate(idx), np.concatenate(mask)
    for p in range(4):
        seen = idx[p * per_pass : (p + 1) * per_pass][mask[p * per_pass : (p + 1) * per_pass]]
        assert sorted(seen.tolist()) == list(range(n))
    natural = streamed.BatchOrder(jax.random.key(0), n, batch, True, steps=per_pass)
    np.testing.assert_array_equal(natural.epoch(2)[0], idx[per_pass : 2 * per_pass])  # pass 2 is epoch 2's order


def test_steps_per_epoch_makes_epochs_of_s_steps(tmp_path):
    """train.steps_per_epoch = 20 over 3,600 examples at batch 64 (57 steps a pass): epochs of 20 steps read the
    passes one after another; with S equal to a pass the run is the natural-epoch run."""
    config = tiny_config({"train.epochs": "4", "train.steps_per_epoch": "20", "checkpoint.enabled": "False"})
    result = jaxepochs.train_and_evaluate(config, tmp_path / "s", quiet=True)
    assert [row["steps"] for row in result.history] == [20, 40, 60, 80]
    assert result.summary["streamed"] and result.summary["steps_per_epoch"] == 20
    natural = jaxepochs.train_and_evaluate(
        tiny_config({"train.epochs": "2", "checkpoint.enabled": "False"}), tmp_path / "n", quiet=True
    )
    same = tiny_config({"train.epochs": "2", "train.steps_per_epoch": "57", "checkpoint.enabled": "False"})
    _close(natural.history, jaxepochs.train_and_evaluate(same, tmp_path / "57", quiet=True).history)


def _command(workdir, extra: dict, quiet: bool = True) -> list[str]:
    overrides = {
        "model.hidden_sizes": "(256,256,256)",
        "train.batch_size": "32",
        "train.epochs": "2",  # the kills land in epoch 1; epoch 2 shows the resumed run goes on as the whole one
        **STREAM,
        "train.steps_per_call": "4",
        "checkpoint.every_steps": "36",  # each save costs: three in an epoch of 113 steps
        "logging.curves": "False",
        **extra,
    }
    command = [sys.executable, "-m", "jaxepochs.cli", "run", "--config", "experiments/mnist1d_mlp.py"]
    command += ["--quiet"] if quiet else []
    return command + ["--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in overrides.items()]


def test_sigkill_inside_an_epoch_resumes_bit_for_bit(tmp_path, jax_compilation_cache):
    """SIGKILL after a checkpoint inside epoch 1; the rerun resumes at that step, and a Ctrl-C at its next
    checkpoint inside an epoch saves the position there (exit 130); the last rerun ends bit for bit where the
    uninterrupted run ends."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(jax_compilation_cache)}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(whole, {}), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    inside = killed / "checkpoints_in_epoch"
    steps = lambda: [int(p.name) for p in inside.iterdir() if p.name.isdigit()] if inside.is_dir() else []

    def interrupt(sig, after: int, err_path) -> subprocess.Popen:
        with err_path.open("w") as err:  # a file, not a pipe: a full pipe would block the child
            child = subprocess.Popen(_command(killed, {}, quiet=False), cwd=REPO, env=env, stderr=err)
        deadline = time.monotonic() + 240
        while not any(step > after for step in steps()):
            assert child.poll() is None and time.monotonic() < deadline, "no checkpoint inside an epoch"
            time.sleep(0.01)
        child.send_signal(sig)
        return child

    child = interrupt(signal.SIGKILL, 35, tmp_path / "first.err")
    child.wait()
    resumed_at = max(steps())
    child = interrupt(signal.SIGINT, resumed_at, tmp_path / "rerun.err")
    assert child.wait(timeout=120) == 130
    assert f"Resuming at step {resumed_at}" in (tmp_path / "rerun.err").read_text()
    rows = lambda w: _untimed(json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines())
    assert len(rows(killed)) < 2
    subprocess.run(_command(killed, {}), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    assert rows(killed) == rows(whole) and len(rows(whole)) == 2
    for a, b in zip(jax.tree.leaves(jaxepochs.load(whole)), jax.tree.leaves(jaxepochs.load(killed)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_failing_read_stops_with_the_error_and_a_resume_loses_nothing(tmp_path, monkeypatch):
    config = tiny_config({**STREAM, "train.epochs": "2", "train.steps_per_call": "4"})
    whole = jaxepochs.train_and_evaluate(config, tmp_path / "whole", quiet=True)
    reads = {"n": 0}
    real = rows_lib.Rows.__getitem__

    def failing(self, idx):
        reads["n"] += 1
        if reads["n"] == 10:  # in one of epoch 1's first chunks: a disk error in a reader thread
            raise OSError(5, "Input/output error", "x.npy")
        return real(self, idx)

    monkeypatch.setattr(rows_lib.Rows, "__getitem__", failing)
    with pytest.raises(loading.DataError, match=r"reading chunk \d+ of \d+ of epoch 1's batches failed: OSError"):
        jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True)
    assert any(p.name.isdigit() for p in (tmp_path / "w" / "checkpoints_in_epoch").iterdir())
    monkeypatch.setattr(rows_lib.Rows, "__getitem__", real)
    resumed = jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True)
    assert _untimed(resumed.history) == _untimed(whole.history)


def test_a_streamed_tfds_dataset_that_is_not_prepared_says_how(tmp_path):
    config = tiny_config({**STREAM, "data.name": "tfds:mnist", "data.data_dir": str(tmp_path / "empty")})
    with pytest.raises(loading.DataError, match=r"is not prepared in .*download_and_prepare"):
        jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True)
    assert not (tmp_path / "w").exists()


def test_a_budget_too_small_for_a_chunk_and_a_streamed_sweep_are_refused(tmp_path):
    small = {**STREAM, "data.device_memory_bytes": "100000", "train.steps_per_call": "64"}
    with pytest.raises(ConfigError, match=r"train\.steps_per_call = 64 batches of 64 .* Lower train\.steps_per_call"):
        jaxepochs.train_and_evaluate(tiny_config(small), tmp_path / "w", quiet=True)
    assert not (tmp_path / "w").exists()
    from jaxepochs.sweep import grid as grid_lib

    base = tiny_config(STREAM)
    with pytest.raises(grid_lib.SweepError, match="sweeps train device-resident data only"):
        jaxepochs.sweep(base, grid_lib.expand(base, {"seed": "0,1"}), tmp_path / "s", quiet=True)


def test_a_damaged_shard_is_named_when_its_rows_are_decoded(tmp_path, tfds_data_dir):
    jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "0"}), tmp_path / "w0", quiet=True)
    data_dir = tmp_path / "data"
    import shutil

    shutil.copytree(tfds_data_dir / "mnist1d", data_dir / "mnist1d", ignore=shutil.ignore_patterns("jaxepochs_rows"))
    for record in data_dir.rglob("mnist1d-train.array_record*"):
        data = bytearray(record.read_bytes())
        data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
        record.write_bytes(bytes(data))
    config = tiny_config({**STREAM, "train.epochs": "1", "data.data_dir": str(data_dir)})
    with pytest.raises(
        loading.DataError, match=r"its files \(mnist1d-train\.array_record-00000-of-00001\) are damaged"
    ):
        jaxepochs.train_and_evaluate(config, tmp_path / "w", quiet=True)


def test_the_host_computes_the_devices_epoch_order_bit_for_bit():
    from jaxepochs.core import epoch as epoch_lib

    key = jax.random.fold_in(jax.random.PRNGKey(3), epoch_lib.SHUFFLE_STREAM)
    for n, batch in [(10, 4), (3600, 64), (100_003, 128)]:
        for p in (1, 7):
            on_device = epoch_lib.batch_indices(key, np.int32(p), n, batch, True)
            on_host = streamed._host_batch_indices(key, n, batch, True, p)
            for a, b in zip(on_device, on_host, strict=True):
                np.testing.assert_array_equal(np.asarray(a), b)
