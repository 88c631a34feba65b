"""Two heads on scikit-learn's digits: the class (10-way) and the parity of the digit, from one MLP trunk, with a
dict of labels and the parity head's loss weight in `config.hparams` (an experiment's own settings).

    jaxepochs run --config experiments/two_heads.py --workdir runs/two_heads
    jaxepochs sweep --config experiments/two_heads.py --workdir runs/two_heads_sweep \
        --sweep.hparams.parity_weight=0.1,0.3,1.0

Expected (measured on 2 CPU cores, seed 0): test_class_accuracy 0.912 and test_parity_accuracy 0.940 after 20
epochs (5 s with a warm compilation cache);
the sweep trains its three weights as ONE program (sweep.json: "programs": 1), as a learning-rate sweep does.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxepochs import base_config
from jaxepochs.core.task import cross_entropy


def get_config():
    config = base_config()
    config.train.epochs = 20
    config.train.batch_size = 32
    config.optimizer.learning_rate = 3e-3
    config.hparams.parity_weight = 0.5  # the parity head's share of the loss: traced, sweepable in one program
    config.hparams.hidden = 64  # read by get_model: a width, so a sweep over it compiles one program per value
    return config


class TwoHeads(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden)(x))
        return {"class": nn.Dense(10)(h), "parity": nn.Dense(2)(h)}


def get_model(config):
    return TwoHeads(int(config.hparams.hidden))


def get_data(config):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    labels = {"class": y.astype(np.int32), "parity": (y % 2).astype(np.int32)}
    cut = 1400
    take = lambda s: {"x": x[s], "y": {k: v[s] for k, v in labels.items()}}
    return {"train": take(slice(0, cut)), "test": take(slice(cut, None))}


def loss_fn(outputs, batch, hparams):
    y = batch["y"]
    return cross_entropy(outputs["class"], y["class"]) + hparams.parity_weight * cross_entropy(
        outputs["parity"], y["parity"]
    )


def metrics_fn(outputs, batch):
    hit = lambda k: (jnp.argmax(outputs[k], -1) == batch["y"][k]).astype(jnp.float32)
    return {"class_accuracy": hit("class"), "parity_accuracy": hit("parity")}
