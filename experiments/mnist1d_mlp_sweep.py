"""MNIST-1D MLP for sweeps: learning rate x seed in one vmapped program, with the epoch count cross-validated.

    jaxepochs sweep --config experiments/mnist1d_mlp_sweep.py --workdir runs/mnist1d_sweep \
        --sweep.optimizer.learning_rate=1e-3,3e-3,1e-2 --sweep.seed=0,1 --cv 3 --refit

The default experiment (residual MLP 40-100-100-10, Adam, batch 100) for 60 epochs. The command trains 3 x 2
configurations x 3 folds = 18 runs in one program, prints the ranked runs and, per configuration, the epoch count
the folds' mean validation loss recommends, then retrains each on the whole training split for that many epochs and
reports its test accuracy. Measured here (2 CPU cores): 18 s for the 18 runs and 6 refits; CV recommends 29-33
epochs at lr 1e-3, 14-15 at 3e-3 and 5-8 at 1e-2 (refit test accuracy 0.561-0.594).
"""

import pathlib

from jaxepochs import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("mnist1d_mlp.py"))  # the default experiment
    config.train.epochs = 60
    return config
