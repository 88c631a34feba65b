"""scikit-learn's digits (1,797 8x8 images of handwritten digits, 10 classes) split 50/25/25 as Proben1 splits
its problems (seed 0, features standardised by the training set's statistics); a small MLP. One of
`jaxepochs reproduce prechelt`'s problems.

    jaxepochs run --config experiments/prechelt_digits.py --workdir runs/prechelt_digits
"""

import numpy as np

from jaxepochs import base_config
from jaxepochs.data import proben1


def get_config():
    config = base_config()
    config.model.hidden_sizes = (32,)
    config.train.epochs = 300
    config.train.batch_size = 32
    config.optimizer.learning_rate = 1e-2
    return config


def get_data(config):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return proben1.split(x, y.astype(np.int32))


metrics_fn = proben1.classifier_metrics  # accuracy, and Proben1's squared error percentage
