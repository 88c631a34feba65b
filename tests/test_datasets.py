"""The generated datasets: MNIST-1D variants from `data.args`, label noise, and modular addition."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import tiny_config

from jaxepochs.data import loading as data
from jaxepochs.host import config as config_lib


def test_mnist1d_args_default_is_get_dataset_args():
    from mnist1d.data import get_dataset_args

    published = get_dataset_args(as_dict=True)
    published.pop("url")
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in config_lib.MNIST1D_ARGS.items()}
    assert ours == published


def test_mnist1d_variant_is_its_own_config_and_equals_make_dataset():
    from mnist1d.data import get_dataset_args, make_dataset

    config = tiny_config(
        {"data.args.num_samples": "1000", "data.args.train_split": "0.6", "data.validation_fraction": "0.0"}
    )
    dataset = data.load_dataset(config, quiet=True)
    args = get_dataset_args()
    args.num_samples, args.train_split = 1000, 0.6
    expected = make_dataset(args)
    np.testing.assert_array_equal(dataset.train.x, expected["x"].astype(np.float32))
    np.testing.assert_array_equal(dataset.train.y, expected["y"])
    np.testing.assert_array_equal(dataset.test.y, expected["y_test"])
    assert dataset.train.y.shape == (600,) and dataset.test.y.shape == (400,)


def test_label_noise_redraws_the_given_fraction_deterministically():
    clean = data.load_dataset(tiny_config({"data.validation_fraction": "0.0"}), quiet=True)
    noisy_config = tiny_config({"data.validation_fraction": "0.0", "data.label_noise": "0.15"})
    noisy = data.load_dataset(noisy_config, quiet=True)
    changed = np.mean(noisy.train.y != clean.train.y)
    assert 0.15 * 0.9 - 0.02 < changed < 0.15 * 0.9 + 0.02  # redrawn uniformly: 1 in 10 lands on itself
    np.testing.assert_array_equal(noisy.test.y, clean.test.y)  # the test labels stay clean
    np.testing.assert_array_equal(data.load_dataset(noisy_config, quiet=True).train.y, noisy.train.y)


def test_modular_addition_holds_every_pair_once_with_its_sum():
    config = tiny_config(
        {
            "data.name": "modular_addition",
            "data.modular.modulus": "11",
            "data.modular.train_fraction": "0.3",
            "data.validation_fraction": "0.0",
        }
    )
    dataset = data.load_dataset(config, quiet=True)
    assert dataset.num_classes == 11 and dataset.train.x.dtype == np.int32
    assert dataset.train.y.shape == (int(0.3 * 121),) and dataset.test.y.shape == (121 - int(0.3 * 121),)
    # The split of Nanda et al.'s reference code (gen_train_test), spelled out as they wrote it.
    pairs = [(i, j, 11) for i in range(11) for j in range(11)]
    random.seed(0)
    random.shuffle(pairs)
    assert dataset.train.x.tolist() == [list(p) for p in pairs[: int(0.3 * len(pairs))]]
    x = np.concatenate([dataset.train.x, dataset.test.x])
    y = np.concatenate([dataset.train.y, dataset.test.y])
    assert (x[:, 2] == 11).all()  # the "=" token
    assert sorted(map(tuple, x[:, :2].tolist())) == [(a, b) for a in range(11) for b in range(11)]
    np.testing.assert_array_equal(y, (x[:, 0] + x[:, 1]) % 11)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"data.label_noise": "1.5"}, r"data\.label_noise"),
        ({"data.name": "digits", "data.args.num_samples": "100"}, r"data\.args.*mnist1d generator"),
        ({"data.args.train_split": "1.0"}, r"data\.args.*train_split"),
        ({"data.name": "modular_addition", "data.modular.modulus": "1"}, r"data\.modular.*modulus of 2"),
        ({"model.init": "torh"}, r'model\.init.*Did you mean "torch"'),
        ({"model.name": "transformer", "model.num_heads": "3"}, r"d_model divisible by num_heads"),
    ],
)
def test_bad_dataset_and_model_settings(overrides, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        tiny_config(overrides)


def test_preparing_a_dataset_leaves_no_empty_directories_in_the_temporary_directory(tmp_path, monkeypatch):
    """TFDS makes an (empty) temporary directory each time it makes the builder of a dataset not prepared yet; the
    loader removes them."""
    import tempfile

    made, real = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    config = config_lib.apply_overrides(tiny_config(), {"data.name": "digits", "data.data_dir": str(tmp_path)})
    data.load_dataset(config, quiet=True)
    tfds_made = [path for path in made if path.endswith("tfds")]
    assert tfds_made  # TFDS still makes them: the check below is not empty
    assert not [path for path in tfds_made if __import__("os").path.exists(path)]
