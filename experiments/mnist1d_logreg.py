"""MNIST-1D, logistic regression (40 -> 10), Adam 1e-2, batch 100.

    jaxepochs run --config experiments/mnist1d_logreg.py --workdir runs/mnist1d_logreg

Published test accuracy: 32% (README table), 31.5% in the benchmark notebook. Expect about 0.3 here.
Measured (`jaxepochs reproduce mnist1d`, the notebook's recipe, 10 seeds, 150 epochs): test accuracy 0.314 ± 0.001
(experiments/results/mnist1d/report.md).
"""

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist1d"
    config.model.name = "mlp"
    config.model.hidden_sizes = ()
    config.train.epochs = 150
    config.train.batch_size = 100
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-2
    return config
