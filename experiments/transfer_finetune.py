"""Transfer study, step 2: the MNIST-1D CNN learning digits 5-9 from 10% of their training labels.

    jaxepochs run --config experiments/transfer_finetune.py --workdir runs/transfer_scratch      # from scratch
    jaxepochs run --config experiments/transfer_finetune.py --workdir runs/transfer_finetuned \
        --config.init.from_workdir=runs/transfer_pretrain --config.init.reinit="('Dense_0/*',)" \
        --config.optimizer.learning_rate=1e-3                                                      # full fine-tuning

`get_data` reads MNIST-1D through jaxepochs' own loader, keeps digits 5-9 and relabels them 0-4 (digit d is
class d - 5): the experiment relabels, the trainer does not. Of their training examples it keeps a fixed,
stratified 10% (round(0.1 * n) of each digit, chosen by the constant SUBSET_SEED, not the run's seed, so every
seed and every arm of the study trains on the same examples: about 200); the test split is every test example of
digits 5-9 (about 500). No validation split is held out (the 200 labels all train) and the test split is
evaluated every epoch (`train.log_test`), so each run's metrics.jsonl is a test-accuracy curve.

The config is the "from scratch" arm. The study's other arms are overrides of it (experiments/references/
transfer.json; `jaxepochs reproduce transfer`): start from a run of experiments/transfer_pretrain.py with the
head (`Dense_0`, the linear layer on the 125 features) initialised afresh, then freeze the backbone
(`finetune.freeze`), unfreeze it gradually (`finetune.unfreeze_epochs`) or train lower layers slower
(`optimizer.layer_decay`). The CNN's groups, bottom to top: Conv_0, Conv_1, Conv_2, Dense_0.
"""

import numpy as np

from jaxepochs import base_config

CLASSES = (5, 6, 7, 8, 9)  # learnt as classes 0-4
LABEL_FRACTION = 0.1  # of each digit's training examples
SUBSET_SEED = 0  # fixed: every run sees the same labelled examples


def get_config():
    config = base_config()
    config.model.name = "cnn"
    config.model.channels = (25, 25, 25)
    config.model.kernel_sizes = (5, 3, 3)
    config.model.strides = (2, 2, 2)
    config.model.padding = 1
    config.model.num_classes = len(CLASSES)
    config.data.validation_fraction = 0.0
    config.train.epochs = 100
    config.train.batch_size = 25
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


def labelled_subset(y: np.ndarray, fraction: float = LABEL_FRACTION, seed: int = SUBSET_SEED) -> np.ndarray:
    """Sorted indices of round(fraction * n_c) examples of each class c, drawn by `seed`."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        chosen.append(rng.permutation(members)[: int(round(fraction * members.size))])
    return np.sort(np.concatenate(chosen))


def get_data(config):
    """Digits 5-9 relabelled 0-4; a fixed stratified 10% of their training examples, all of their test ones."""
    out = {}
    for name, split in _mnist1d().items():
        keep = np.isin(split.y, CLASSES)
        x, y = np.asarray(split.x)[keep], np.asarray(split.y)[keep] - min(CLASSES)
        if name == "train":
            subset = labelled_subset(y)
            x, y = x[subset], y[subset]
        out[name] = {"x": x, "y": y.astype(np.int32)}
    return out
