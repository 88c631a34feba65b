"""optax optimizers from `config.optimizer`, with their hyperparameters held in the optimizer state.

`optax.inject_hyperparams` keeps the learning rate (and momentum, weight decay) as arrays in the state rather
than constants in the program: the applied learning rate can be read back each epoch, and runs that differ
only in these values share one compiled program.
"""

from __future__ import annotations

import jax
import ml_collections
import optax


def make_optimizer(opt_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = opt_config
    if o.name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=o.learning_rate)
    if o.name == "adamw":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=o.learning_rate, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=o.learning_rate, momentum=o.momentum)
    raise ValueError(f'Unknown optimizer "{o.name}"; use adam, adamw or sgd.')


def learning_rate(opt_state) -> jax.Array:
    """The learning rate the next update applies, read from an `inject_hyperparams` state."""
    return opt_state.hyperparams["learning_rate"]
