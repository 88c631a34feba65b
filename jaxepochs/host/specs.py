"""The typed pieces of a config that the host needs, read once after validation (as core's RunSpec is for the
program): the host loop's (epochs, pace, checkpoint cadence), the writers' and fine-tuning's. Below the entry
points the host takes these, not the config."""

from __future__ import annotations

from typing import NamedTuple

from jaxepochs.host import config as config_lib
from jaxepochs.host.driver import LoopSpec
from jaxepochs.host.finetune import FinetuneSpec
from jaxepochs.host.writers import LogSpec


class HostSpecs(NamedTuple):
    loop: LoopSpec
    logging: LogSpec
    finetune: FinetuneSpec


def specs_of(config) -> HostSpecs:
    """The host's typed pieces of a validated config."""
    t, k, g, f = config.train, config.checkpoint, config.logging, config.finetune
    loop = LoopSpec(t.epochs, t.epochs_per_call, t.host_interval_seconds, bool(k.enabled), k.max_to_keep,
                    k.every_epochs, k.every_seconds, k.every_steps, tuple(t.profile_epochs),
                    int(k.keep_best))  # fmt: skip
    logging = LogSpec(bool(g.csv), bool(g.tensorboard), bool(g.mlflow), g.mlflow_tracking_uri, g.mlflow_experiment,
                      tuple(config_lib.flatten(config).items()), bool(g.curves), bool(g.wandb), g.wandb_project,
                      g.wandb_dir, g.wandb_mode)  # fmt: skip
    tuning = FinetuneSpec(tuple(f.groups), tuple(f.freeze), tuple(f.unfreeze_epochs), tuple(f.rate_scales),
                          float(config.optimizer.layer_decay), int(t.epochs))  # fmt: skip
    return HostSpecs(loop, logging, tuning)
