"""Transfer study, step 1: the MNIST-1D CNN (as experiments/mnist1d_cnn.py) pretrained on digits 0-4 only.

    jaxepochs run --config experiments/transfer_pretrain.py --workdir runs/transfer_pretrain

`get_data` reads MNIST-1D through jaxepochs' own loader (the built-in `mnist1d` dataset, generated locally: 4,000
train / 1,000 test) and keeps the examples of digits 0-4 (about 2,000 train / 500 test); their labels are
already 0-4, so `model.num_classes = 5`. experiments/transfer_finetune.py starts from this run's parameters to
learn digits 5-9 from 10% of their labels; `jaxepochs reproduce transfer` runs both over seeds
(experiments/references/transfer.json, experiments/results/transfer/report.md). Expect test accuracy about 0.95
after 100 epochs (about 1 s of training on 2 CPU cores, plus the compile).
"""

import numpy as np

from jaxepochs import base_config

CLASSES = (0, 1, 2, 3, 4)  # the digits pretrained on; transfer_finetune.py learns the others


def get_config():
    config = base_config()
    config.model.name = "cnn"
    config.model.channels = (25, 25, 25)
    config.model.kernel_sizes = (5, 3, 3)
    config.model.strides = (2, 2, 2)
    config.model.padding = 1
    config.model.num_classes = len(CLASSES)
    config.train.epochs = 100
    config.train.batch_size = 100
    config.train.log_test = True
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-2
    return config


def _mnist1d():
    """MNIST-1D's train and test splits as {"x", "y"} arrays, read by jaxepochs' loader (no validation held out)."""
    from jaxepochs.data import loading

    source = base_config()
    source.data.name = "mnist1d"
    source.data.validation_fraction = 0.0
    dataset = loading.load_dataset(source, quiet=True)
    return {"train": dataset.train, "test": dataset.test}


def get_data(config):
    """Digits 0-4 of MNIST-1D, every example of them; the labels stay 0-4."""
    out = {}
    for name, split in _mnist1d().items():
        keep = np.isin(split.y, CLASSES)
        out[name] = {"x": np.asarray(split.x)[keep], "y": np.asarray(split.y)[keep]}
    return out
