"""Test setup: two host CPU devices, no accelerator, and a per-session TFDS data dir.

The environment variables must be set before jax is first imported, so they are set at the top of this file,
which pytest imports before any test module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

# XLA:CPU's newer fusion emitters take twice the compile time of its classic ones (a 3-epoch tiny run: 3.8-4.8 s
# of backend compiles against 1.8-2.1 s, measured alternately), and the suite is mostly compiles of small programs.
# Every process of the suite compiles with the classic ones (its subprocesses inherit the flag: `one_device_env`),
# except the tests marked `xla_defaults`, which run in a pytest process of their own without it (see
# `pytest_pyfunc_call`). XLA_FLAGS is read once per process, so it cannot change around a test.
XLA_DEFAULTS = os.environ.get("JAXEPOCHS_TEST_XLA_DEFAULTS") == "1"  # this process runs `xla_defaults` tests
FAST_COMPILE_FLAGS = "" if XLA_DEFAULTS else "--xla_cpu_use_fusion_emitters=false"
_OURS = ("--xla_cpu_use_fusion_emitters=false", "--xla_force_host_platform_device_count=2")  # (xdist's workers
# inherit the flags their controller's conftest set)
USER_XLA_FLAGS = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split() if flag not in _OURS)
os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in (USER_XLA_FLAGS, FAST_COMPILE_FLAGS, "--xla_force_host_platform_device_count=2") if flag
)
os.environ["JAX_PLATFORMS"] = "cpu"
# XLA's backend optimisations cost about 40% of the suite's CPU time (the suite is mostly compiles of small
# programs) and buy nothing at test sizes; JAX's own test suite runs with this flag. Set as an environment variable,
# it reaches the CLI subprocesses too. The tests marked `optimized` run under XLA's defaults (see `optimized`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# A metrics row's fields that differ between equal runs (jaxepochs.host.run.TIMING_KEYS): the time, the examples per
# second, the peak device memory (where the backend reports it).
TIMED = ("seconds", "examples_per_second", "peak_memory_bytes")
EXPERIMENT = REPO / "experiments" / "mnist1d_mlp.py"

# jax.monitoring records this event once per XLA backend compilation (jax._src.dispatch's
# BACKEND_COMPILE_EVENT); test_epoch.py checks that a fresh jit records it, so a rename fails loudly.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _shared_base(tmp_path_factory) -> pathlib.Path:
    """The directory of this test run that its xdist workers (and its `xla_defaults` children) share: the workers'
    base directories' parent, which is this run's own; without xdist, the session's."""
    if os.environ.get("JAXEPOCHS_TEST_SHARED_DIR"):  # an `xla_defaults` child: its parent run's
        return pathlib.Path(os.environ["JAXEPOCHS_TEST_SHARED_DIR"])
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


_SHARED_BASE: list[pathlib.Path] = []  # _shared_base, noted by the session's first fixture


def _shared_directory(tmp_path_factory, name: str) -> pathlib.Path:
    """A directory of this test run that its processes share, so that what one prepares or compiles (the
    datasets, XLA's programs) the others find."""
    directory = _shared_base(tmp_path_factory) / name
    directory.mkdir(exist_ok=True)
    return directory


def computed_once(tmp_path_factory, name: str, compute):
    """`compute(directory)`'s JSON result, computed by the first of this run's xdist workers to ask (in a directory
    they share) and read by the others: a module's costly fixture runs once, not once per worker its tests land
    on."""
    directory = _shared_directory(tmp_path_factory, name)
    result = directory / "result.json"
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if compute fails
        if not result.exists():
            result.write_text(json.dumps(compute(directory)))
    return json.loads(result.read_text())


def one_device_env() -> dict[str, str]:
    """This process's environment for a child process that sees one CPU device (conftest's compile flags kept)."""
    return {**os.environ, "XLA_FLAGS": " ".join(flag for flag in (USER_XLA_FLAGS, FAST_COMPILE_FLAGS) if flag)}


OPTIMIZED_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}  # a subprocess's environment for XLA's defaults


@contextlib.contextmanager
def optimized():
    """XLA's default optimisations for what compiles inside (in this process and the subprocesses it starts).

    For the tests that hold two programs XLA compiles differently to the README's float tolerance (a sweep's
    vmapped step against a run's own, a streamed chunk against the resident epoch): unoptimised, XLA orders
    their sums otherwise and they part by more (1e-4 against 1e-5 after 3 epochs), which is the compiler's
    doing and not the promise users get. And for the few tests whose run time (convolutions) outweighs their
    compiles."""
    import jax

    previous_env = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    os.environ.update(OPTIMIZED_ENV)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
        if previous_env is None:
            os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
        else:
            os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = previous_env


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Runs a test marked `xla_defaults` in a pytest process of its own compiled with XLA:CPU's default emitters
    (unless this process is one): the tests of bit-equality between programs of other shapes (K epochs per call
    against one, vmapped seeds against sequential runs), which XLA promises for its defaults. The child shares
    this run's datasets and compilation cache (XLA keys programs by their flags too)."""
    if pyfuncitem.get_closest_marker("xla_defaults") is None or XLA_DEFAULTS:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(JAXEPOCHS_TEST_XLA_DEFAULTS="1", XLA_FLAGS=USER_XLA_FLAGS, JAXEPOCHS_XLA_DEFAULTS="1")
    env["JAXEPOCHS_TEST_SHARED_DIR"] = str(_SHARED_BASE[0])
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", pyfuncitem.nodeid]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0 or "1 passed" not in done.stdout:
        pytest.fail(f"{pyfuncitem.nodeid} under XLA's default emitters:\n{done.stdout[-6000:]}{done.stderr[-3000:]}")
    return True


@pytest.fixture(autouse=True)
def _optimized_when_marked(request):
    """Runs the tests marked `optimized` inside `optimized()`."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    with optimized():
        yield


@pytest.fixture(scope="session", autouse=True)
def tfds_data_dir(tmp_path_factory) -> pathlib.Path:
    """Points $TFDS_DATA_DIR at a fresh directory of this test run: the built-in datasets are prepared there, once
    (the workers take turns: preparing holds a lock), and the user's ~/tensorflow_datasets is never read or
    written."""
    _SHARED_BASE.append(_shared_base(tmp_path_factory))
    directory = _shared_directory(tmp_path_factory, "tensorflow_datasets")
    previous = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = str(directory)
    yield directory
    if previous is None:
        os.environ.pop("TFDS_DATA_DIR", None)
    else:
        os.environ["TFDS_DATA_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory) -> pathlib.Path:
    """A persistent compilation cache in a directory of this test run (shared by its workers), set before
    anything compiles: the many runs here that build the same programs (same model and shapes, other seeds or
    epochs) compile them once. Cache hits still record the backend-compile event, so compilation counts are
    unchanged by it."""
    import jax

    directory = _shared_directory(tmp_path_factory, "jax_compilation_cache")
    saved = {
        name: getattr(jax.config, name)
        for name in (
            "jax_compilation_cache_dir",
            "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes",
        )
    }
    jax.config.update("jax_compilation_cache_dir", str(directory))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(directory)  # CLI subprocesses too: never the user's cache
    # ...and every program in it: a subprocess left at JAX's default (1 s) recompiled its ~20 small programs
    # (1.2 s of CPU in each of the suite's CLI processes).
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield directory
    for name, value in saved.items():
        jax.config.update(name, value)


class CompileCounter:
    """Counts XLA backend compilations while active (a context manager)."""

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listener)


@pytest.fixture
def compile_counter():
    """A factory of CompileCounter context managers."""
    return CompileCounter


def tiny_config(overrides: dict[str, str] | None = None):
    """mnist1d with a small MLP, 2 epochs and batch 64 (3600 / 64 is not whole), on one of the two devices
    (mesh.data 1: the tests of other things skip the partitioned program's cost; tests/test_devices.py runs
    the default mesh), without curves.png (0.3-0.7 s of matplotlib a run; the tests of curves.png turn it on),
    plus `overrides` as on the command line, e.g. {"train.epochs": "3"}."""
    from jaxepochs.host.config import apply_overrides, base_config

    defaults = {"model.hidden_sizes": "(16,)", "train.epochs": "2", "train.batch_size": "64", "mesh.data": "1"}
    defaults["logging.curves"] = "False"
    return apply_overrides(base_config(), {**defaults, **(overrides or {})})


@pytest.fixture
def make_config():
    """tiny_config, for tests: make_config({"train.epochs": "1"})."""
    return tiny_config


def _events(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_writers_hold_the_rows(workdir) -> None:
    """metrics.csv (Keras's CSVLogger columns: epoch first) and the TensorBoard events hold each epoch of
    metrics.jsonl once, with its values (TensorBoard's as float32)."""
    import csv

    import numpy as np

    rows = read_jsonl(workdir / "metrics.jsonl")
    with (workdir / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[0] == "epoch" and [int(r["epoch"]) for r in table] == [row["epoch"] for row in rows]
    for row, line in zip(rows, table, strict=True):
        assert {k: float(v) for k, v in line.items() if v != ""} == {k: float(v) for k, v in row.items()}
    events = _events(workdir / "tensorboard")
    for tag in {key for row in rows for key in row} - {"epoch", "steps"}:
        expected = [(row["epoch"], np.float32(row[tag])) for row in rows if tag in row]
        assert events[tag] == expected, tag
