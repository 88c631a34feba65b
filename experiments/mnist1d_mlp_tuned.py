"""MNIST-1D residual MLP 40-100-100-10 with the epoch count chosen for you: warmup-cosine schedule, early stopping on
validation loss with restore-best. A variant of the default experiment (which keeps the published recipe).

    jaxepochs run --config experiments/mnist1d_mlp_tuned.py --workdir runs/mnist1d_mlp_tuned

Expect (measured here, seed 0): validation loss bottoms out at epoch 10, patience stops the run at epoch 30 of
the 150 allowed, the epoch-10 parameters are restored: test loss 1.15 and test accuracy 0.572, in 8 s. The
published recipe (mnist1d_mlp, 150 epochs) ends at test loss 2.86 and accuracy 0.642: on MNIST-1D accuracy keeps
creeping up while the loss overfits, so monitor val_accuracy (--config.early_stopping.monitor=val_accuracy)
when accuracy is what you want.
"""

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist1d"
    config.model.name = "mlp"
    config.model.hidden_sizes = (100, 100)
    config.model.residual = True
    config.train.epochs = 150
    config.train.batch_size = 100
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-2
    config.optimizer.schedule.name = "warmup_cosine"
    config.optimizer.schedule.warmup_epochs = 5.0
    config.early_stopping.enabled = True
    config.early_stopping.monitor = "val_loss"
    config.early_stopping.patience = 20
    config.early_stopping.restore_best = True
    return config
