"""Proben1's cancer problem, from the data it was made of: scikit-learn's breast cancer (569 tumours, 30 features,
benign or malignant), split 50/25/25 into training, validation and test sets as Proben1 splits (seed 0, features
standardised by the training set's statistics); a small MLP. One of `jaxepochs reproduce prechelt`'s problems.

    jaxepochs run --config experiments/prechelt_cancer.py --workdir runs/prechelt_cancer
"""

import numpy as np

from jaxepochs import base_config
from jaxepochs.data import proben1


def get_config():
    config = base_config()
    config.model.hidden_sizes = (8,)
    config.train.epochs = 300
    config.train.batch_size = 32
    config.optimizer.learning_rate = 1e-2
    return config


def get_data(config):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return proben1.split(x, y.astype(np.int32))


metrics_fn = proben1.classifier_metrics  # accuracy, and Proben1's squared error percentage
