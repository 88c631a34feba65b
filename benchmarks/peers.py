"""jaxepochs side by side with its peers: the same model, data, initial parameters, optimizer, batch size and epochs.

    python benchmarks/peers.py                      # every workload, each contender twice; about 6 min, 2 cores
    python benchmarks/peers.py --quick              # a smoke run: 2-3 epochs each
    python benchmarks/peers.py --workloads mlp,cnn --out /tmp/peers
    pip install -e .[bench]                         # Keras 3 and PyTorch; without them their rows say "skipped"

Workloads: the MNIST-1D MLP and CNN (experiments/mnist1d_mlp.py, mnist1d_cnn.py: batch 100, Adam 1e-2), logistic
regression on the 8x8 digits at batch size 1 (experiments/digits_logreg.py: SGD 1e-2; the per-step overhead case)
and scaling: the MLP on 1x, 4x and 16x tiled copies of the MNIST-1D training split. The parent reads each dataset
once with `jaxepochs.data.loading.load_dataset` and takes the initial parameters from
`jaxepochs.host.setup.init_state` (what a run starts from); every contender trains from those arrays and parameters.

Each contender runs in its own subprocess (`--one WORKLOAD CONTENDER`), so peak RSS is its own and Keras and
PyTorch never share a process with jaxepochs:
  - jaxepochs, defaults: `train_and_evaluate(config, workdir, quiet=True, restart=True)` as a user runs it
    (checkpoints, metrics.jsonl, a validation pass per epoch); steady state from metrics.jsonl `seconds`.
  - jaxepochs, checkpoints off: `checkpoint.enabled=False`; quiet=True is the least logging there is (metrics.jsonl
    is always written); steady state from `seconds` too. Both rows do more work than the peers: a validation pass
    on the 10% held out each epoch. (`seconds` is the period from one epoch's results to the next's, so the host's
    time between epochs counts where the next epoch does not hide it.)
  - bare lax.scan, the limit: forward, backward and optimizer scanned over the training set, permuted once on the
    host and pre-batched on the device (ceil(N / B) whole batches); one jitted call per epoch; nothing else.
  - Keras 3 on its JAX backend: `model.fit(shuffle=True)`, steps_per_execution 1 and steps per epoch.
  - PyTorch eager (on the GPU where there is one, else the CPU): a loop over shuffled index batches,
    torch.optim; torch's default thread count.
jaxepochs compiles cold (a fresh compilation cache). Scaling compares `jaxepochs.core.epoch.train_epoch`, compiled as
benchmarks/step_cost.py does (train_and_evaluate reads its data from the config, it cannot be fed arrays), with
the bare scan.

Reported per contender: the median steps/s over the epochs after the first; the time to the end of the first
epoch, compile included; peak process RSS; ratios to jaxepochs and to the bare scan; the last epoch's mean
training loss, flagged when far from the bare scan's or when a contender took another number of steps.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np

# The XLA flags this command was started with: every contender's process starts from them, before anything of
# jaxepochs runs (`import jaxepochs` adds XLA:CPU's classic emitters to its own process's: jaxepochs' rows and the
# bare scan, which builds jaxepochs' model, get them; Keras and PyTorch keep XLA's defaults, as their users do).
STARTED_XLA_FLAGS = os.environ.get("XLA_FLAGS")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIPPED = "skipped (not installed: pip install -e .[bench])"
# The last epoch's mean train loss must be within max(25% of, 0.1) of the bare scan's: same initial parameters,
# optimizer and step count, only the batch order differs (a few hundredths); skipped or wrong work moves it more.
LOSS_RTOL, LOSS_ATOL = 0.25, 0.1


class Workload(NamedTuple):
    title: str
    experiment: str
    epochs: int  # the first (compile, warm-up) plus the timed ones
    quick_epochs: int


WORKLOADS = {
    "mlp": Workload("MNIST-1D MLP 40-100-100-10 (residual), batch 100, Adam 1e-2", "mnist1d_mlp", 11, 3),
    "cnn": Workload("MNIST-1D CNN (3 Conv1d of 25 channels, linear on 125), batch 100, Adam 1e-2", "mnist1d_cnn", 7, 3),
    "digits": Workload("digits logistic regression 64-10, batch 1, SGD 1e-2", "digits_logreg", 6, 2),
    "scaling": Workload("scaling: the MLP on 1x, 4x, 16x tiled MNIST-1D training sets", "mnist1d_mlp", 6, 2),
}
CONTENDERS = {
    "jaxepochs": "jaxepochs, defaults (whole epoch: `seconds`)",
    "jaxepochs-off": "jaxepochs, checkpoints off, quiet (whole epoch: `seconds`)",
    "jaxepochs-warm": "jaxepochs, checkpoints off, its compilation cache warm (an earlier process filled it)",
    "bare": "bare lax.scan (limit)",
    "keras": "Keras 3 (JAX), steps_per_execution=1",
    "keras-spe": "Keras 3 (JAX), steps_per_execution=steps/epoch",
    "torch": "PyTorch eager (default threads; on the GPU where there is one)",
}
SCALING_COPIES = (1, 4, 16)
SCALING_CONTENDERS = {"epoch": "jaxepochs train_epoch (compiled)", "bare": "bare lax.scan (limit)"}


# ----------------------------------------------------------------------------------------------- child process
def _flax_model(meta: dict):
    import ml_collections

    from jaxepochs import models

    return models.make_model(ml_collections.ConfigDict(meta["model"]), meta["num_classes"])


def _from_ends(start: float, ends: list[float], final_loss: float, steps: int) -> dict:
    """Timings from the moments each epoch ended: the first from `start`, then epoch to epoch."""
    epoch_s = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {"first_epoch_s": ends[0] - start, "epoch_s": epoch_s, "final_loss": float(final_loss), "steps": steps}


def run_jaxepochs(data: dict, meta: dict, epochs: int, checkpoints: bool, cache: str = "") -> dict:
    """`cache`: a compilation cache directory that outlives the process (the warm contender's), else a fresh one."""
    from jaxepochs.host import config as config_lib
    from jaxepochs.host import run as train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"train.epochs": str(epochs), "train.compilation_cache_dir": cache or f"{tmp}/xla"}
        overrides |= {} if checkpoints else {"checkpoint.enabled": "False"}
        config = config_lib.apply_overrides(config_lib.load_config_file(ROOT / meta["experiment"]), overrides)
        first: list[float] = []  # when the first metrics row is written: the end of the first epoch
        write = train.report.MetricsLog.write

        def timed_write(log, row) -> None:  # this child process only
            if not first:
                first.append(time.perf_counter() - start)
            write(log, row)

        train.report.MetricsLog.write = timed_write
        start = time.perf_counter()
        result = train.train_and_evaluate(config, f"{tmp}/run", quiet=True, restart=True)
    rows = result.history
    assert result.summary["num_train_examples"] == len(data["y"]), "jaxepochs read other training data"
    return {
        "first_epoch_s": first[0],
        "epoch_s": [row["seconds"] for row in rows[1:]],
        "final_loss": rows[-1]["train_loss"],
        "steps": int(result.state.step),
        "compile_s": result.summary["compile_seconds"],
        "first_row_s": rows[0]["seconds"],
        "seconds_median": statistics.median(row["seconds"] for row in rows[1:]),
        "host_s": result.summary["host_seconds_per_epoch"],
    }


def run_bare(data: dict, meta: dict, epochs: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    start = time.perf_counter()
    model = _flax_model(meta)
    tx = optax.adam(meta["lr"]) if meta["optimizer"] == "adam" else optax.sgd(meta["lr"])
    n, batch = len(data["y"]), meta["batch_size"]
    steps = math.ceil(n / batch)
    # Permuted once (so tiled copies do not repeat in a fixed period), wrapped to ceil(N / B) whole batches.
    order = np.random.default_rng(0).permutation(n)[np.arange(steps * batch) % n]
    x_sbf = jnp.asarray(data["x"][order].reshape(steps, batch, *data["x"].shape[1:]))
    y_sb = jnp.asarray(data["y"][order].reshape(steps, batch))

    def step(carry, batch_xy):
        params, opt_state, loss_sum = carry
        x_bf, y_b = batch_xy
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x_bf), y_b)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p).mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, loss_sum + loss), None

    @jax.jit
    def epoch(params, opt_state, x_sbf, y_sb):
        (params, opt_state, loss_sum), _ = jax.lax.scan(step, (params, opt_state, 0.0), (x_sbf, y_sb))
        return params, opt_state, loss_sum / steps

    params = jax.tree.map(jnp.asarray, data["params"])
    opt_state, ends = tx.init(params), []
    for _ in range(epochs):
        params, opt_state, loss = jax.block_until_ready(epoch(params, opt_state, x_sbf, y_sb))
        ends.append(time.perf_counter())
    return _from_ends(start, ends, float(loss), epochs * steps)


def run_train_epoch(data: dict, meta: dict, epochs: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import ml_collections

    from jaxepochs.core import epoch as epoch_lib
    from jaxepochs.core import optim as schedules
    from jaxepochs.core import task as task_lib

    start = time.perf_counter()
    model = _flax_model(meta)
    steps = epoch_lib.steps_per_epoch(len(data["y"]), meta["batch_size"])
    tx = schedules.make_optimizer(ml_collections.ConfigDict(meta["optimizer_config"]), steps, epochs)  # the trainer's
    params = jax.tree.map(jnp.asarray, data["params"])
    state = epoch_lib.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(1))
    x_n, y_n = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    task = task_lib.make_task(lambda params, model_state, x_b, key, train: (apply_fn(params, x_b), model_state))
    epoch = functools.partial(epoch_lib.train_epoch, task=task, tx=tx, batch_size=meta["batch_size"])
    run = jax.jit(lambda state, x, y, e: epoch(state, {"x": x, "y": y}, e))
    ends = []
    for e in range(1, epochs + 1):
        state, totals = jax.block_until_ready(run(state, x_n, y_n, jnp.asarray(e, jnp.int32)))
        ends.append(time.perf_counter())
    return _from_ends(start, ends, float(totals.mean("loss")), int(state.step))


def keras_model(keras, meta: dict, params: dict, input_shape: tuple):
    """The flax model as a Keras functional model, holding the same initial weights."""
    layers, m = keras.layers, meta["model"]
    inputs = keras.Input(input_shape)
    weighted = []  # in flax's parameter order
    if m["name"] == "mlp":
        h = layers.Flatten()(inputs)
        for i, width in enumerate(m["hidden_sizes"]):
            weighted.append(layers.Dense(width, activation="relu"))
            out = weighted[-1](h)
            h = layers.Add()([h, out]) if m["residual"] and i > 0 and h.shape[-1] == width else out
        names = [f"Dense_{i}" for i in range(len(m["hidden_sizes"]) + 1)]
    else:  # cnn: zeros on each side, then a "valid" convolution, as flax's padding=[(p, p)]
        h = layers.Reshape((*input_shape, 1))(inputs)
        for ch, k, s in zip(m["channels"], m["kernel_sizes"], m["strides"], strict=True):
            weighted.append(layers.Conv1D(ch, k, strides=s, padding="valid", activation="relu"))
            h = weighted[-1](layers.ZeroPadding1D(m["padding"])(h))
        h = layers.Flatten()(h)  # [B, L, C] flattened as flax does
        names = [f"Conv_{i}" for i in range(len(m["channels"]))] + ["Dense_0"]
    weighted.append(layers.Dense(meta["num_classes"]))
    model = keras.Model(inputs, weighted[-1](h))
    for layer, name in zip(weighted, names, strict=True):
        layer.set_weights([params[name]["kernel"], params[name]["bias"]])
    return model


def run_keras(data: dict, meta: dict, epochs: int, whole_epoch: bool) -> dict:
    os.environ["KERAS_BACKEND"] = "jax"  # before the import
    import keras

    assert keras.backend.backend() == "jax", keras.backend.backend()
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    model = keras_model(keras, meta, data["params"], data["x"].shape[1:])
    adam = meta["optimizer"] == "adam"
    optimizer = keras.optimizers.Adam(meta["lr"], epsilon=1e-8) if adam else keras.optimizers.SGD(meta["lr"])
    steps = math.ceil(len(data["y"]) / meta["batch_size"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, steps_per_execution=steps if whole_epoch else 1)
    ends: list[float] = []
    on_end = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(time.perf_counter()))
    history = model.fit(
        data["x"], data["y"], batch_size=meta["batch_size"], epochs=epochs, shuffle=True, verbose=0, callbacks=[on_end]
    )
    return _from_ends(start, ends, history.history["loss"][-1], int(optimizer.iterations.numpy()))


def torch_model(torch, meta: dict, params: dict):
    """The flax model as a torch.nn.Module, holding the same initial weights."""
    nn, m = torch.nn, meta["model"]

    def loaded(layer, weight, bias):
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(weight))
        layer.bias.data = torch.from_numpy(np.ascontiguousarray(bias))
        return layer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList()
            if m["name"] == "mlp":
                names = [f"Dense_{i}" for i in range(len(m["hidden_sizes"]) + 1)]
                kernels = [params[name]["kernel"] for name in names]
            else:
                for i, (ch, k, s) in enumerate(zip(m["channels"], m["kernel_sizes"], m["strides"], strict=True)):
                    kernel, bias = params[f"Conv_{i}"]["kernel"], params[f"Conv_{i}"]["bias"]  # kernel: [k, in, out]
                    conv = nn.Conv1d(kernel.shape[1], ch, k, stride=s, padding=m["padding"])
                    self.convs.append(loaded(conv, kernel.transpose(2, 1, 0), bias))
                names, kernel = ["Dense_0"], params["Dense_0"]["kernel"]  # its rows in flax's [L, C] order
                length, ch = kernel.shape[0] // m["channels"][-1], m["channels"][-1]  # torch flattens [C, L]
                kernels = [kernel.reshape(length, ch, -1).transpose(1, 0, 2).reshape(kernel.shape)]
            self.dense = nn.ModuleList(
                loaded(nn.Linear(*kernel.shape), kernel.T, params[name]["bias"])
                for kernel, name in zip(kernels, names, strict=True)
            )

        def forward(self, x):
            if m["name"] == "mlp":
                h = x.flatten(1)
                for i, layer in enumerate(self.dense[:-1]):
                    out = torch.relu(layer(h))
                    h = h + out if m["residual"] and i > 0 and h.shape[-1] == out.shape[-1] else out
            else:
                h = x.unsqueeze(1)
                for conv in self.convs:
                    h = torch.relu(conv(h))
                h = h.flatten(1)
            return self.dense[-1](h)

    return Net()


def run_torch(data: dict, meta: dict, epochs: int) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the accelerator JAX gets, if any
    start = time.perf_counter()
    net = torch_model(torch, meta, data["params"]).to(device)
    optimizer = (torch.optim.Adam if meta["optimizer"] == "adam" else torch.optim.SGD)(net.parameters(), lr=meta["lr"])
    x, y = torch.from_numpy(data["x"]).to(device), torch.from_numpy(data["y"].astype(np.int64)).to(device)
    n, batch = len(y), meta["batch_size"]
    generator, ends, taken = torch.Generator().manual_seed(0), [], 0
    for _ in range(epochs):
        order, loss_sum = torch.randperm(n, generator=generator).to(device), torch.zeros((), device=device)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            taken += 1
        if device.type == "cuda":
            torch.cuda.synchronize()  # the epoch's kernels have run, not only been queued
        ends.append(time.perf_counter())
    return {
        **_from_ends(start, ends, float(loss_sum) / math.ceil(n / batch), taken),
        "threads": torch.get_num_threads(),
        "torch_device": str(device),
    }


def child(contender: str, data_path: str, epochs: int, copies: int) -> dict:
    with np.load(data_path) as f:
        meta = json.loads(str(f["meta"]))
        data = {"x": np.tile(f["x"], (copies, 1)), "y": np.tile(f["y"], copies), "params": {}}
        for key in (key for key in f.files if key.startswith("p/")):
            _, layer, name = key.split("/")
            data["params"].setdefault(layer, {})[name] = f[key]
    runners = {
        "jaxepochs": lambda: run_jaxepochs(data, meta, epochs, checkpoints=True),
        "jaxepochs-off": lambda: run_jaxepochs(data, meta, epochs, checkpoints=False),
        "jaxepochs-warm": lambda: run_jaxepochs(data, meta, epochs, checkpoints=False, cache=f"{data_path}.xla"),
        "bare": lambda: run_bare(data, meta, epochs),
        "epoch": lambda: run_train_epoch(data, meta, epochs),
        "keras": lambda: run_keras(data, meta, epochs, whole_epoch=False),
        "keras-spe": lambda: run_keras(data, meta, epochs, whole_epoch=True),
        "torch": lambda: run_torch(data, meta, epochs),
    }
    try:
        out = runners[contender]()
    except ModuleNotFoundError as e:
        if e.name not in ("keras", "torch"):
            raise
        return {"skipped": SKIPPED}
    status = pathlib.Path("/proc/self/status")
    end_rss = re.search(r"VmRSS:\s*(\d+)", status.read_text()) if status.exists() else None
    return {
        **out,
        "steps_per_epoch": math.ceil(len(data["y"]) / meta["batch_size"]),
        "data_mib": (data["x"].nbytes + data["y"].nbytes) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "end_rss_mib": int(end_rss.group(1)) / 1024 if end_rss else None,
    }


# ---------------------------------------------------------------------------------------------- parent process
def prepare(name: str, tmp: str) -> str:
    """Reads the workload's dataset and jaxepochs' initial parameters once, for every contender."""
    import jax

    from jaxepochs import models
    from jaxepochs.core import optim as schedules
    from jaxepochs.data import loading as data_lib
    from jaxepochs.host import config as config_lib
    from jaxepochs.host import setup

    experiment = f"experiments/{WORKLOADS[name].experiment}.py"
    config = config_lib.load_config_file(ROOT / experiment)
    dataset = data_lib.load_dataset(config, quiet=True)
    model = models.make_model(config.model, dataset.num_classes)
    tx = schedules.make_optimizer(config.optimizer, 1, config.train.epochs)
    state = setup.init_state(model, tx, config.seed, dataset.train.x)  # what train_and_evaluate starts from
    meta = {
        "experiment": experiment,
        "model": config.model.to_dict(),
        "num_classes": dataset.num_classes,
        "batch_size": config.train.batch_size,
        "optimizer": config.optimizer.name,
        "lr": config.optimizer.learning_rate,
        "optimizer_config": config.optimizer.to_dict(),
    }
    params = jax.device_get(state.params)
    flat = {f"p/{layer}/{k}": np.asarray(v) for layer, leaves in params.items() for k, v in leaves.items()}
    path = f"{tmp}/{name}.npz"
    np.savez(path, x=dataset.train.x, y=dataset.train.y, meta=json.dumps(meta), **flat)
    return path


def run_child(workload: str, contender: str, data_path: str, epochs: int, copies: int = 1) -> dict:
    """One contender in a fresh process; adds steps/s (the median over the epochs after the first)."""
    cmd = [sys.executable, __file__, "--one", workload, contender, "--data", data_path, "--epochs", str(epochs)]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}  # cold
    env.update({"XLA_FLAGS": STARTED_XLA_FLAGS} if STARTED_XLA_FLAGS is not None else {})
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [*cmd, "--copies", str(copies), "--json"], capture_output=True, text=True, env=env, timeout=600
        )
    except subprocess.TimeoutExpired:
        return {"contender": contender, "failed": "timed out"}
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]  # the exception, usually
        return {"contender": contender, "failed": f"failed (exit {done.returncode}): {last}"}
    row = {"contender": contender, **json.loads(done.stdout.strip().splitlines()[-1])}
    row["process_s"] = time.perf_counter() - start
    if row.get("epoch_s"):
        row["steps_per_s"] = row["steps_per_epoch"] / statistics.median(row["epoch_s"])
    return row


def check_work(row: dict, bare: dict, epochs: int, loss: bool = True) -> None:
    """Flags a row that took another number of steps, or (`loss`) whose final loss is far from the bare scan's."""
    if "final_loss" not in row:
        return
    warnings = []
    if row["steps"] != epochs * row["steps_per_epoch"]:
        warnings.append(f"took {row['steps']} steps, not {epochs * row['steps_per_epoch']}")
    ref = bare.get("final_loss")
    if loss and ref is not None and not abs(row["final_loss"] - ref) <= max(LOSS_RTOL * ref, LOSS_ATOL):
        warnings.append(f"final loss {row['final_loss']:.3f} far from the bare scan's {ref:.3f}")
    if warnings:
        row["warning"] = "; ".join(warnings)


def _ratio(row: dict, other: dict | None) -> str:
    return f"{row['steps_per_s'] / other['steps_per_s']:.3g}x" if other and "steps_per_s" in other else "-"


def table(rows: list[dict], labels: dict, refs: list[tuple[dict, dict]], copies: bool = False) -> list[str]:
    """A Markdown table; refs[i] holds row i's (jaxepochs row, bare row) for the ratio columns."""
    head = "| contender |" + (" copies |" if copies else "") + " steps/s (median) | first epoch s (incl. compile) |"
    lines = [head + " peak RSS MiB | vs jaxepochs | vs bare | final train loss |", "|---" * (7 + copies) + "|"]
    for row, (ref, bare) in zip(rows, refs, strict=True):
        cells = [labels[row["contender"]] + (f" ⚠ {row['warning']}" if row.get("warning") else "")]
        cells += [str(row["copies"])] if copies else []
        if "steps_per_s" in row:
            cells += [f"{row['steps_per_s']:.0f}", f"{row['first_epoch_s']:.2f}", f"{row['peak_rss_mib']:.0f}"]
            cells += [_ratio(row, ref), _ratio(row, bare), f"{row['final_loss']:.4f}"]
        else:
            cells += [row.get("skipped") or row.get("failed", "?"), *["-"] * 5]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target(name: str, num: dict | None, den: dict | None, need: float) -> tuple[str, str]:
    if not (num and den and "steps_per_s" in num and "steps_per_s" in den):
        return name, "SKIP (a contender is missing)"
    got = num["steps_per_s"] / den["steps_per_s"]
    flagged = " (a row is flagged: unequal work)" if num.get("warning") or den.get("warning") else ""
    return name, f"{'PASS' if got >= need else 'FAIL'}: {got:.2f}x (need >= {need}x){flagged}"


def target_at_most(name: str, num: dict | None, den: dict | None, key: str, most: float) -> tuple[str, str]:
    """`num[key]` at most `most` times `den[key]` (seconds, MiB: lower is better)."""
    if not (num and den and key in num and key in den):
        return name, "SKIP (a contender is missing)"
    got = num[key] / den[key]
    return name, f"{'PASS' if got <= most else 'FAIL'}: {num[key]:.2f} vs {den[key]:.2f}, {got:.2f}x (need <= {most}x)"


def best_of_rounds(name: str, data_path: str, epochs: int, rounds: int) -> list[dict]:
    """Every contender once per round, rounds in turn; per contender the fastest round's row (the one least
    disturbed by other processes: on a shared machine identical runs differ by up to 30%), with all rounds'
    steps/s kept in `rounds_steps_per_s`."""
    run_child(name, "jaxepochs-warm", data_path, epochs)  # fills the warm contender's cache (not counted)
    runs = [[run_child(name, contender, data_path, epochs) for contender in CONTENDERS] for _ in range(rounds)]
    rows = []
    for column in zip(*runs, strict=True):
        row = dict(max(column, key=lambda r: r.get("steps_per_s", 0.0)))
        row["rounds_steps_per_s"] = [r.get("steps_per_s") for r in column]
        rows.append(row)
    return rows


def peers(
    name: str, data_path: str, epochs: int, rounds: int = 1
) -> tuple[list[dict], list[str], list[tuple[str, str]]]:
    rows = best_of_rounds(name, data_path, epochs, rounds)
    by = {row["contender"]: row for row in rows}
    off, bare, torch = by["jaxepochs-off"], by["bare"], by["torch"]
    for row in rows:
        check_work(row, bare, epochs)
    lines = table(rows, CONTENDERS, [(off, bare)] * len(rows))
    if "threads" in torch:
        lines.append(f"\nPyTorch: torch.get_num_threads() = {torch['threads']}, the default, left as is.")
    if "compile_s" in off:
        lines.append(
            f"jaxepochs, checkpoints off: the whole epoch (`seconds`) {1e3 * off['seconds_median']:.2f} ms, of which "
            f"the host's bookkeeping {1e3 * off['host_s']:.2f} ms runs beside the next epoch (medians). Its first "
            f"epoch: compile_seconds {off['compile_s']:.2f} s + the first row's seconds {off['first_row_s']:.2f} s + "
            "reading the dataset, initialising (its own compile, beside the epoch's) and setting up."
        )
    targets = [
        target(f"{name}: jaxepochs (checkpoints off) >= 0.95x bare", off, bare, 0.95),
        target(f"{name}: jaxepochs (defaults) >= 0.85x bare", by["jaxepochs"], bare, 0.85),
    ]
    keras = [by[c] for c in ("keras", "keras-spe") if "steps_per_s" in by[c]]
    best_keras = max(keras, key=lambda row: row["steps_per_s"]) if keras else None
    keras = by["keras"] if "steps_per_s" in by["keras"] else None
    targets += [  # issue #33: the first result sooner, and the memory of a peer
        target_at_most(f"{name}: first epoch (cold cache) <= Keras's", off, keras, "first_epoch_s", 1.0),
        target_at_most(
            f"{name}: first epoch (warm cache) <= Keras's", by["jaxepochs-warm"], keras, "first_epoch_s", 1.0
        ),
        target_at_most(f"{name}: peak RSS <= 1.1x Keras's", off, keras, "peak_rss_mib", 1.1),
    ]
    if name == "mlp":
        targets.append(target("mlp: jaxepochs >= 1.0x Keras (best steps_per_execution)", off, best_keras, 1.0))
        targets.append(target("mlp: jaxepochs >= 3x PyTorch eager", off, torch, 3.0))
    if name == "cnn":
        targets.append(target("cnn: jaxepochs >= 1.5x PyTorch eager", off, torch, 1.5))
    return rows, lines, targets


def scaling(
    name: str, data_path: str, epochs: int, rounds: int = 1
) -> tuple[list[dict], list[str], list[tuple[str, str]]]:
    rows, refs, targets = [], [], []
    for k in SCALING_COPIES:
        ours, bare = ({"copies": k, **run_child(name, c, data_path, epochs, k)} for c in SCALING_CONTENDERS)
        # Steps only: the bare scan's batches come in one fixed order, and on 16 copies (every example 16 times an
        # epoch) it memorises that order's cycle, to a loss near 0 that reshuffling every epoch never reaches
        # (train_epoch with shuffle=False does the same), so its loss is no reference here.
        check_work(ours, bare, epochs, loss=False)
        check_work(bare, bare, epochs, loss=False)
        rows, refs = rows + [ours, bare], refs + [(ours, bare)] * 2
        targets.append(target(f"scaling {k}x: jaxepochs train_epoch >= 0.95x bare", ours, bare, 0.95))
    lines = table(rows, SCALING_CONTENDERS, refs, copies=True)
    lines.append(
        "\nThe work check here counts steps only: the bare scan's fixed batch order lets it memorise tiled copies."
    )
    for contender, label in SCALING_CONTENDERS.items():
        done = [row for row in rows if row["contender"] == contender and "steps_per_s" in row]
        if len(done) < len(SCALING_COPIES):
            continue
        ms = [1e3 * statistics.median(row["epoch_s"]) for row in done]
        grow = lambda key: " / ".join(f"{row[key] - done[0][key]:+.1f}" for row in done)  # noqa: B023
        lines.append(
            f"\n{label}: epoch {' / '.join(f'{m:.1f}' for m in ms)} ms at 1x / 4x / 16x ({ms[-1] / ms[0]:.1f}x at 16x; "
            f"linear is 16x); against 1x, peak RSS {grow('peak_rss_mib')} MiB and RSS at the end "
            f"{grow('end_rss_mib')} MiB, for {grow('data_mib')} MiB more training data on the host (the device holds "
            "a second copy)."
        )
    return rows, lines, targets


def environment() -> dict:
    import jax

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    cpus = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    device = jax.devices()[0]
    return {
        **{package: version(package) for package in ("jax", "flax", "optax", "keras", "torch")},
        "python": platform.python_version(),
        "cpu": cpus[0] if cpus else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "device": f"{device.platform} ({device.device_kind})",
        "load average": " ".join(f"{v:.2f}" for v in os.getloadavg()),  # other work on the machine skews timings
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-3 epochs per contender: a smoke run")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of each contender (not scaling); the fastest counts"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the .md and .json go")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "CONTENDER"), help="run one contender (internal)")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="with --one: print its result as one JSON line")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(child(args.one[1], args.data, args.epochs, args.copies)))
        return 0
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := [w for w in chosen if w not in WORKLOADS]:
        parser.error(f"unknown workloads {unknown}; choose from {','.join(WORKLOADS)}")

    began, env = time.perf_counter(), environment()
    lines = [f"# jaxepochs vs peers{' (--quick)' if args.quick else ''}", ""]
    lines += [", ".join(f"{k} {v}" for k, v in env.items()) + ".", ""]
    print("\n".join(lines), flush=True)
    results: dict[str, Any] = {"environment": env, "quick": args.quick, "workloads": {}}
    targets: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            spec = WORKLOADS[name]
            epochs = spec.quick_epochs if args.quick else spec.epochs
            rounds = 1 if args.quick or name == "scaling" else args.rounds
            rows, more, new_targets = (scaling if name == "scaling" else peers)(
                name, prepare(name, tmp), epochs, rounds
            )
            section = [f"## {spec.title}", "", f"{epochs} epochs: the first (compile) + {epochs - 1} timed"]
            section[-1] += f"; each contender run {rounds} times, the fastest shown." if rounds > 1 else "."
            section.append("")
            section += [*more, ""]
            print("\n".join(section), flush=True)
            lines, targets = lines + section, targets + new_targets
            results["workloads"][name] = {"title": spec.title, "epochs": epochs, "rows": rows}
    tail = ["## Targets", "", "| target | result |", "|---|---|", *(f"| {t} | {r} |" for t, r in targets), ""]
    tail += [
        "`vs jaxepochs` and the peer targets use the checkpoints-off row (whole epochs, validation included).",
        "The defaults row checkpoints only at the end of so short a run (every_seconds = 30), after the timed epochs.",
        "First epoch: from building the model (jaxepochs: from the train_and_evaluate call, reading the dataset",
        "included) to the end of epoch 1. Peak RSS: ru_maxrss of the contender's own process.",
        f"Loss check: the last epoch's mean train loss within max({LOSS_RTOL:.0%} of, {LOSS_ATOL}) of the bare scan's.",
    ]
    load, cores = float(env["load average"].split()[0]), os.cpu_count() or 1  # before any contender ran
    if load > 0.5 * cores:
        tail.append(
            f"**The machine was busy** (load average {load:.1f} on {cores} cores): timings are skewed, PyTorch's "
            f"default {cores} threads most (they wait on each other when another process holds a core)."
        )
    tail += ["", f"Total {time.perf_counter() - began:.0f} s."]
    print("\n".join(tail))
    results["targets"], results["seconds"] = dict(targets), time.perf_counter() - began
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"cpu{os.cpu_count()}-{env['device'].split()[0]}")
    stem = out / f"{datetime.date.today().isoformat()}-{machine}{'-quick' if args.quick else ''}"
    pathlib.Path(f"{stem}.md").write_text("\n".join(lines + tail) + "\n")
    pathlib.Path(f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
