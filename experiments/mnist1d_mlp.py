"""MNIST-1D, residual MLP 40-100-100-10, Adam 1e-2, batch 100: the default experiment (the MNIST-1D reference).

    jaxepochs run --config experiments/mnist1d_mlp.py --workdir runs/mnist1d_mlp     # or: make run

Expect: train accuracy reaches 100% within ~60 epochs while validation loss rises after ~25 (overfitting);
test accuracy about 0.65 (published: 68% README table, 65% in the benchmark notebook). Under 30 s on 2 CPU cores.
Measured (`jaxepochs reproduce mnist1d`, the notebook's recipe, 10 seeds, 150 epochs): test accuracy 0.650 ± 0.012
(experiments/results/mnist1d/report.md).
"""

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist1d"
    config.model.name = "mlp"
    config.model.hidden_sizes = (100, 100)
    config.model.residual = True  # the reference: h = relu(W1 x); h = h + relu(W2 h)
    config.train.epochs = 150
    config.train.batch_size = 100
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-2
    return config
