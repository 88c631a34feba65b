"""Models (flax linen): an MLP (no hidden layers is logistic regression) and a 1-D CNN for sequences."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


class MLP(nn.Module):
    hidden_sizes: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x_bf: jax.Array) -> jax.Array:
        h = x_bf.reshape(x_bf.shape[0], -1)
        for width in self.hidden_sizes:
            h = nn.relu(nn.Dense(width)(h))
        return nn.Dense(self.num_classes)(h)


class CNN1D(nn.Module):
    """Stacked 1-D convolutions with ReLU, then a linear layer on the flattened features."""

    channels: Sequence[int]
    kernel_sizes: Sequence[int]
    strides: Sequence[int]
    padding: int
    num_classes: int

    @nn.compact
    def __call__(self, x_bl: jax.Array) -> jax.Array:
        if x_bl.ndim not in (2, 3):
            raise ValueError(
                f"model.name=cnn takes sequences of shape [length] or [length, channels] per example; "
                f"got {x_bl.shape[1:]}. Use model.name=mlp for this input."
            )
        h = x_bl[..., None] if x_bl.ndim == 2 else x_bl  # [B, L, C]
        for ch, k, s in zip(self.channels, self.kernel_sizes, self.strides, strict=True):
            h = nn.relu(nn.Conv(ch, (k,), strides=(s,), padding=[(self.padding, self.padding)])(h))
        return nn.Dense(self.num_classes)(h.reshape(h.shape[0], -1))


def make_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    m = model_config
    if m.name == "mlp":
        return MLP(tuple(int(h) for h in m.hidden_sizes), num_classes)
    if m.name == "cnn":
        return CNN1D(tuple(m.channels), tuple(m.kernel_sizes), tuple(m.strides), int(m.padding), num_classes)
    raise ValueError(f'Unknown model "{m.name}"; use mlp or cnn.')


def init_params(model: nn.Module, key: jax.Array, example_x: jax.Array):
    return model.init(key, jnp.asarray(example_x[:1]))["params"]
