"""MNIST-1D, 1-D CNN (three convolutions of 25 channels, kernels 5/3/3, stride 2, padding 1; linear on 125).

    jaxepochs run --config experiments/mnist1d_cnn.py --workdir runs/mnist1d_cnn

Published test accuracy: 94% (README table), about 92% in the benchmark notebook after 6,000 steps. Expect
about 0.9 here after 150 epochs; validation loss bottoms out long before the end.
Measured (`jaxepochs reproduce mnist1d`, the notebook's recipe, 10 seeds, 150 epochs): test accuracy 0.935 ± 0.014
(experiments/results/mnist1d/report.md).
"""

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist1d"
    config.model.name = "cnn"
    config.model.channels = (25, 25, 25)
    config.model.kernel_sizes = (5, 3, 3)
    config.model.strides = (2, 2, 2)
    config.model.padding = 1
    config.train.epochs = 150
    config.train.batch_size = 100
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-2
    return config
