"""Past one device and one host: a run's batches over the mesh's data axis (parameters replicated or split with
shard_params), a sweep over (runs, data), gradient accumulation, bfloat16, and two real processes joined by
jax.distributed over loopback (gloo's CPU collectives), with their faults."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, TIMED, one_device_env, tiny_config

import jaxepochs
from jaxepochs.core import layout as layout_lib
from jaxepochs.host import setup

RTOL = 2e-4  # only the order of the reductions differs; three epochs of Adam amplify it little
WAIT = 120.0


def _metrics(history: list[dict]) -> np.ndarray:
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    return np.array([[row[k] for k in keys] for row in history])


def _train(tmp_path, name: str, overrides: dict):
    config = tiny_config({"train.epochs": "3", **overrides})
    return jaxepochs.train_and_evaluate(config, tmp_path / name, quiet=True)


def test_a_run_on_two_devices_equals_the_run_on_one(tmp_path):
    one = _train(tmp_path, "one", {"mesh.data": "1"})
    two = _train(tmp_path, "two", {"mesh.data": "0"})  # the default: every device on "data"
    assert one.summary["mesh"] == {"runs": 1, "data": 1} and two.summary["mesh"] == {"runs": 1, "data": 2}
    np.testing.assert_allclose(_metrics(two.history), _metrics(one.history), rtol=RTOL)
    np.testing.assert_allclose(two.summary["test_loss"], one.summary["test_loss"], rtol=RTOL)
    assert [row["steps"] for row in two.history] == [row["steps"] for row in one.history]  # 51 steps, last padded


def test_fsdp_splits_the_parameters_over_data_and_computes_the_same(tmp_path):
    overrides = {"model.hidden_sizes": "(512,)", "train.epochs": "2"}
    config = tiny_config(overrides)
    layout = layout_lib.Layout(layout_lib.make_mesh(jax.devices(), 1, 2), shard_params=True)
    pieces = setup.make_pieces(config, *_dataset_and_hooks(config), 57, True)
    abstract = setup.abstract_carry(pieces, config, np.zeros((1, 40), np.float32))
    specs = layout_lib.carry_shardings(layout, abstract)
    kernel = specs.state.params["Dense_0"]["kernel"].spec  # [runs, 40, 512]: its largest axis over "data"
    assert kernel == jax.sharding.PartitionSpec("runs", None, "data")
    assert specs.state.opt_state.mu["Dense_0"]["kernel"].spec == kernel  # Adam's moments alike
    assert specs.state.params["Dense_0"]["bias"].spec == jax.sharding.PartitionSpec("runs")  # small: replicated
    one = _train(tmp_path, "one", {**overrides, "mesh.data": "1"})
    fsdp = _train(tmp_path, "fsdp", {**overrides, "mesh.data": "2", "mesh.shard_params": "True"})
    assert fsdp.summary["shard_params"] is True
    np.testing.assert_allclose(_metrics(fsdp.history), _metrics(one.history), rtol=RTOL)
    # The checkpoint of the split run resumes on one device: the arrays are saved whole.
    more = _train(tmp_path, "fsdp", {**overrides, "train.epochs": "3", "mesh.data": "1"})
    assert len(more.history) == 3 and more.history[:2] == fsdp.history


def _dataset_and_hooks(config):
    from jaxepochs.host import hooks as hooks_lib

    hooks = hooks_lib.load_hooks(config)
    return setup.load_data(config, hooks, True), hooks


def test_streamed_batches_split_over_two_devices_equal_one_device(tmp_path):
    one = _train(tmp_path, "one", {"mesh.data": "1"})
    streamed = {"data.stream": "True", "train.steps_per_call": "7", "mesh.data": "2"}  # chunks end mid-epoch
    two = _train(tmp_path, "two", streamed)
    assert two.summary["streamed"] and two.summary["mesh"] == {"runs": 1, "data": 2}
    np.testing.assert_allclose(_metrics(two.history), _metrics(one.history), rtol=RTOL)
    np.testing.assert_allclose(two.summary["test_loss"], one.summary["test_loss"], rtol=RTOL)


def test_a_sweep_on_any_mesh_equals_the_sweep_on_one_device(tmp_path):
    grid = [{"optimizer.learning_rate": "0.01", "seed": "0"}, {"optimizer.learning_rate": "0.003", "seed": "1"}]
    curves = {}
    for name, mesh in {"one": ("1", "1"), "runs": ("2", "1"), "data": ("1", "2")}.items():
        config = tiny_config({"mesh.runs": mesh[0], "mesh.data": mesh[1]})
        result = jaxepochs.sweep(config, grid, tmp_path / name, quiet=True, cv=2)
        curves[name] = np.stack([_metrics(result.histories[run]) for run in sorted(result.histories)])
    assert curves["one"].shape == (4, 2, 4)  # two configurations, two folds each
    np.testing.assert_allclose(curves["runs"], curves["one"], rtol=RTOL)
    np.testing.assert_allclose(curves["data"], curves["one"], rtol=RTOL)


def test_accumulated_micro_batches_equal_the_whole_batch(tmp_path):
    whole = _train(tmp_path, "whole", {"mesh.data": "1"})
    accumulated = _train(tmp_path, "accumulated", {"mesh.data": "1", "train.accumulate_steps": "4"})
    assert accumulated.summary["accumulate_steps"] == 4
    np.testing.assert_allclose(_metrics(accumulated.history), _metrics(whole.history), rtol=RTOL)
    both = _train(tmp_path, "both", {"train.accumulate_steps": "2", "mesh.data": "2"})  # and over two devices
    np.testing.assert_allclose(_metrics(both.history), _metrics(whole.history), rtol=RTOL)


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(tmp_path):
    from jaxepochs.core import task as task_lib

    seen = []
    apply = lambda params, model_state, x_b, key, train: (seen.append((x_b.dtype, params.dtype)) or x_b @ params, {})
    outputs, _ = task_lib.in_compute_dtype(apply, jax.numpy.bfloat16)(np.ones((2, 3), np.float32), {}, np.ones(
        (4, 2), np.float32), None, True)  # fmt: skip
    assert seen == [(jax.numpy.bfloat16, jax.numpy.bfloat16)] and outputs.dtype == np.float32
    f32 = _train(tmp_path, "f32", {"mesh.data": "1"})
    bf16 = _train(tmp_path, "bf16", {"mesh.data": "1", "train.compute_dtype": "bfloat16"})
    assert bf16.summary["compute_dtype"] == "bfloat16"
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(bf16.state.params))
    assert not np.array_equal(_metrics(bf16.history), _metrics(f32.history))  # it did compute in bfloat16
    losses = lambda rows: _metrics(rows)[:, [0, 2]]  # bfloat16's 8-bit mantissa: losses within 2%
    np.testing.assert_allclose(losses(bf16.history), losses(f32.history), rtol=0.02)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.batch_size": "63", "mesh.data": "2"}, "batch_size = 63 does not divide over mesh.data = 2"),
        ({"mesh.data": "4"}, "mesh.data = 4 asks for 4 devices, but JAX sees 2"),
        ({"mesh.runs": "2"}, "splits a sweep's runs; a run has one"),
        ({"train.accumulate_steps": "5"}, "5 does not divide train.batch_size = 64"),
        ({"train.compute_dtype": "bfloat61"}, 'Did you mean "bfloat16"'),
        ({"mesh.data": "-1"}, "mesh.data"),
    ],
)
def test_a_mesh_that_cannot_be_built_is_refused_before_the_workdir(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        jaxepochs.train_and_evaluate(tiny_config(overrides), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_sweep_mesh_larger_than_the_devices_is_refused(tmp_path):
    config = tiny_config({"mesh.runs": "2", "mesh.data": "2"})
    with pytest.raises(ValueError, match="asks for 4 devices, but JAX sees 2"):
        jaxepochs.sweep(config, [{"seed": "0"}, {"seed": "1"}], tmp_path / "sweep", quiet=True)


# Two processes on this machine, one CPU device each, joined over loopback.

SMALL = {
    "model.hidden_sizes": "(16,)",
    "train.batch_size": "64",
    "checkpoint.every_epochs": "1",
    "logging.curves": "False",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, overrides: dict, port: int, logs, extra=(), per_process=None, command_name="run"):
    env = one_device_env()  # one CPU device per process
    children = []
    for process in range(2):
        command = [sys.executable, "-m", "jaxepochs.cli", command_name, "--config", "experiments/mnist1d_mlp.py"]
        command += ["--workdir", str(workdir), "--quiet", "--coordinator_address", f"127.0.0.1:{port}"]
        command += ["--num_processes", "2", "--process_id", str(process), "--heartbeat_timeout", "5", *extra]
        mine = {**SMALL, **overrides, **((per_process or {}).get(process, {}))}
        command += [f"--config.{key}={value}" for key, value in mine.items()]
        with (logs / f"p{process}.log").open("w") as log:
            children.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return children


def _wait(children) -> list[int]:
    return [child.wait(timeout=WAIT) for child in children]


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMED} for row in rows]


def test_two_processes_train_as_one_run_and_resume_after_sigkill(tmp_path):
    overrides = {"train.epochs": "3", "train.epochs_per_call": "1"}
    whole = tmp_path / "whole"
    assert _wait(_launch(whole, overrides, _free_port(), tmp_path)) == [0, 0], (tmp_path / "p0.log").read_text()
    summary = json.loads((whole / "summary.json").read_text())
    assert (summary["processes"], summary["devices"], summary["mesh"]) == (2, 2, {"runs": 1, "data": 2})
    alone = tiny_config({"train.epochs": "3", "mesh.data": "2"})  # one process, its two devices
    alone = jaxepochs.train_and_evaluate(alone, tmp_path / "alone", quiet=True)
    np.testing.assert_allclose(_metrics(_rows(whole)), _metrics(alone.history), rtol=1e-3)

    killed = tmp_path / "killed"
    children = _launch(killed, overrides, _free_port(), tmp_path)
    deadline = time.monotonic() + WAIT
    while not ((killed / "metrics.jsonl").exists() and len(_rows(killed)) >= 1):
        assert time.monotonic() < deadline and children[0].poll() is None, (tmp_path / "p0.log").read_text()
        time.sleep(0.01)
    children[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    codes = _wait(children)
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL and time.monotonic() - start < 60
    assert "start every process again with the same command" in (tmp_path / "p0.log").read_text()
    assert _wait(_launch(killed, overrides, _free_port(), tmp_path)) == [0, 0], (tmp_path / "p0.log").read_text()
    assert _untimed(_rows(killed)) == _untimed(_rows(whole))  # the resumed run ends where the whole one did


def test_two_processes_sweep_as_one_process_on_two_devices(tmp_path):
    grid = [{"seed": seed, "optimizer.learning_rate": lr} for seed in ("0", "1") for lr in ("0.01", "0.003")]
    sweep_args = ["--sweep.seed=0,1", "--sweep.optimizer.learning_rate=0.01,0.003"]
    children = _launch(tmp_path / "two", {"train.epochs": "3"}, _free_port(), tmp_path, sweep_args, None, "sweep")
    assert _wait(children) == [0, 0], (tmp_path / "p0.log").read_text()
    one = tiny_config({"train.epochs": "3", "mesh.data": "0"})  # the sweep's default: its runs over the 2 devices
    jaxepochs.sweep(one, grid, tmp_path / "one", quiet=True)
    rows = lambda workdir: _untimed([json.loads(line) for line in (workdir / "sweep.jsonl").read_text().splitlines()])
    assert len(rows(tmp_path / "two")) == 12 and rows(tmp_path / "two") == rows(tmp_path / "one")  # bit for bit


def test_processes_that_disagree_on_the_config_are_refused(tmp_path):
    per_process = {1: {"optimizer.learning_rate": "0.5"}}
    children = _launch(tmp_path / "run", {"train.epochs": "1"}, _free_port(), tmp_path, per_process=per_process)
    assert _wait(children) == [2, 2]
    for process in range(2):
        assert "differs from process 0's at optimizer.learning_rate" in (tmp_path / f"p{process}.log").read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_workdir_that_process_0_refuses_stops_every_process(tmp_path):
    workdir = tmp_path / "run"
    jaxepochs.train_and_evaluate(tiny_config({"train.epochs": "1"}), workdir, quiet=True)  # another config's run
    start = time.monotonic()
    children = _launch(workdir, {"train.epochs": "1", "optimizer.learning_rate": "0.5"}, _free_port(), tmp_path)
    assert _wait(children) == [2, 2] and time.monotonic() - start < 60
    assert "holds a run with another config" in (tmp_path / "p0.log").read_text()
    assert "process 0 stopped with an error before training" in (tmp_path / "p1.log").read_text()


def test_an_unreachable_coordinator_is_an_error_in_bounded_time(tmp_path):
    env = one_device_env()
    command = [sys.executable, "-m", "jaxepochs.cli", "run", "--config", "experiments/mnist1d_mlp.py", "--workdir"]
    command += [str(tmp_path / "run"), "--coordinator_address", f"127.0.0.1:{_free_port()}", "--num_processes", "2"]
    command += ["--distributed_timeout", "3"]
    start = time.monotonic()
    done = subprocess.run([*command, "--process_id", "1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and time.monotonic() - start < 60
    assert "could not reach the coordinator at 127.0.0.1" in done.stderr
    # Process 0 serves the coordinator; alone, JAX ends it once the others have not joined in time.
    start = time.monotonic()
    done = subprocess.run([*command, "--process_id", "0"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and time.monotonic() - start < 60
    assert "waiting up to 3 s for 2 processes to join" in done.stderr
    assert not (tmp_path / "run").exists()


def test_distributed_options_that_do_not_go_together_are_usage_errors(tmp_path, capsys):
    from jaxepochs import cli

    base = ["run", "--config", "experiments/mnist1d_mlp.py", "--workdir", str(tmp_path / "run")]
    assert cli.main([*base, "--coordinator_address", "127.0.0.1:1"]) == 2
    assert "--coordinator_address, --num_processes and --process_id go together" in capsys.readouterr().err
    assert cli.main([*base, "--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2"]) == 2
    assert "--process_id 2 is not in 0..1" in capsys.readouterr().err
    env = one_device_env()
    done = subprocess.run([sys.executable, "-m", "jaxepochs.cli", *base, "--distributed"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=WAIT)  # fmt: skip
    assert done.returncode == 2 and "JAX found no cluster to join" in done.stderr
    assert not (tmp_path / "run").exists()
