"""Where a jaxepochs training epoch spends its time beyond the bare scan: one piece changed at a time, in one process.

    python benchmarks/step_profile.py [--experiment experiments/digits_logreg.py] [--rounds 7]

Each variant is the compiled training epoch of the experiment's model and data, timed in interleaved rounds
(the median of 9 calls per round; the table gives the best round, the least disturbed by other processes):
  - jaxepochs: `core.epoch.train_epoch` as shipped (on-device shuffle, the split permuted whole or gathered per
    batch, the loss and its metric sums, core/optim.py's optimizer with the epoch schedule);
  - no accuracy sum: the same without counting the correct predictions;
  - gather per batch / permute whole: the other of the two ways to take the epoch's batches;
  - optax's optimizer: `optax.adam`/`optax.sgd` at a constant rate instead of core/optim.py's;
  - optax inject_hyperparams: the optimizer jaxepochs used before (`optax.inject_hyperparams` over the optimizer);
  - no shuffle: batches in order (sliced);
  - bare: the same step over pre-batched arrays, optax's loss and optimizer, no metrics (peers.py's limit).
The differences between rows are the costs of the pieces, per step: at batch size 1 each op in the loop body
has a fixed cost on CPU, so the per-step overhead shows there first.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxepochs import models
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import optim
from jaxepochs.core import task as task_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import setup


def _bare(apply_fn, tx, xs, ys):
    def step(carry, batch):
        params, opt_state, loss_sum = carry
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, batch[0]), batch[1]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, loss_sum + loss), None

    return lambda params, opt_state: jax.lax.scan(step, (params, opt_state, 0.0), (xs, ys))[0]


def variants(config, dataset) -> dict:
    x, y = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
    n, batch_size = x.shape[0], config.train.batch_size
    steps = epoch_lib.steps_per_epoch(n, batch_size)
    model = models.make_model(config.model, dataset.num_classes)
    apply_fn = lambda params, x_b: model.apply({"params": params}, x_b)
    task = task_lib.make_task(task_lib.linen_apply(model))
    no_accuracy = task._replace(metrics=lambda outputs, batch: {})
    ours = optim.make_optimizer(config.optimizer.to_dict(), steps, config.train.epochs)
    rate = config.optimizer.learning_rate
    plain = optax.adam(rate) if config.optimizer.name == "adam" else optax.sgd(rate)
    optax_optimizer = optax.adam if config.optimizer.name == "adam" else optax.sgd
    injected = optax.inject_hyperparams(optax_optimizer)(learning_rate=rate)
    states = {tx: setup.init_state(model, tx, config.seed, dataset.train.x) for tx in (ours, plain, injected)}
    whole = batch_size > 1 and x.size * x.dtype.itemsize <= epoch_lib.PERMUTE_WHOLE_BYTES
    data = {"x": x, "y": y}

    def epoch(tx, task=task, **kwargs):
        return functools.partial(epoch_lib.train_epoch, task=task, tx=tx, batch_size=batch_size, **kwargs)

    args = lambda tx: (states[tx], data, jnp.int32(1))
    cut = (n // batch_size) * batch_size
    xs, ys = x[:cut].reshape(n // batch_size, batch_size, *x.shape[1:]), y[:cut].reshape(n // batch_size, batch_size)
    return {
        "jaxepochs train_epoch": (epoch(ours), args(ours)),
        "  no accuracy sum": (epoch(ours, task=no_accuracy), args(ours)),
        "  permute whole" if not whole else "  gather per batch": (epoch(ours, permute_whole=not whole), args(ours)),
        "  optax's optimizer": (epoch(plain), args(plain)),
        "  optax inject_hyperparams (before)": (epoch(injected), args(injected)),
        "  no shuffle": (epoch(ours, shuffle=False), args(ours)),
        "bare scan (pre-batched)": (_bare(apply_fn, plain, xs, ys), (states[plain].params, states[plain].opt_state)),
    }, steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="experiments/digits_logreg.py")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = config_lib.load_config_file(args.experiment)
    dataset = data_lib.load_dataset(config, True)
    table, steps = variants(config, dataset)
    compiled = {name: jax.jit(fn).lower(*fn_args).compile() for name, (fn, fn_args) in table.items()}
    best = {name: float("inf") for name in table}
    for _ in range(args.rounds):
        for name, fn in compiled.items():
            fn_args = table[name][1]
            jax.block_until_ready(fn(*fn_args))
            times = []
            for _ in range(9):
                start = time.perf_counter()
                jax.block_until_ready(fn(*fn_args))
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], statistics.median(times))
    n, batch = dataset.train.y.shape[0], config.train.batch_size
    print(f"{args.experiment}: {n} examples, batch {batch}, {steps} steps per epoch ({jax.devices()[0].platform})")
    print("| variant | ms per epoch | us per step | vs bare |")
    print("|---|---|---|---|")
    for name, seconds in best.items():
        ratio = best["bare scan (pre-batched)"] / seconds
        print(f"| {name} | {1e3 * seconds:.3f} | {1e6 * seconds / steps:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
