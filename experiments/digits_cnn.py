"""A 2-D CNN with BatchNorm and Dropout on scikit-learn's digits as 8x8x1 images, with a random shift as the
augmentation: a model, data and augmentation of the experiment module's own.

    jaxepochs run --config experiments/digits_cnn.py --workdir runs/digits_cnn

`get_data` gives the images (the 80/20 split of the built-in `digits` dataset: stratified, seed 0, pixels in
[0, 1]); `get_model` a flax linen module whose `__call__` takes `train`, so BatchNorm uses the batch's statistics
and updates its running ones in training and uses those in evaluation, and Dropout drops only in training (its
key is folded from the step, so a resumed run repeats an uninterrupted one). `augment(key, batch)` shifts each
image by up to one pixel, inside the training scan on the device. Expect test accuracy about 0.98-0.99 after 30
epochs (0.986 measured, seed 0, without biases before BatchNorm), in about a minute on 2 CPU cores.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.train.epochs = 30
    config.train.batch_size = 32
    config.optimizer.learning_rate = 3e-3
    return config


class DigitsCNN(nn.Module):
    @nn.compact
    def __call__(self, x_bhwc, train: bool):
        for features in (16, 32):
            # No bias before BatchNorm: it subtracts the batch mean, so a bias's gradient is 0 but for round-off,
            # which Adam's normalised step turns into steps of the full learning rate (the Flax ResNet's rule too).
            x_bhwc = nn.Conv(features, (3, 3), use_bias=False)(x_bhwc)
            x_bhwc = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x_bhwc)
            x_bhwc = nn.relu(x_bhwc)
        x_bf = nn.Dropout(0.25, deterministic=not train)(x_bhwc.reshape(x_bhwc.shape[0], -1))
        return nn.Dense(10)(x_bf)


def get_model(config):
    return DigitsCNN()


def get_data(config):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    images = (x / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(images, y, test_size=0.2, random_state=0, stratify=y)
    return {"train": {"x": x_train, "y": y_train}, "test": {"x": x_test, "y": y_test}}


def augment(key, batch):
    """Each image shifted by -1, 0 or 1 pixel in each direction (zeros come in at the edge)."""
    x_bhwc = batch["x"]
    shifts_b2 = jax.random.randint(key, (x_bhwc.shape[0], 2), -1, 2)
    padded = jnp.pad(x_bhwc, ((0, 0), (1, 1), (1, 1), (0, 0)))
    crop = lambda image, shift: jax.lax.dynamic_slice(image, (1 + shift[0], 1 + shift[1], 0), x_bhwc.shape[1:])
    return {**batch, "x": jax.vmap(crop)(padded, shifts_b2)}
