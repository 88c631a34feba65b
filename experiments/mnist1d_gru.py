"""MNIST-1D, bidirectional GRU (hidden 6 per direction) over the 40 time steps, linear layer on all 480 outputs.

    jaxepochs run --config experiments/mnist1d_gru.py --workdir runs/mnist1d_gru

Published test accuracy: 91% (README table), about 89% in the benchmark notebook after 6,000 steps. About 0.09 s
per epoch on 2 CPU cores. This module uses flax's GRUCell (150 parameters per direction); the reproduction sets
model.init=torch, which takes PyTorch's cell (six bias vectors, 162 parameters) and initialisation.
Measured (`jaxepochs reproduce mnist1d`, the notebook's recipe, 10 seeds, 150 epochs): test accuracy 0.912 ± 0.011,
against 0.903 ± 0.020 for the same recipe in PyTorch over 10 seeds (experiments/results/mnist1d/report.md).
"""

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist1d"
    config.model.name = "gru"
    config.model.gru_hidden = 6
    config.model.bidirectional = True
    config.train.epochs = 150
    config.train.batch_size = 100
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-2
    return config
