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
    return nn.Dense(width, **_initializers(init, fan_in, "kernel_init", "bias_init"))


def _torch_uniform(fan_in: int):
    """PyTorch's default for Linear, Conv and GRU parameters: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _initializers(init: str, fan_in: int, *names: str) -> dict:
    """{name: PyTorch's uniform} for a layer's `names` ("kernel_init", ...) under init "torch"; else flax's."""
    return dict.fromkeys(names, _torch_uniform(fan_in)) if init == "torch" else {}


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


CONVS = ("auto", "patches", "native")  # a CNN's convolution: see conv_for_backend and PatchConv1D


def conv_for_backend(conv: str, backend: str | None = None) -> str:
    """ "auto" as the form that is fastest on `backend` (default: JAX's): patches on CPU, where XLA's convolution
    is slow for small 1-D shapes (about 5x here on MNIST-1D's CNN), the native convolution on GPU and TPU."""
    if conv != "auto":
        return conv
    return "patches" if (backend or jax.default_backend()) == "cpu" else "native"


class PatchConv1D(nn.Module):
    """A 1-D convolution as patch extraction and one matrix multiply: the same parameters ("kernel" [K, C_in,
    C_out], "bias" [C_out]), initialisers and outputs as `nn.Conv` with explicit padding (tested to 1e-5).

    The patches are K strided slices concatenated on the channel axis, so their gradient is K pads, not a
    scatter; the multiply is one [B*L_out, K*C_in] x [K*C_in, C_out] GEMM.
    """

    features: int
    kernel_size: int
    stride: int
    padding: int
    kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x_blc: jax.Array) -> jax.Array:
        k, c_in = self.kernel_size, x_blc.shape[-1]
        kernel_kio = self.param("kernel", self.kernel_init, (k, c_in, self.features))
        bias_o = self.param("bias", self.bias_init, (self.features,))
        padded_blc = jnp.pad(x_blc, ((0, 0), (self.padding, self.padding), (0, 0)))
        length_out = (padded_blc.shape[1] - k) // self.stride + 1
        span = self.stride * (length_out - 1) + 1
        patches_blkc = jnp.concatenate([padded_blc[:, j : j + span : self.stride] for j in range(k)], axis=-1)
        return patches_blkc @ kernel_kio.reshape(k * c_in, self.features) + bias_o


class CNN1D(nn.Module):
    """Stacked 1-D convolutions with ReLU, then a linear layer on the flattened features.

    `conv` picks the convolution's form, "native" (`nn.Conv`) or "patches" (`PatchConv1D`); both have the same
    parameter tree, so checkpoints move between them. `make_model` resolves "auto" per backend.
    """

    channels: Sequence[int]
    kernel_sizes: Sequence[int]
    strides: Sequence[int]
    padding: int
    num_classes: int
    initializer: str = "flax"  # or "torch": see `dense`
    conv: str = "native"  # or "patches"

    @nn.compact
    def __call__(self, x_bl: jax.Array) -> jax.Array:
        h = _as_sequence(x_bl, "cnn")  # [B, L, C]
        for i, (ch, k, s) in enumerate(zip(self.channels, self.kernel_sizes, self.strides, strict=True)):
            length = h.shape[1] + 2 * self.padding
            if k > length:  # the shapes are static: this raises while the model is traced, before any compile
                raise ValueError(
                    f"convolution {i} has kernel size {k}, longer than its input ({h.shape[1]} positions plus "
                    f"padding {self.padding} on each side). Use smaller model.kernel_sizes or strides, or fewer "
                    "convolutions."
                )
            inits = _initializers(self.initializer, h.shape[-1] * k, "kernel_init", "bias_init")
            if conv_for_backend(self.conv) == "patches":
                conv = PatchConv1D(ch, k, s, self.padding, name=f"Conv_{i}", **inits)
            else:
                conv = nn.Conv(
                    ch, (k,), strides=(s,), padding=[(self.padding, self.padding)], name=f"Conv_{i}", **inits
                )
            h = nn.relu(conv(h))
        h = h.reshape(h.shape[0], -1)
        return dense(self.num_classes, h.shape[-1], self.initializer)(h)


class TorchGRUCell(nn.RNNCellBase):
    """PyTorch's GRU cell (torch.nn.GRU's equations and parameters), for reproducing PyTorch recipes.

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise, n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    h' = (1 - z) * n + z * h. Unlike flax's GRUCell, both sides of every gate carry a bias: 6 bias vectors, so
    3 * H * (I + H + 2) parameters (162 for I=1, H=6, as PyTorch's). Under Adam this matters beyond the count:
    b_ir and b_hr get the same gradient and each takes its own Adam step, so the gates' biases move twice as fast
    as one bias would. Every weight and bias is uniform in +-1/sqrt(H), as PyTorch initialises them.
    """

    features: int

    @nn.compact
    def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        h_bh = carry
        init = _initializers("torch", self.features, "kernel_init", "bias_init")
        gates_x = nn.Dense(3 * self.features, name="input", **init)(inputs)  # [B, 3H]: r, z, n (PyTorch's order)
        gates_h = nn.Dense(3 * self.features, name="hidden", **init)(h_bh)  # [B, 3H]
        xr, xz, xn = jnp.split(gates_x, 3, axis=-1)
        hr, hz, hn = jnp.split(gates_h, 3, axis=-1)
        r = nn.sigmoid(xr + hr)
        z = nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h_bh = (1.0 - z) * n + z * h_bh
        return h_bh, h_bh

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        return jnp.zeros((*input_shape[:-1], self.features), jnp.float32)

    @property
    def num_feature_axes(self) -> int:
        return 1


class GRU1D(nn.Module):
    """A GRU over the sequence's time steps (both directions if `bidirectional`), then a linear layer on the
    outputs of every step, flattened: MNIST-1D's GRU ([B, 40] -> [B, 40, 1] -> [B, 40, 2 * hidden] -> [B, C]).
    Its cell is flax's GRUCell, or PyTorch's (`TorchGRUCell`) under initializer "torch"."""

    hidden: int
    bidirectional: bool
    num_classes: int
    initializer: str = "flax"  # or "torch": see `dense`

    @nn.compact
    def __call__(self, x_bl: jax.Array) -> jax.Array:
        h = _as_sequence(x_bl, "gru")  # [B, L, C]
        forward = nn.RNN(self._cell("forward"))
        if self.bidirectional:
            backward = nn.RNN(self._cell("backward"))
            h = nn.Bidirectional(forward, backward)(h)  # [B, L, 2H]: the backward outputs in input order
        else:
            h = forward(h)  # [B, L, H]
        h = h.reshape(h.shape[0], -1)
        return dense(self.num_classes, h.shape[-1], self.initializer)(h)

    def _cell(self, name: str) -> nn.RNNCellBase:
        """flax's GRUCell (150 parameters for H=6 on 1 input), or PyTorch's cell (162) under init "torch"."""
        if self.initializer == "torch":
            return TorchGRUCell(self.hidden, name=name)
        return nn.GRUCell(self.hidden, name=name)


class Transformer1L(nn.Module):
    """A one-layer transformer on token sequences that classifies from the last position, as Nanda et al. (2023)
    for grokking: token and position embeddings, one attention layer of `num_heads` heads, a ReLU MLP, no
    LayerNorm, an unembedding; causal attention; weights normal with std 1/sqrt(d_model) (unembedding:
    1/sqrt(num_classes)), biases only in the MLP, all as their reference code.

    Only the last position feeds the loss, and in one layer nothing reaches it from the other positions' outputs
    but their keys and values; so queries, the MLP and the unembedding run for the last position alone. The
    logits equal the full causal computation's at that position (tested), at a fraction of its cost.
    """

    vocab_size: int
    d_model: int
    num_heads: int
    d_mlp: int
    num_classes: int

    @nn.compact
    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        d, heads = self.d_model, self.num_heads
        d_head = d // heads
        normal = lambda std: nn.initializers.normal(stddev=std)
        w_embed = self.param("embed", normal(1 / math.sqrt(d)), (self.vocab_size, d))
        if not jnp.issubdtype(tokens_bt.dtype, jnp.integer) or tokens_bt.ndim != 2:
            raise ValueError(
                f"model.name=transformer takes integer token sequences [length] per example; got "
                f"{tokens_bt.dtype} of shape {tokens_bt.shape[1:]}. Use a token dataset such as modular_addition."
            )
        w_pos = self.param("pos_embed", normal(1 / math.sqrt(d)), (tokens_bt.shape[1], d))
        w_q = self.param("query", normal(1 / math.sqrt(d)), (d, heads, d_head))
        w_k = self.param("key", normal(1 / math.sqrt(d)), (d, heads, d_head))
        w_v = self.param("value", normal(1 / math.sqrt(d)), (d, heads, d_head))
        w_o = self.param("out", normal(1 / math.sqrt(d)), (heads, d_head, d))
        w_in = self.param("mlp_in", normal(1 / math.sqrt(d)), (d, self.d_mlp))
        b_in = self.param("mlp_in_bias", nn.initializers.zeros, (self.d_mlp,))
        w_out = self.param("mlp_out", normal(1 / math.sqrt(d)), (self.d_mlp, d))
        b_out = self.param("mlp_out_bias", nn.initializers.zeros, (d,))
        w_unembed = self.param("unembed", normal(1 / math.sqrt(self.num_classes)), (d, self.num_classes))

        # Queries, keys and values depend only on (token, position): project the vocabulary's [V, T] table once
        # per step and gather rows, rather than project every example's tokens (fewer FLOPs for V*T < N*T).
        table_vtd = w_embed[:, None, :] + w_pos[None, :, :]
        k_vthk = jnp.einsum("vtd,dhk->vthk", table_vtd, w_k)
        v_vthk = jnp.einsum("vtd,dhk->vthk", table_vtd, w_v)
        q_vhk = jnp.einsum("vd,dhk->vhk", table_vtd[:, -1], w_q)  # only the last position's queries are used
        positions_t = jnp.arange(tokens_bt.shape[1])
        k_bthk, v_bthk = k_vthk[tokens_bt, positions_t], v_vthk[tokens_bt, positions_t]
        last_b = tokens_bt[:, -1]
        scores_bht = jnp.einsum("bhk,bthk->bht", q_vhk[last_b], k_bthk) / math.sqrt(d_head)  # the last sees all
        attn_bhk = jnp.einsum("bht,bthk->bhk", jax.nn.softmax(scores_bht, axis=-1), v_bthk)
        last_bd = table_vtd[last_b, -1] + jnp.einsum("bhk,hkd->bd", attn_bhk, w_o)
        last_bd = last_bd + nn.relu(last_bd @ w_in + b_in) @ w_out + b_out
        return last_bd @ w_unembed


def _mlp(m: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    return MLP(tuple(int(h) for h in m.hidden_sizes), num_classes, residual=bool(m.residual), initializer=m.init)


def _cnn(m: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    return CNN1D(
        tuple(m.channels),
        tuple(m.kernel_sizes),
        tuple(m.strides),
        int(m.padding),
        num_classes,
        initializer=m.init,
        conv=conv_for_backend(m.conv),
    )


def _gru(m: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    return GRU1D(int(m.gru_hidden), bool(m.bidirectional), num_classes, initializer=m.init)


def _transformer(m: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    vocab = int(m.vocab_size) or num_classes + 1  # default: the classes and one separator (modular_addition)
    return Transformer1L(vocab, int(m.d_model), int(m.num_heads), int(m.d_mlp), num_classes)


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "gru": _gru, "transformer": _transformer}
MODELS = tuple(_BUILDERS)  # the names make_model builds (config.model.name)


def make_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    if model_config.name not in _BUILDERS:
        names = f"{', '.join(MODELS[:-1])} or {MODELS[-1]}"
        raise ValueError(f'Unknown model "{model_config.name}"; use {names}.')
    return _BUILDERS[model_config.name](model_config, num_classes)


def init_params(model: nn.Module, key: jax.Array, example_x: jax.Array):
    return model.init(key, jnp.asarray(example_x[:1]))["params"]
