"""MNIST-1D MLP for sweeps: learning rate x seed in one vmapped program, with the epoch count cross-validated.

    jaxepochs sweep --config experiments/mnist1d_mlp_sweep.py --workdir runs/mnist1d_sweep \
        --sweep.optimizer.learning_rate=1e-3,3e-3,1e-2 --sweep.seed=0,1 --cv 3 --refit

The default experiment (residual MLP 40-100-100-10, Adam, batch 100) for 60 epochs, 10 epochs per compiled
call. The command trains 3 x 2 configurations x 3 folds = 18 runs in one program, prints the ranked runs and,
per configuration, the epoch count the folds' mean validation loss recommends, then retrains each on the whole
training split for that many epochs and reports its test accuracy.
"""

from jaxepochs.config import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist1d"
    config.model.name = "mlp"
    config.model.hidden_sizes = (100, 100)
    config.model.residual = True
    config.train.epochs = 60
    config.train.epochs_per_call = 10
    config.train.batch_size = 100
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-2
    return config
