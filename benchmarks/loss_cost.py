"""What jaxepochs' cross-entropy costs against optax's, in one process: a jitted `lax.scan` of SGD steps of a
linear classifier, once with each loss, timed in interleaved rounds.

    python benchmarks/loss_cost.py [--rounds 15]

At batch size 1 the loss is most of the step, so a difference shows there first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxepochs.core import task as task_lib

STEPS = 1400


def make_epoch(loss_fn, x_sbd, y_sb):
    def epoch(w_dc):
        def body(w_dc, batch):
            x_bd, y_b = batch
            grads = jax.grad(lambda w: loss_fn(x_bd @ w, y_b).mean())(w_dc)
            return w_dc - 0.01 * grads, None

        return jax.lax.scan(body, w_dc, (x_sbd, y_sb))[0]

    return jax.jit(epoch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].platform}; us per step, best round / median round")
    print("| batch x features -> classes | optax | jaxepochs | ratio (median) |")
    print("|---|---|---|---|")
    for batch, features, classes in [(1, 64, 10), (100, 100, 10)]:
        x_sbd = jnp.asarray(rng.normal(size=(STEPS, batch, features)), jnp.float32)
        y_sb = jnp.asarray(rng.integers(0, classes, (STEPS, batch)))
        w_dc = jnp.zeros((features, classes))
        losses = {"optax": optax.softmax_cross_entropy_with_integer_labels, "jaxepochs": task_lib.cross_entropy}
        epochs = {name: make_epoch(fn, x_sbd, y_sb) for name, fn in losses.items()}
        for epoch in epochs.values():
            jax.block_until_ready(epoch(w_dc))
        seconds = {name: [] for name in epochs}
        for _ in range(args.rounds):
            for name, epoch in epochs.items():
                start = time.perf_counter()
                jax.block_until_ready(epoch(w_dc))
                seconds[name].append((time.perf_counter() - start) / STEPS * 1e6)
        cells = [f"{min(s):.2f} / {statistics.median(s):.2f}" for s in seconds.values()]
        ratio = statistics.median(seconds["optax"]) / statistics.median(seconds["jaxepochs"])
        print(f"| {batch} x {features} -> {classes} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
