"""The devices and processes a run spans: its mesh, JAX's multi-controller runtime, and moving arrays on and off.

One process (the usual case) sees every device of its machine; past one host, `jax.distributed.initialize()`
joins the processes into one runtime whose `jax.devices()` are every process's, and every process runs the same
program on the same global arrays (each computes on its own devices' shards). These helpers hide the
difference: `put` builds a global array from the host value every process holds, `fetch` brings one back to
every process, `agree` makes the host's decisions (how many epochs the next call runs, whether a checkpoint is
due, whether Ctrl-C was pressed) process 0's, so every process calls the same programs in the same order.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np

from jaxepochs.core import layout as layout_lib
from jaxepochs.host import config as config_lib

DEFAULT_TIMEOUT_SECONDS = 60  # to reach the coordinator; then an error, not a hang


class DistributedError(RuntimeError):
    """The processes of a multi-host run could not be joined, or do not agree."""


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS, heartbeat_seconds: int = 100) -> None:  # fmt: skip
    """`jax.distributed.initialize` with these arguments (None: JAX detects them, on TPU pods, SLURM and
    Open MPI); on CPU, gloo's collectives. DistributedError, naming the address, when the coordinator is not
    reached within `timeout_seconds`."""
    # gloo: the CPU client's collectives across processes (a GPU or TPU backend uses its own; this setting only
    # concerns CPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address and process_id:
        _wait_for_coordinator(coordinator_address, timeout_seconds)
    elif coordinator_address:
        # JAX ends the process (SIGABRT, no Python error) when the others do not join in time: say it first.
        warn(f"waiting up to {timeout_seconds} s for {num_processes} processes to join at {coordinator_address}.")
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=timeout_seconds,
            heartbeat_timeout_seconds=heartbeat_seconds,
        )
    except ValueError as e:  # --distributed where JAX detects no cluster
        raise DistributedError(
            f"JAX found no cluster to join ({e}): --distributed reads a TPU pod's, SLURM's or Open MPI's "
            "environment. Elsewhere give --coordinator_address HOST:PORT, --num_processes and --process_id."
        ) from None
    except Exception as e:  # XlaRuntimeError, RuntimeError: all say the same to the user
        where = coordinator_address or "the address JAX detects"
        raise DistributedError(
            f"could not join the processes through the coordinator at {where} within {timeout_seconds} s "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Start every process with the same "
            "--coordinator_address HOST:PORT (process 0's host, a free port) and --num_processes, each with its "
            "own --process_id, and check that the port is reachable."
        ) from None


def _wait_for_coordinator(address: str, timeout_seconds: float) -> None:
    """DistributedError unless process 0's coordinator accepts a connection within `timeout_seconds`: JAX's
    client would end the process (SIGABRT, no message a user could act on) after its own timeout."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline or isinstance(e, ValueError):
                raise DistributedError(
                    f"could not reach the coordinator at {address} within {timeout_seconds} s ({e}). Start process "
                    "0 first (it serves the coordinator) with the same --coordinator_address HOST:PORT, and check "
                    "that the port is reachable from this host."
                ) from None
            time.sleep(0.2)


def is_primary() -> bool:
    """Process 0: the one that writes a run's logs, curves and summaries (checkpoints are written by all)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def on_primary(step):
    """`step()` on process 0 only (a write to the workdir), its value returned there (None elsewhere); past one
    process, its failure is every process's: process 0 raises the error, the others a DistributedError, rather
    than wait at the next collective for a process that has gone."""
    value, failed = None, None
    if is_primary():
        try:
            value = step()
        except Exception as error:
            failed = error
    if not agree((int(failed is not None),))[0]:
        return value
    if failed is not None:
        raise failed
    raise DistributedError("process 0 stopped with an error before training (see its output); fix it and rerun all.")


def run_layout(m, batch: int, accumulate: int, streamed: bool, say) -> layout_lib.Layout | None:
    """The layout of a run: its batches over `mesh.data` devices (None on one device: the programs are then
    those of a single-device run, with no annotations). ConfigError for a mesh that cannot be built. `m`: the
    config's mesh section; `batch`, `accumulate`: train.batch_size and train.accumulate_steps."""
    available = jax.device_count()
    if m.runs > 1:
        raise config_lib.ConfigError(
            f"config.mesh.runs = {m.runs} splits a sweep's runs; a run has one. Use mesh.runs = 0 or 1 (or "
            "`jaxepochs sweep`)."
        )
    _check_devices("mesh.data", m.data, available)
    if streamed and multi_process():
        raise config_lib.ConfigError(
            "a multi-process run needs its data on the devices for now (each process holds the dataset; streaming "
            "each process's share of the batches is not built yet): set data.stream = False, or train on one "
            "process (streamed batches are split over that process's devices)."
        )
    if multi_process() and not m.data and batch % available:
        raise config_lib.ConfigError(
            f"config.train.batch_size = {batch} does not divide over the {available} devices of the "
            f"{jax.process_count()} processes (a multi-process run uses them all). Use a multiple of {available}."
        )
    data = m.data or _auto_data(available, batch, accumulate, say)
    if batch % data:
        raise config_lib.ConfigError(
            f"config.train.batch_size = {batch} does not divide over mesh.data = {data} devices. Use a batch size "
            f"that is a multiple of {data}, or a mesh.data that divides {batch}."
        )
    if multi_process() and data != available:  # mesh.data was set: 0 would have taken every device
        raise config_lib.ConfigError(
            f"config.mesh.data = {data}, but the {jax.process_count()} processes have {available} devices: a "
            f"multi-process run uses them all. Use mesh.data = 0 or {available}."
        )
    if data == 1 and not m.shard_params:
        return None
    return layout_lib.Layout(layout_lib.make_mesh(jax.devices(), 1, data), bool(m.shard_params))


def sweep_mesh(m, batch: int) -> tuple[int, int]:
    """(runs, data): the devices a sweep splits its runs over and those each run's batches split over. By
    default every device on "runs" (a run's batch stays on one device: the runs are the parallel work)."""
    available = jax.device_count()
    data = m.data or 1
    _check_devices("mesh.data", data, available)
    runs = m.runs or max(available // data, 1)
    if multi_process() and runs * data != available:
        raise config_lib.ConfigError(
            f"config.mesh.runs * mesh.data = {runs} * {data}, but the {jax.process_count()} processes have "
            f"{available} devices: a multi-process sweep uses them all. Use 0 for either axis to choose it."
        )
    if runs * data > available:
        raise config_lib.ConfigError(
            f"config.mesh.runs * mesh.data = {runs} * {data} asks for {runs * data} devices, but JAX sees "
            f"{available}. Use a mesh of at most {available} devices, or 0 for either axis to choose it."
        )
    if batch % data:
        raise config_lib.ConfigError(
            f"config.train.batch_size = {batch} does not divide over mesh.data = {data} devices. "
            f"Use a batch size that is a multiple of {data}, or a mesh.data that divides it."
        )
    return runs, data


def sweep_layout(m, batch: int) -> layout_lib.Layout | None:
    """A sweep's layout where its runs' batches span devices (mesh.data > 1, or shard_params); None where each
    run lies on one device (the runs split over "runs" by `jax.shard_map`, sweep/run.py)."""
    runs, data = sweep_mesh(m, batch)
    if data == 1 and not m.shard_params:
        return None
    return layout_lib.Layout(layout_lib.make_mesh(jax.devices(), runs, data), bool(m.shard_params))


def _check_devices(key: str, wanted: int, available: int) -> None:
    if wanted > available:
        raise config_lib.ConfigError(
            f"config.{key} = {wanted} asks for {wanted} devices, but JAX sees {available} "
            f"({jax.devices()[0].platform}). Use {key} <= {available}, or 0 to use every device."
        )


def _auto_data(available: int, batch: int, accumulate: int, say) -> int:
    """Every device, or the most that divide both the device count and the batch (said, when fewer)."""
    fits = [d for d in range(available, 0, -1) if available % d == 0 and batch % d == 0]
    # Where each micro-batch splits evenly too (rows i::k over d devices), prefer that: else XLA moves rows.
    even = [d for d in fits if (batch // accumulate) % d == 0]
    data = (even or fits)[0]
    if data < available and not multi_process():
        say(f"train.batch_size = {batch} does not divide over all {available} devices; the batches are split "
            f"over {data} of them (set mesh.data, or a batch size that {available} divides).")  # fmt: skip
    return data


def put(tree, shardings):
    """Host values (the same on every process) as global arrays with these shardings (a pytree of them, or one
    for every leaf): each process places its own devices' shards."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(_put_leaf, tree, shardings)
    return jax.tree.map(lambda a: _put_leaf(a, shardings), tree)


def _put_leaf(value, sharding):
    if not multi_process():
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fetch(tree):
    """A program's outputs as numpy on every process (replicated arrays from a local copy, split ones gathered
    across the processes: a collective, so every process calls it at the same point)."""
    if not multi_process():
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return np.asarray(a)
        if a.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(one, tree)


def agree(values: tuple[int, ...]) -> tuple[int, ...]:
    """Process 0's values on every process (one small broadcast); the values themselves on one process."""
    if not multi_process():
        return values
    from jax.experimental import multihost_utils

    agreed = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int64))
    return tuple(int(v) for v in np.asarray(agreed))


def check_same_config(config_json: str) -> None:
    """DistributedError on every process, naming the first key where a process's config (`config_json`, as
    config.json holds it) differs from process 0's: the processes of one run must run one config (else their
    programs would not match and they would hang)."""
    if not multi_process():
        return
    from jax.experimental import multihost_utils

    mine = config_lib.flatten(json.loads(config_json))
    text = json.dumps(mine, sort_keys=True, default=str).encode()
    size = int(agree((len(text),))[0])
    padded = np.zeros(size, np.uint8)
    if is_primary():
        padded[:] = np.frombuffer(text, np.uint8)
    primary = json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode())
    keys = sorted(primary.keys() | mine.keys())
    key = next((k for k in keys if primary.get(k) != mine.get(k)), None)
    said = b"" if key is None else json.dumps([key, mine.get(key)], default=str).encode()[:255]
    mine_named = np.zeros(256, np.uint8)
    mine_named[0], mine_named[1 : 1 + len(said)] = len(said), np.frombuffer(said, np.uint8)
    named = np.asarray(multihost_utils.process_allgather(mine_named)).reshape(jax.process_count(), 256)
    for process, row in enumerate(named):
        if row[0]:
            key, value = json.loads(bytes(row[1 : 1 + int(row[0])]).decode())
            raise DistributedError(
                f"process {process}'s config differs from process 0's at {key} ({value!r} there, "
                f"{primary.get(key)!r} on process 0): every process of a run must be started with the same "
                "--config and overrides."
            )


def describe(layout: layout_lib.Layout | None) -> dict[str, Any]:
    """The mesh and processes, for summary.json."""
    return {
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": {"runs": 1, "data": 1} if layout is None else dict(layout.mesh.shape),
        "shard_params": bool(layout is not None and layout.shard_params),
    }


def warn(text: str) -> None:
    print(f"jaxepochs: {text}", file=sys.stderr)


# The memory a container may use: cgroup v2's files, then v1's (where the process's cgroup is mounted, as in a
# container). A limit above the host's memory (v1's "unlimited" is 2^63 rounded down to pages) is no limit.
CGROUP_FILES = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def free_bytes(root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """Free memory of the first device and what it is: the accelerator's; on CPU the host's available memory,
    or what the container's memory limit (its cgroup) leaves, where that is less. A sweep's automatic chunk and
    the streamed-data budget read it: in a 2 GiB container, MemAvailable still says the host's memory."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"free memory of {jax.local_devices()[0]}"
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = 4 << 30
    left = _cgroup_left(root)
    if left is not None and left < available:
        return left, "memory left under the container's limit (cgroup)"
    return available, "available host memory (the CPU device's)"


def _cgroup_left(root: str) -> int | None:
    """The limit minus the usage of the process's memory cgroup, or None where there is no limit to read."""
    for limit_file, usage_file in CGROUP_FILES:
        try:
            with open(f"{root}/{limit_file}") as f:
                limit = f.read().strip()
            with open(f"{root}/{usage_file}") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(int(limit) - usage, 0)
    return None
