"""Proben1's conventions (Prechelt 1994, "PROBEN1 - a set of neural network benchmark problems"), for problems
built here from other data: its split, and its error measure as a classifier's metrics.

    def get_data(config):
        return proben1.split(x, y)                  # 50/25/25, standardised by the training half
    metrics_fn = proben1.classifier_metrics       # accuracy and sqerr, Proben1's squared error percentage
"""

from __future__ import annotations

import numpy as np


def split(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """`get_data`'s dict for arrays split as Proben1 splits its problems: half for training, a quarter each for
    validation and test, in a seeded random order, inputs standardised by the training half's mean and spread (a
    feature constant there is only centred, so a rare value elsewhere is not blown up by a zero spread)."""
    order = np.random.default_rng(seed).permutation(len(y))
    train, val, test = np.split(order, [len(y) // 2, 3 * len(y) // 4])
    mean, std = x[train].mean(0), x[train].std(0)
    std = np.where(std > 0, std, 1.0)  # a feature constant in training (a digit's corner pixel): only centred
    part = lambda idx: {"x": ((x[idx] - mean) / std).astype(np.float32), "y": y[idx]}
    return {"train": part(train), "validation": part(val), "test": part(test)}


def classifier_metrics(logits_bc, batch) -> dict:
    """A classifier's metrics_fn: accuracy, and "sqerr", Proben1's squared error percentage per example: 100 times
    the mean over the C output units of (softmax output - one-hot target)**2 (outputs in [0, 1], so Prechelt's
    (o_max - o_min) factor is 1). Prechelt's criteria and test errors are on this measure; it stays bounded where
    the cross-entropy of an overconfident network grows without end."""
    import jax
    import jax.numpy as jnp

    labels_b = batch["y"]
    target_bc = jax.nn.one_hot(labels_b, logits_bc.shape[-1])
    sqerr_b = 100.0 * jnp.mean((jax.nn.softmax(logits_bc) - target_bc) ** 2, axis=-1)
    return {"accuracy": (jnp.argmax(logits_bc, -1) == labels_b).astype(jnp.float32), "sqerr": sqerr_b}
