"""Deep double descent on MNIST-1D: MLP 40-h-h-10 on 4,000 examples, 15% of the training labels redrawn.

    jaxepochs run --config experiments/mnist1d_double_descent.py --workdir runs/dd_h47 \
        --config.model.hidden_sizes='(47,47)'
    jaxepochs reproduce double-descent --workdir runs/reproduce_dd      # every width, with and without noise

The recipe of greydanus/mnist1d notebooks/deep-double-descent.ipynb: make_dataset with num_samples 16,000 and
train_split 0.25 (4,000 train / 12,000 test), each training label redrawn uniformly with probability 0.15,
SGD lr 0.01 momentum 0.9, batch 100, 500 epochs, PyTorch's default initialisation; the width h runs over
unique(geomspace(2, 300, 20).astype(int)). Published test error with noise: 47.2% at h=16, the peak 54.0%
at h=47-61, 45.5% at h=300. Measured here (2 seeds): 46.8% at h=16, 54.7% at h=47, 52.2% at h=61, 45.6% at
h=300 (experiments/results/double-descent/); one width takes 10-35 s on 2 CPU cores.
"""

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist1d"
    config.data.args.num_samples = 16_000
    config.data.args.train_split = 0.25
    config.data.label_noise = 0.15
    config.data.validation_fraction = 0.0  # the notebook trains on all 4,000 and reports the 12,000 test examples
    config.train.log_test = True  # the epoch-wise test error curve
    config.model.name = "mlp"
    config.model.hidden_sizes = (47, 47)  # the peak of the published curve
    config.model.init = "torch"
    config.train.epochs = 500
    config.train.batch_size = 100
    config.train.eval_batch_size = 2000
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 1e-2
    config.optimizer.momentum = 0.9
    return config
