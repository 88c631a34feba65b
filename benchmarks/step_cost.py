"""Per-step cost of a jaxepochs epoch against a bare, hand-written `lax.scan` of the same step, in one process.

    python benchmarks/step_cost.py            # or: make bench

Workloads: the MNIST-1D MLP (40-100-100-10, batch 100, Adam 1e-2) and logistic regression on the 8x8 digits at
batch size 1 (the per-step overhead case). Contenders, same model, data, optimizer and step count:
  - bare: the training set pre-batched once on the host, `lax.scan` of forward/backward/Adam over it, one jitted
    call per epoch; nothing else (no shuffle, no masking, no metrics). Our limit.
  - jaxepochs epoch: `jaxepochs.core.epoch.train_epoch` compiled (on-device shuffle, padding mask, metric sums).
  - jaxepochs run: `train_and_evaluate` as a user runs it (validation pass and logging each epoch), steady
    state taken from its metrics.jsonl `train_seconds` after the first epoch.
  - python loop: a jitted step called from Python once per batch.
Prints steps/s (median of repetitions after warm-up) and the ratio to the bare scan.
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxepochs import models
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import task as task_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import run as train


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, overrides: dict[str, str], repeats: int, epochs_per_repeat: int) -> list[tuple]:
    config = config_lib.apply_overrides(config_lib.base_config(), overrides)
    dataset = data_lib.load_dataset(config)
    batch_size = config.train.batch_size
    x_n, y_n = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
    n = x_n.shape[0]
    steps = epoch_lib.steps_per_epoch(n, batch_size)
    model = models.make_model(config.model, dataset.num_classes)
    tx = optax.adam(config.optimizer.learning_rate)
    params = models.init_params(model, jax.random.key(0), dataset.train.x)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    rows = []

    # bare: whole batches only (the limit cannot be beaten by skipping work, so it uses the same step count).
    usable = (n // batch_size) * batch_size
    x_sbf = x_n[:usable].reshape(n // batch_size, batch_size, *x_n.shape[1:])
    y_sb = y_n[:usable].reshape(n // batch_size, batch_size)
    bare_steps = n // batch_size

    def bare_step(carry, batch):
        p, o = carry
        xb, yb = batch
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, xb), yb).mean())(p)
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), None

    @jax.jit
    def bare_epoch(p, o):
        (p, o), _ = jax.lax.scan(bare_step, (p, o), (x_sbf, y_sb))
        return p, o

    carry = [(params, tx.init(params))]

    def run_bare():
        for _ in range(epochs_per_repeat):
            carry[0] = bare_epoch(*carry[0])
        jax.block_until_ready(carry[0])

    bare_s = _median_seconds(run_bare, repeats) / (epochs_per_repeat * bare_steps)
    rows.append((name, "bare lax.scan (limit)", 1 / bare_s, 1.0))

    state = epoch_lib.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.key(1))
    task = task_lib.make_task(task_lib.linen_apply(model))
    epoch = functools.partial(epoch_lib.train_epoch, task=task, tx=tx, batch_size=batch_size)
    epoch_fn = jax.jit(lambda state, x, y, e: epoch(state, {"x": x, "y": y}, e))
    holder = [state]
    counter = [0]

    def run_epochs():
        for _ in range(epochs_per_repeat):
            counter[0] += 1
            holder[0], _ = epoch_fn(holder[0], x_n, y_n, jnp.asarray(counter[0], jnp.int32))
        jax.block_until_ready(holder[0])

    ours_s = _median_seconds(run_epochs, repeats) / (epochs_per_repeat * steps)
    rows.append((name, "jaxepochs train_epoch", 1 / ours_s, bare_s / ours_s))

    with tempfile.TemporaryDirectory() as workdir:
        run_config = config_lib.apply_overrides(config, {"train.epochs": str(epochs_per_repeat * 3)})
        result = train.train_and_evaluate(run_config, workdir, quiet=True)
        per_step = statistics.median(row["train_seconds"] for row in result.history[1:]) / steps
        per_epoch_host = statistics.median(row["seconds"] - row["train_seconds"] for row in result.history[1:])
        rows.append((name, "jaxepochs train_and_evaluate", 1 / per_step, bare_s / per_step))
        print(f"# {name}: host+validation time per epoch outside the training pass: {per_epoch_host * 1e3:.2f} ms")

    step_fn = jax.jit(lambda c, b: bare_step(c, b)[0])
    loop_carry = [(params, tx.init(params))]

    def run_loop():
        for i in range(bare_steps):
            loop_carry[0] = step_fn(loop_carry[0], (x_sbf[i], y_sb[i]))
        jax.block_until_ready(loop_carry[0])

    loop_s = _median_seconds(run_loop, max(1, repeats // 2)) / bare_steps
    rows.append((name, "python loop over jitted step", 1 / loop_s, bare_s / loop_s))
    return rows


def main() -> int:
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    rows = []
    rows += bench("mnist1d mlp, batch 100", {"train.batch_size": "100"}, repeats=7, epochs_per_repeat=20)
    rows += bench(
        "digits logreg, batch 1",
        {"data.name": "digits", "model.hidden_sizes": "()", "train.batch_size": "1"},
        repeats=5,
        epochs_per_repeat=2,
    )
    print(f"{'workload':26} {'contender':32} {'steps/s':>10} {'us/step':>9} {'vs bare':>8}")
    for name, contender, steps_per_s, ratio in rows:
        print(f"{name:26} {contender:32} {steps_per_s:10.0f} {1e6 / steps_per_s:9.2f} {ratio:8.2f}x")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
