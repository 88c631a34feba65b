"""The Flax mnist example's NNX CNN (flax `examples/mnist/train.py`, as its authors wrote it) on scikit-learn's
digits, with the example's optimizer: SGD, learning rate 0.1, momentum 0.9, batch 128, 10 epochs.

    jaxepochs run --config experiments/flax_mnist_nnx.py --workdir runs/flax_mnist_nnx

The model is the example's class, line for line, with one number changed: the first Linear layer takes the
flattened 2x2x64 features of an 8x8 digit (256) where a 28x28 MNIST image gives 7x7x64 (3136). `__call__(self,
x, rngs)` takes the `nnx.Rngs` the example passes; the trainer passes one built from each step's key (its
dropout then repeats on a resumed run), switches the model with `model.train()` and `model.eval()` as the
example does, and keeps BatchNorm's running statistics in the state. The data is digits_cnn.py's (a sibling
module: the experiment's folder is on sys.path while it loads). Expect test accuracy about 0.97 after 10 epochs
(0.972 measured, seed 0), in about 40 s on 2 CPU cores.
"""

from functools import partial

from digits_cnn import get_data  # noqa: F401  (the 80/20 split of digits as 8x8x1 images in [0, 1])
from flax import nnx

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.train.epochs = 10  # the example's config.num_epochs
    config.train.batch_size = 128
    config.optimizer.name = "sgd"  # optax.sgd(learning_rate, momentum), as the example builds it
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    return config


class CNN(nnx.Module):
    """A simple CNN model."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(256, 256, rngs=rngs)  # 2x2x64 from an 8x8 digit (the example: 3136, 7x7x64)
        self.dropout2 = nnx.Dropout(rate=0.025)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
        x = self.linear2(x)
        return x


def get_model(config):
    return CNN(rngs=nnx.Rngs(config.seed))  # the example's nnx.Rngs(0), from the run's seed
