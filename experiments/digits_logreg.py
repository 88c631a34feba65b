"""scikit-learn digits (8x8), logistic regression (64 -> 10), SGD 1e-2, batch size 1: the per-step cost case.

    jaxepochs run --config experiments/digits_logreg.py --workdir runs/digits_logreg

1,293 optimizer steps per epoch (1,437 training images less a 10% validation split). Expect test accuracy
about 0.95 after 20 epochs, in a few seconds on 2 CPU cores.
"""

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.data.name = "digits"
    config.model.name = "mlp"
    config.model.hidden_sizes = ()
    config.train.epochs = 20
    config.train.batch_size = 1
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 1e-2
    config.optimizer.momentum = 0.0
    return config
