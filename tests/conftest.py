"""Test setup: two host CPU devices, no accelerator, and a per-session TFDS data dir.

The environment variables must be set before jax is first imported, so they are set at the top of this file,
which pytest imports before any test module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in (os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2") if flag
)
os.environ["JAX_PLATFORMS"] = "cpu"
# XLA's backend optimisations cost about 40% of the suite's CPU time (the suite is mostly compiles of small
# programs) and buy nothing at test sizes; JAX's own test suite runs with this flag. Set as an environment variable,
# it reaches the CLI subprocesses too. The tests marked `optimized` run under XLA's defaults (see `optimized`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# A metrics row's fields that differ between equal runs (jaxepochs.host.run.TIMING_KEYS): the time, the examples per
# second, the peak device memory (where the backend reports it).
TIMED = ("seconds", "examples_per_second", "peak_memory_bytes")
EXPERIMENT = REPO / "experiments" / "mnist1d_mlp.py"

# jax.monitoring records this event once per XLA backend compilation (jax._src.dispatch's
# BACKEND_COMPILE_EVENT); test_epoch.py checks that a fresh jit records it, so a rename fails loudly.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _shared_directory(tmp_path_factory, name: str) -> pathlib.Path:
    """A directory of this test run that its xdist workers share (their base directories' parent, which is this
    run's own), so that what one worker prepares or compiles the other finds; without xdist, the session's."""
    base = tmp_path_factory.getbasetemp()
    directory = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
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
