"""MNIST-1D (4,000 training and 1,000 test sequences of 40 values, 10 classes; validation held out of the training
set) with a one-hidden-layer MLP, logging Proben1's squared error percentage beside the accuracy. One of
`jaxepochs reproduce prechelt`'s problems.

    jaxepochs run --config experiments/prechelt_mnist1d.py --workdir runs/prechelt_mnist1d
"""

from jaxepochs import base_config
from jaxepochs.data import proben1


def get_config():
    config = base_config()
    config.data.name = "mnist1d"
    config.model.name = "mlp"
    config.model.hidden_sizes = (128,)
    config.train.epochs = 300
    config.train.batch_size = 100
    config.optimizer.learning_rate = 1e-2
    return config


metrics_fn = proben1.classifier_metrics  # accuracy, and Proben1's squared error percentage
