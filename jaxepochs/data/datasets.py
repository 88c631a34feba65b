"""TFDS builders for the datasets jaxepochs ships, generated locally (no download) and written as array_record.

Both write their examples in generation order (`disable_shuffling`), so index i of a split read back with
`tfds.data_source` is example i of the source: the published MNIST-1D order is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random

import numpy as np
import tensorflow_datasets as tfds

from jaxepochs.data import MNIST1D_ARGS

DIGITS_SPLIT_SEED = 0  # scikit-learn's train_test_split(random_state=...) for the 80/20 digits split


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes in-memory (x, label) arrays, in order."""

    def _generate_examples(self, x, y):
        for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
            yield i, {"x": xi.astype(np.float32), "label": int(yi)}


@dataclasses.dataclass(eq=False)
class Mnist1dConfig(tfds.core.BuilderConfig):
    args: dict = dataclasses.field(default_factory=dict)  # the fields of get_dataset_args() (no url)


def mnist1d_config(args: dict) -> Mnist1dConfig:
    """The TFDS config of generator arguments `args`: "default" for the published ones, else named by a hash."""
    args = {k: list(v) if isinstance(v, tuple | list) else v for k, v in args.items()}
    default = {k: list(v) if isinstance(v, tuple) else v for k, v in MNIST1D_ARGS.items()}
    if args == default:
        return Mnist1dConfig(name="default", args=args, description="get_dataset_args(), unchanged")
    changed = {k: v for k, v in args.items() if default.get(k) != v}
    digest = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    return Mnist1dConfig(name=f"args_{digest}", args=args, description=f"get_dataset_args() with {changed}")


class Mnist1d(_ArrayBuilder):
    """MNIST-1D (Greydanus & Kobak): `mnist1d.data.make_dataset(args)`; the default config is
    `get_dataset_args()` (4000 train / 1000 test), and any other arguments are their own config."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "make_dataset(get_dataset_args()) of the mnist1d package, or other arguments."}
    BUILDER_CONFIGS = [mnist1d_config(MNIST1D_ARGS)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST-1D: 1-D signals of length 40 in 10 classes, standardised by the generator.",
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(self.builder_config.args["final_seq_length"],), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("x", "label"),
            disable_shuffling=True,
            homepage="https://github.com/greydanus/mnist1d",
        )

    def _split_generators(self, dl_manager):
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        for key, value in self.builder_config.args.items():
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
        data = make_dataset(args)
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }


class Digits(_ArrayBuilder):
    """scikit-learn's 8x8 handwritten digits (1797 images), split 80/20 with a fixed seed; pixels scaled to [0, 1]."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits, train_test_split(test_size=0.2, random_state=0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="8x8 digit images from scikit-learn, flattened to 64 values in [0, 1].",
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(64,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("x", "label"),
            disable_shuffling=True,
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x / 16.0, y, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=y
        )
        return {
            "train": self._generate_examples(x_train, y_train),
            "test": self._generate_examples(x_test, y_test),
        }


@dataclasses.dataclass(eq=False)
class ModularConfig(tfds.core.BuilderConfig):
    modulus: int = 113
    train_fraction: float = 0.3
    seed: int = 0


def modular_config(modulus: int, train_fraction: float, seed: int) -> ModularConfig:
    name = f"p{modulus}_train{train_fraction:g}_seed{seed}".replace(".", "_")
    return ModularConfig(name=name, modulus=modulus, train_fraction=train_fraction, seed=seed)


class ModularAddition(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """(a + b) mod p for every pair a, b in [0, p): the tokens [a, b, =] (= is token p) and the label a + b mod p.

    The split is Nanda et al.'s (2023) `gen_train_test`, pair for pair: the pairs in (a, b) order, shuffled by
    Python's `random` seeded with `seed`, the first int(train_fraction * p * p) for `train`, the rest for `test`
    (p = 113, 30%, seed 0: their 3,830 training pairs).
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "All p * p pairs, split by a seeded permutation.",
        "1.1.0": "The split of Nanda et al.'s reference code (Python's random.shuffle, int() of the fraction).",
    }
    BUILDER_CONFIGS = [modular_config(113, 0.3, 0)]

    def _info(self) -> tfds.core.DatasetInfo:
        p = self.builder_config.modulus
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Modular addition mod {p}: tokens [a, b, {p}] -> (a + b) mod {p}.",
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(3,), dtype=np.int32),
                    "label": tfds.features.ClassLabel(num_classes=p),
                }
            ),
            supervised_keys=("x", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        p = c.modulus
        a_n, b_n = np.divmod(np.arange(p * p), p)
        order = list(range(p * p))
        random.Random(c.seed).shuffle(order)  # the same swaps as random.seed(seed); random.shuffle(pairs)
        order_n = np.asarray(order)
        n_train = int(c.train_fraction * p * p)
        x_n3 = np.stack([a_n, b_n, np.full_like(a_n, p)], axis=1).astype(np.int32)
        y_n = (a_n + b_n) % p
        train, test = order_n[:n_train], order_n[n_train:]
        return {
            "train": self._generate_examples(x_n3[train], y_n[train]),
            "test": self._generate_examples(x_n3[test], y_n[test]),
        }

    def _generate_examples(self, x_n3, y_n):
        for i, (x, y) in enumerate(zip(x_n3, y_n, strict=True)):
            yield i, {"x": x, "label": int(y)}


BUILTIN = {"mnist1d": Mnist1d, "digits": Digits, "modular_addition": ModularAddition}
