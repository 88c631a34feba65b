"""Where a jaxepochs epoch spends its time beyond the bare scan: one piece removed at a time, in one process.

    python benchmarks/step_profile.py [--experiment experiments/digits_logreg.py] [--rounds 9]

Each variant is the compiled training epoch of the experiment's model and data, timed in interleaved rounds
(the median of 11 calls per round; the table gives the best round, the least disturbed by other processes):
  - jaxepochs: `epoch.train_epoch` as shipped (on-device shuffle, gather per batch, metric sums, the epoch
    schedule inside `optax.inject_hyperparams`, a partial last batch masked);
  - no metrics: the same without the loss and accuracy sums;
  - plain optimizer: the same with `optax.adam`/`optax.sgd` at a constant rate instead of the injected schedule;
  - no shuffle: batches in order (still gathered per batch);
  - bare: the same step over pre-batched arrays, plain optimizer, no metrics (benchmarks/peers.py's limit).
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
from jaxepochs.core import optim as schedules
from jaxepochs.data import loading as data_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import setup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="experiments/digits_logreg.py")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    config = config_lib.load_config_file(args.experiment)
    dataset = data_lib.load_dataset(config, True)
    x_nf, y_n = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
    batch_size, n = config.train.batch_size, x_nf.shape[0]
    steps = epoch_lib.steps_per_epoch(n, batch_size)
    model = models.make_model(config.model, dataset.num_classes)
    apply_fn = lambda params, x: model.apply({"params": params}, x)
    scheduled = schedules.make_optimizer(config.optimizer, steps, config.train.epochs)
    rate = config.optimizer.learning_rate
    plain = optax.adam(rate) if config.optimizer.name == "adam" else optax.sgd(rate)
    epoch = jnp.int32(1)

    def without_metrics(state, x, y, epoch, tx, shuffle=True):
        idx_sb, _ = epoch_lib.batch_indices(jax.random.fold_in(state.key, 0), epoch, n, batch_size, shuffle)

        def body(state, idx_b):
            grads = jax.grad(
                lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x[idx_b]), y[idx_b]).mean()
            )(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), None

        state, _ = jax.lax.scan(body, state, idx_sb[: n // batch_size], unroll=epoch_lib.SCAN_UNROLL)
        return state

    whole = (n // batch_size) * batch_size
    x_sbf = x_nf[:whole].reshape(n // batch_size, batch_size, *x_nf.shape[1:])
    y_sb = y_n[:whole].reshape(n // batch_size, batch_size)

    def bare(params, opt_state, tx):
        def body(carry, batch):
            params, opt_state = carry
            grads = jax.grad(
                lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, batch[0]), batch[1]).mean()
            )(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(body, (params, opt_state), (x_sbf, y_sb))[0]

    state = setup.init_state(model, scheduled, config.seed, dataset.train.x)
    plain_state = setup.init_state(model, plain, config.seed, dataset.train.x)
    shipped = functools.partial(epoch_lib.train_epoch, apply_fn=apply_fn, batch_size=batch_size)
    variants = {
        "jaxepochs train_epoch": (functools.partial(shipped, tx=scheduled), (state, x_nf, y_n, epoch)),
        "  no metrics": (functools.partial(without_metrics, tx=scheduled), (state, x_nf, y_n, epoch)),
        "  no metrics, plain optimizer": (
            functools.partial(without_metrics, tx=plain),
            (plain_state, x_nf, y_n, epoch),
        ),
        "  ... and no shuffle": (
            functools.partial(without_metrics, tx=plain, shuffle=False),
            (plain_state, x_nf, y_n, epoch),
        ),
        "bare scan (pre-batched)": (functools.partial(bare, tx=plain), (plain_state.params, plain_state.opt_state)),
    }
    compiled = {name: jax.jit(fn).lower(*fn_args).compile() for name, (fn, fn_args) in variants.items()}
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, fn in compiled.items():
            fn_args = variants[name][1]
            jax.block_until_ready(fn(*fn_args))
            times = []
            for _ in range(11):
                start = time.perf_counter()
                jax.block_until_ready(fn(*fn_args))
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], statistics.median(times))
    print(f"{args.experiment}: {n} examples, batch {batch_size}, {steps} steps per epoch ({jax.devices()[0].platform})")
    print("| variant | ms per epoch | us per step | vs bare |")
    print("|---|---|---|---|")
    for name, seconds in best.items():
        ratio = best["bare scan (pre-batched)"] / seconds
        print(f"| {name} | {1e3 * seconds:.3f} | {1e6 * seconds / steps:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
