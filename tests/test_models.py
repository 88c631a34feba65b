"""MNIST-1D's reference models: the residual MLP and the (bidirectional) GRU."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import tiny_config

import jaxepochs
from jaxepochs import models
from jaxepochs.core import epoch as epoch_lib
from jaxepochs.core import task as task_lib
from jaxepochs.host import config as config_lib


def n_params(params) -> int:
    return sum(int(a.size) for a in jax.tree_util.tree_leaves(params))


def init(model, x):
    return models.init_params(model, jax.random.PRNGKey(0), x)


def test_residual_mlp_matches_hand_computation():
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 40))
    model = models.MLP((100, 100), 10, residual=True)
    p = init(model, x)
    assert set(p) == {"Dense_0", "Dense_1", "Dense_2"}
    w = [(p[f"Dense_{i}"]["kernel"], p[f"Dense_{i}"]["bias"]) for i in range(3)]
    h1 = jax.nn.relu(x @ w[0][0] + w[0][1])
    h2 = h1 + jax.nn.relu(h1 @ w[1][0] + w[1][1])
    expected = h2 @ w[2][0] + w[2][1]
    np.testing.assert_allclose(model.apply({"params": p}, x), expected, atol=1e-5, rtol=1e-5)
    assert n_params(p) == 15_210  # 40*100+100 + 100*100+100 + 100*10+10


def test_residual_false_is_the_plain_mlp():
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 40))
    plain = models.MLP((100, 100), 10)
    p = init(plain, x)
    w = [(p[f"Dense_{i}"]["kernel"], p[f"Dense_{i}"]["bias"]) for i in range(3)]
    h1 = jax.nn.relu(x @ w[0][0] + w[0][1])
    h2 = jax.nn.relu(h1 @ w[1][0] + w[1][1])
    np.testing.assert_allclose(plain.apply({"params": p}, x), h2 @ w[2][0] + w[2][1], atol=1e-5, rtol=1e-5)
    # Same parameter tree either way (checkpoints carry over); the outputs differ.
    residual = models.MLP((100, 100), 10, residual=True)
    assert jax.tree_util.tree_structure(init(residual, x)) == jax.tree_util.tree_structure(p)
    assert not np.allclose(residual.apply({"params": p}, x), plain.apply({"params": p}, x))


def test_residual_skips_layers_that_change_width():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 40))
    p = init(models.MLP((100, 50), 10), x)
    out_plain = models.MLP((100, 50), 10).apply({"params": p}, x)
    out_residual = models.MLP((100, 50), 10, residual=True).apply({"params": p}, x)
    np.testing.assert_allclose(out_residual, out_plain)


def test_make_model_builds_each_and_rejects_unknown_names():
    m = jaxepochs.base_config().model
    m.residual = True
    assert models.make_model(m, 10) == models.MLP((100, 100), 10, residual=True)
    m.name = "gru"
    assert models.make_model(m, 10) == models.GRU1D(6, True, 10)
    with pytest.raises(ValueError, match='Unknown model "lstm"'):
        models.make_model(ml_collections.ConfigDict({"name": "lstm"}), 10)


# flax's GRUCell(H) on I inputs: input kernels ir, iz, in [I, H] each with a bias [H], hidden kernels hr, hz
# [H, H] without bias and hn [H, H] with a bias [H]: 3*I*H + 3*H + 3*H*H + H. I=1, H=6: 18 + 18 + 108 + 6 = 150.
# (PyTorch's GRU, model.init "torch", has 6 bias vectors: 162.)
# Bidirectional: 2 cells + Dense(40*2*6 = 480 -> 10) = 300 + 4810.
GRU_CELL_PARAMS = 3 * 1 * 6 + 3 * 6 + 3 * 6 * 6 + 6
GRU_BIDIRECTIONAL_PARAMS = 2 * GRU_CELL_PARAMS + 480 * 10 + 10  # 5110
GRU_FORWARD_PARAMS = GRU_CELL_PARAMS + 240 * 10 + 10  # 2560


def test_gru_parameters_and_output_shape():
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 40))
    model = models.GRU1D(6, True, 10)
    p = init(model, x)
    assert GRU_BIDIRECTIONAL_PARAMS == 5110
    assert n_params(p) == GRU_BIDIRECTIONAL_PARAMS
    assert p["Dense_0"]["kernel"].shape == (480, 10)
    assert model.apply({"params": p}, x).shape == (7, 10)

    one_way = models.GRU1D(6, False, 10)
    p1 = init(one_way, x)
    assert p1["Dense_0"]["kernel"].shape == (240, 10)
    assert n_params(p1) == GRU_FORWARD_PARAMS
    assert one_way.apply({"params": p1}, x).shape == (7, 10)


def _torch_gru_reference(x_bl, kernel_ih, bias_ih, kernel_hh, bias_hh):
    """torch.nn.GRU's documented equations in numpy, one direction, gates in PyTorch's order (r, z, n)."""
    x_bl = np.asarray(x_bl, np.float64)
    h_bh = np.zeros((x_bl.shape[0], kernel_hh.shape[0]))
    outputs = []
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for t in range(x_bl.shape[1]):
        gx_b3h = x_bl[:, t, None] @ kernel_ih + bias_ih
        gh_b3h = h_bh @ kernel_hh + bias_hh
        (xr, xz, xn), (hr, hz, hn) = np.split(gx_b3h, 3, axis=1), np.split(gh_b3h, 3, axis=1)
        r, z = sigmoid(xr + hr), sigmoid(xz + hz)
        n = np.tanh(xn + r * hn)
        h_bh = (1 - z) * n + z * h_bh
        outputs.append(h_bh)
    return np.stack(outputs, axis=1)  # [B, L, H]


def test_torch_gru_is_pytorchs_cell_with_its_162_parameters():
    x_bl = jax.random.normal(jax.random.PRNGKey(1), (3, 40))
    model = models.GRU1D(6, True, 10, initializer="torch")
    p = init(model, x_bl)
    assert n_params(p["forward"]) == 3 * 6 * (1 + 6 + 2) == 162  # W_ih, W_hh, b_ih, b_hh as torch.nn.GRU
    assert n_params(p) == 2 * 162 + 480 * 10 + 10
    # Both directions by PyTorch's equations (backward: run on the reversed sequence, outputs put back in order),
    # then the linear layer on the flattened [B, L, 2H]; the same for a check against torch.nn.GRU itself (run
    # once by hand with copied weights: max difference 3e-7).
    directions = []
    for name, x in (("forward", x_bl), ("backward", x_bl[:, ::-1])):
        ih, hh = p[name]["input"], p[name]["hidden"]
        h = _torch_gru_reference(
            x, *(np.asarray(a, np.float64) for a in (ih["kernel"], ih["bias"], hh["kernel"], hh["bias"]))
        )
        directions.append(h if name == "forward" else h[:, ::-1])
    h_bf = np.concatenate(directions, axis=-1).reshape(3, -1)
    expected = h_bf @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"])
    ours = jax.jit(model.apply)({"params": p}, x_bl)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_gru_depends_on_order_and_works_under_jit_and_vmap():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 40))
    model = models.GRU1D(6, True, 10)
    p = init(model, x)
    out = model.apply({"params": p}, x)
    assert np.all(np.isfinite(out))
    assert not np.allclose(model.apply({"params": p}, x[:, ::-1]), out, atol=1e-4)
    jitted = jax.jit(model.apply)({"params": p}, x)
    np.testing.assert_allclose(jitted, out, atol=1e-5, rtol=1e-5)
    per_example = jax.vmap(lambda x_l: model.apply({"params": p}, x_l[None])[0])(x)
    np.testing.assert_allclose(per_example, out, atol=1e-5, rtol=1e-5)


def test_gru_jitted_epoch_gives_finite_loss():
    x_n = jax.random.normal(jax.random.PRNGKey(1), (64, 40))
    y_n = jax.random.randint(jax.random.PRNGKey(2), (64,), 0, 10)
    model = models.GRU1D(6, True, 10)
    params = init(model, x_n)
    tx = optax.adam(1e-2)
    state = epoch_lib.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(3))
    task = task_lib.make_task(task_lib.linen_apply(model))
    epoch = functools.partial(epoch_lib.train_epoch, task=task, tx=tx, batch_size=16)
    run = jax.jit(lambda state, x, y, e: epoch(state, {"x": x, "y": y}, e))
    state, totals = run(state, x_n, y_n, jnp.asarray(0))
    loss = totals.means("train")["train_loss"]
    assert math.isfinite(loss) and float(totals.count) == 64
    assert int(state.step) == 4


def test_gru_trains_end_to_end(tmp_path):
    result = jaxepochs.train_and_evaluate(tiny_config({"model.name": "gru", "train.epochs": "1"}), tmp_path, quiet=True)
    assert math.isfinite(result.summary["test_loss"])


def _full_causal_transformer(p, tokens_bt, num_heads):
    """Every position through a causal one-layer transformer (Nanda et al.'s model), logits at the last."""
    h = p["embed"][tokens_bt] + p["pos_embed"]
    q, k, v = (jnp.einsum("btd,dhk->bthk", h, p[name]) for name in ("query", "key", "value"))
    d_head = q.shape[-1]
    scores = jnp.einsum("bshk,bthk->bhst", q, k) / math.sqrt(d_head)
    t = tokens_bt.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    h = h + jnp.einsum("bshk,hkd->bsd", jnp.einsum("bhst,bthk->bshk", jax.nn.softmax(scores, -1), v), p["out"])
    h = h + jax.nn.relu(h @ p["mlp_in"] + p["mlp_in_bias"]) @ p["mlp_out"] + p["mlp_out_bias"]
    return (h @ p["unembed"])[:, -1]


def test_transformer_equals_the_full_causal_computation_at_the_last_position():
    model = models.Transformer1L(vocab_size=14, d_model=16, num_heads=4, d_mlp=32, num_classes=13)
    tokens_bt = jax.random.randint(jax.random.PRNGKey(1), (50, 3), 0, 13).at[:, 2].set(13)
    params = model.init(jax.random.PRNGKey(0), tokens_bt[:1])["params"]
    ours = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens_bt)
    full = jax.jit(functools.partial(_full_causal_transformer, num_heads=4))(params, tokens_bt)
    np.testing.assert_allclose(ours, full, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens_bt).sum()))(params)
    full_grads = jax.jit(jax.grad(lambda p: _full_causal_transformer(p, tokens_bt, 4).sum()))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_transformer_takes_tokens_only():
    model = models.Transformer1L(vocab_size=14, d_model=16, num_heads=4, d_mlp=32, num_classes=13)
    with pytest.raises(ValueError, match="integer token sequences"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40), jnp.float32))


def test_torch_init_is_uniform_within_one_over_sqrt_fan_in():
    model = models.MLP((300,), 10, initializer="torch")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40)))["params"]
    for layer, fan_in in (("Dense_0", 40), ("Dense_1", 300)):
        for name in ("kernel", "bias"):
            values = np.asarray(params[layer][name])
            bound = 1 / math.sqrt(fan_in)
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
            assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # uniform's std


@pytest.mark.parametrize("name", ["cnn", "gru"])
def test_torch_init_of_cnn_and_gru_is_uniform_within_one_over_sqrt_fan_in(name):
    config = tiny_config({"model.name": name, "model.init": "torch"})
    model = models.make_model(config.model, 10)
    params = models.init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, 40)))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, value in flat:
        where = jax.tree_util.keystr(path)
        if "Conv_0" in where:
            fan_in = 1 * 5  # one input channel, kernel 5
        elif "Conv" in where:
            fan_in = 25 * 3
        elif "Dense" in where and "forward" not in where and "backward" not in where:
            fan_in = value.shape[0] if value.ndim == 2 else None
        else:
            fan_in = 6  # GRU: PyTorch bounds every weight and bias by 1/sqrt(hidden)
        if fan_in is None:  # the classifier's bias: same bound as its kernel
            continue
        assert np.abs(np.asarray(value)).max() <= 1 / math.sqrt(fan_in) + 1e-7, where


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(5, 2, 1), (3, 2, 1), (3, 1, 0), (4, 3, 2)])
def test_patch_convolution_equals_nn_conv(kernel, stride, padding):
    x_blc = jax.random.normal(jax.random.PRNGKey(1), (6, 40, 3))
    native = nn.Conv(7, (kernel,), strides=(stride,), padding=[(padding, padding)])
    patches = models.PatchConv1D(7, kernel, stride, padding)
    params = native.init(jax.random.PRNGKey(0), x_blc)
    assert jax.tree.map(jnp.shape, patches.init(jax.random.PRNGKey(0), x_blc)) == jax.tree.map(jnp.shape, params)

    def loss(apply, p, x):
        return jnp.sum(jnp.sin(apply(p, x)))

    out_native, grads_native = jax.jit(jax.value_and_grad(functools.partial(loss, native.apply), (0, 1)))(params, x_blc)
    out_patches, grads_patches = jax.jit(jax.value_and_grad(functools.partial(loss, patches.apply), (0, 1)))(
        params, x_blc
    )
    np.testing.assert_allclose(patches.apply(params, x_blc), native.apply(params, x_blc), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out_patches, out_native, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_patches), jax.tree.leaves(grads_native), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_cnn_convolution_forms_share_parameters_and_outputs():
    config = tiny_config({"model.name": "cnn"})
    x_bl = jax.random.normal(jax.random.PRNGKey(2), (5, 40))
    outputs = {}
    for conv in ("patches", "native"):
        model = models.make_model(ml_collections.ConfigDict({**config.model.to_dict(), "conv": conv}), 10)
        assert model.conv == conv
        params = models.init_params(model, jax.random.PRNGKey(0), x_bl)  # same tree, same initial values
        outputs[conv] = (jax.tree.map(np.asarray, params), np.asarray(jax.jit(model.apply)({"params": params}, x_bl)))
    assert jax.tree.structure(outputs["patches"][0]) == jax.tree.structure(outputs["native"][0])
    for a, b in zip(jax.tree.leaves(outputs["patches"][0]), jax.tree.leaves(outputs["native"][0]), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(outputs["patches"][1], outputs["native"][1], atol=1e-5, rtol=1e-5)


def test_auto_convolution_is_patches_on_cpu_and_native_on_accelerators():
    assert models.conv_for_backend("auto", "cpu") == "patches"
    assert models.conv_for_backend("auto", "gpu") == models.conv_for_backend("auto", "tpu") == "native"
    assert models.conv_for_backend("native", "cpu") == "native"
    assert models.make_model(tiny_config({"model.name": "cnn"}).model, 10).conv == "patches"  # tests run on CPU
    with pytest.raises(jaxepochs.ConfigError, match="model.conv"):
        config_lib.validate(tiny_config({"model.name": "cnn", "model.conv": "fft"}))
