"""scikit-learn's wine (178 wines, 13 features, 3 cultivars), split 50/25/25 as Proben1 splits its problems; a
small MLP. One of `jaxepochs reproduce prechelt`'s problems (Proben1's own are not available here).

    jaxepochs run --config experiments/prechelt_wine.py --workdir runs/prechelt_wine
"""

import numpy as np

from jaxepochs import base_config
from jaxepochs.data import proben1


def get_config():
    config = base_config()
    config.model.hidden_sizes = (8,)
    config.train.epochs = 300
    config.train.batch_size = 16
    config.optimizer.learning_rate = 1e-2
    return config


def get_data(config):
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    return proben1.split(x, y.astype(np.int32))


metrics_fn = proben1.classifier_metrics  # accuracy, and Proben1's squared error percentage
