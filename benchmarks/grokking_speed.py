"""Seconds per epoch of the full grokking setting (p = 113, full batch of 3,830 pairs, one-layer transformer).

  python benchmarks/grokking_speed.py [--epochs 300]

- plain: every position through the causal transformer, one jitted epoch per call, the test split
  evaluated every epoch (what a straightforward implementation does);
- jaxepochs, 1 epoch per call: `Transformer1L` (queries, MLP and unembedding for the last position only,
  keys/values from a per-token table), test every epoch;
- jaxepochs as shipped: 500 epochs per call, test every 10 epochs (experiments/grokking_modular_addition.py).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import jax
import jax.numpy as jnp

import jaxepochs
from jaxepochs import models
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import optim as schedules
from jaxepochs.core import task as task_lib
from jaxepochs.data import loading as data_lib
from jaxepochs.host import config as config_lib
from jaxepochs.host import setup


def full_causal(p, tokens_bt):
    """Logits at the last position of the causal one-layer transformer, every position computed."""
    h = p["embed"][tokens_bt] + p["pos_embed"]
    q, k, v = (jnp.einsum("btd,dhk->bthk", h, p[name]) for name in ("query", "key", "value"))
    scores = jnp.einsum("bshk,bthk->bhst", q, k) / math.sqrt(q.shape[-1])
    t = tokens_bt.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    h = h + jnp.einsum("bshk,hkd->bsd", jnp.einsum("bhst,bthk->bshk", jax.nn.softmax(scores, -1), v), p["out"])
    h = h + jax.nn.relu(h @ p["mlp_in"] + p["mlp_in_bias"]) @ p["mlp_out"] + p["mlp_out_bias"]
    return (h @ p["unembed"])[:, -1]


def plain_seconds_per_epoch(config, epochs: int) -> float:
    dataset = data_lib.load_dataset(config, quiet=True)
    model = models.make_model(config.model, dataset.num_classes)
    tx = schedules.make_optimizer(config.optimizer, 1, config.train.epochs)
    state = setup.init_state(model, tx, 0, dataset.train.x)
    x, y = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
    xt, yt = jnp.asarray(dataset.test.x), jnp.asarray(dataset.test.y)
    task = task_lib.make_task(lambda params, model_state, x_b, key, train: (full_causal(params, x_b), model_state))
    data, held_out = {"x": x, "y": y}, {"x": xt, "y": yt}
    step = jax.jit(lambda s, e: epoch_lib.train_epoch(s, data, e, task=task, tx=tx, batch_size=x.shape[0]))
    test = jax.jit(lambda p: epoch_lib.eval_epoch(p, None, held_out, task=task, batch_size=xt.shape[0]))
    state, _ = step(state, 1)
    jax.block_until_ready(test(state.params))
    start = time.perf_counter()
    for e in range(2, epochs + 2):
        state, metrics = step(state, e)
        jax.device_get((metrics, test(state.params)))
    return (time.perf_counter() - start) / epochs


def jaxepochs_seconds_per_epoch(config, overrides: dict, epochs: int) -> float:
    config = config_lib.apply_overrides(config, {**overrides, "train.epochs": str(epochs)})
    with tempfile.TemporaryDirectory() as tmp:
        result = jaxepochs.train_and_evaluate(config, tmp, quiet=True)
    return result.summary["train_seconds"] / epochs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    config = config_lib.load_config_file("experiments/grokking_modular_addition.py")
    plain = plain_seconds_per_epoch(config, args.epochs)
    one = jaxepochs_seconds_per_epoch(config, {"train.epochs_per_call": "1", "train.test_every": "1"}, args.epochs)
    shipped = jaxepochs_seconds_per_epoch(config, {}, max(args.epochs, 500))
    print(f"device: {jax.devices()[0].platform}; seconds per epoch (15,000 epochs in minutes)")
    for name, seconds in (("plain", plain), ("jaxepochs, 1 epoch/call, test every epoch", one), ("shipped", shipped)):
        print(f"| {name} | {seconds * 1e3:.1f} ms | {seconds * 15000 / 60:.1f} min | {plain / seconds:.2f}x |")


if __name__ == "__main__":
    main()
