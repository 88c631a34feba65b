"""scikit-learn's diabetes (442 patients, 10 features, disease progression; Proben1's approximation problems are
regressions like it), split 50/25/25 as Proben1 splits its problems, the target divided by 100; a small MLP on the
mean squared error. One of `jaxepochs reproduce prechelt`'s problems.

    jaxepochs run --config experiments/prechelt_diabetes.py --workdir runs/prechelt_diabetes
"""

import numpy as np

from jaxepochs import base_config
from jaxepochs.data import proben1


def get_config():
    config = base_config()
    config.task = "regression"
    config.model.hidden_sizes = (8,)
    config.train.epochs = 300
    config.train.batch_size = 16
    config.optimizer.learning_rate = 1e-2
    return config


def get_data(config):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    return proben1.split(x, (y / 100.0).astype(np.float32))
