"""Models (flax linen): an MLP (no hidden layers is logistic regression), a 1-D CNN and a GRU for sequences.

These are MNIST-1D's reference models (greydanus/mnist1d, notebooks/models.py): the MLP with `residual=True`,
the CNN and the bidirectional GRU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


INITS = ("flax", "torch")


def dense(width: int, fan_in: int, init: str) -> nn.Dense:
    """A Dense layer initialised as flax does (LeCun normal weights, zero biases) or as PyTorch's nn.Linear
    (weights and biases uniform in +-1/sqrt(fan_in)), for reproducing PyTorch recipes whose dynamics depend
    on the initial scale (double descent, say)."""
    if init == "flax":
        return nn.Dense(width)
    bound = 1.0 / math.sqrt(fan_in)
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.Dense(width, kernel_init=uniform, bias_init=uniform)


class MLP(nn.Module):
    """Dense layers with ReLU, then a linear layer; parameters Dense_0, Dense_1, ... in order.

    With `residual`, every hidden layer after the first whose width equals its input's adds that input,
    h = h + relu(W h + b), as MNIST-1D's MLP; a layer that changes the width has no residual.
    """

    hidden_sizes: Sequence[int]
    num_classes: int
    residual: bool = False
    initializer: str = "flax"  # or "torch": see `dense`

    @nn.compact
    def __call__(self, x_bf: jax.Array) -> jax.Array:
        h = x_bf.reshape(x_bf.shape[0], -1)
        for i, width in enumerate(self.hidden_sizes):
            out = nn.relu(dense(width, h.shape[-1], self.initializer)(h))
            h = h + out if self.residual and i > 0 and h.shape[-1] == width else out
        return dense(self.num_classes, h.shape[-1], self.initializer)(h)


def _as_sequence(x_bl: jax.Array, model_name: str) -> jax.Array:
    """[B, L] or [B, L, C] as [B, L, C]; a clear error for other inputs (images, say)."""
    if x_bl.ndim not in (2, 3):
        raise ValueError(
            f"model.name={model_name} takes sequences of shape [length] or [length, channels] per example; "
            f"got {x_bl.shape[1:]}. Use model.name=mlp for this input."
        )
    return x_bl[..., None] if x_bl.ndim == 2 else x_bl


class CNN1D(nn.Module):
    """Stacked 1-D convolutions with ReLU, then a linear layer on the flattened features."""

    channels: Sequence[int]
    kernel_sizes: Sequence[int]
    strides: Sequence[int]
    padding: int
    num_classes: int

    @nn.compact
    def __call__(self, x_bl: jax.Array) -> jax.Array:
        h = _as_sequence(x_bl, "cnn")  # [B, L, C]
        for ch, k, s in zip(self.channels, self.kernel_sizes, self.strides, strict=True):
            h = nn.relu(nn.Conv(ch, (k,), strides=(s,), padding=[(self.padding, self.padding)])(h))
        return nn.Dense(self.num_classes)(h.reshape(h.shape[0], -1))


class GRU1D(nn.Module):
    """A GRU over the sequence's time steps (both directions if `bidirectional`), then a linear layer on the
    outputs of every step, flattened: MNIST-1D's GRU ([B, 40] -> [B, 40, 1] -> [B, 40, 2 * hidden] -> [B, C])."""

    hidden: int
    bidirectional: bool
    num_classes: int

    @nn.compact
    def __call__(self, x_bl: jax.Array) -> jax.Array:
        h = _as_sequence(x_bl, "gru")  # [B, L, C]
        forward = nn.RNN(nn.GRUCell(self.hidden, name="forward"))
        if self.bidirectional:
            backward = nn.RNN(nn.GRUCell(self.hidden, name="backward"))
            h = nn.Bidirectional(forward, backward)(h)  # [B, L, 2H]: the backward outputs in input order
        else:
            h = forward(h)  # [B, L, H]
        return nn.Dense(self.num_classes)(h.reshape(h.shape[0], -1))


def make_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    m = model_config
    if m.name == "mlp":
        return MLP(tuple(int(h) for h in m.hidden_sizes), num_classes, residual=bool(m.residual), initializer=m.init)
    if m.name == "cnn":
        return CNN1D(tuple(m.channels), tuple(m.kernel_sizes), tuple(m.strides), int(m.padding), num_classes)
    if m.name == "gru":
        return GRU1D(int(m.gru_hidden), bool(m.bidirectional), num_classes)
    raise ValueError(f'Unknown model "{m.name}"; use mlp, cnn or gru.')


def init_params(model: nn.Module, key: jax.Array, example_x: jax.Array):
    return model.init(key, jnp.asarray(example_x[:1]))["params"]
