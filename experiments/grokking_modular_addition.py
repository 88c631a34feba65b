"""Grokking: (a + b) mod 113 with a one-layer transformer, trained full-batch on 30% of the pairs.

    jaxepochs run --config experiments/grokking_modular_addition.py --workdir runs/grokking
    jaxepochs reproduce grokking --workdir runs/reproduce_grokking

The setting of Nanda et al. 2023, "Progress measures for grokking via mechanistic interpretability" (ICLR;
arXiv:2301.05217), section 3 / appendix: p = 113, 30% of the 12,769 pairs for training, full batch, a
one-layer ReLU transformer (d_model 128, 4 heads of 32, MLP 512, no LayerNorm, tokens [a, b, =]), AdamW lr 1e-3,
weight decay 1.0, betas (0.9, 0.98), linear warmup over 10 steps. Training accuracy reaches 100% within a few
hundred epochs; test accuracy jumps to ~100% thousands of epochs later (their Figure 1 and the phases of
section 5: memorisation, circuit formation, cleanup ending near epoch 13k of their 40k-epoch run).
As the reference code (Nanda et al.'s transformers.py): logits over all 114 tokens, their train/test split
(Python's random.shuffle, seed 0, 3,830 training pairs), and a cross-entropy that stays exact when the answer is
nearly certain (theirs is computed in float64; see jaxepochs.core.epoch.cross_entropy).
Measured (`jaxepochs reproduce grokking --seeds 3`, NVIDIA H200, experiments/results/grokking/): train accuracy
99% at epoch 139-140, test accuracy 99% at epochs 4,160 / 8,840 / 5,100 (seeds 0 / 1 / 2), final test accuracy
1.000; about 20 s per 15,000-epoch run there (at commit 5b34723, before the loss was rewritten for speed:
the same function, other round-off). The final code on 2 CPU cores, seed 0 (`jaxepochs reproduce grokking
--seeds 1`): train accuracy 99% at epoch 141, test accuracy 99% at epoch 4,960; 72 ms per epoch, 15,000 epochs
in about 17 min (`python benchmarks/grokking_speed.py`).
"""

from jaxepochs import base_config


def get_config():
    config = base_config()
    config.data.name = "modular_addition"
    config.data.modular.modulus = 113
    config.data.modular.train_fraction = 0.3
    config.data.validation_fraction = 0.0  # the held-out pairs are the test split, logged every epoch
    config.train.log_test = True
    config.model.name = "transformer"
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.d_mlp = 512
    # The reference unembeds to every token, "=" included (d_vocab = p + 1 logits, the loss over all 114).
    config.model.vocab_size = 114
    config.model.num_classes = 114
    config.train.epochs = 15_000
    config.train.test_every = 10  # the 8,939 held-out pairs cost a third of a training epoch: log every 10th
    config.train.epochs_per_call = 500  # one step per epoch: fuse epochs so the host is out of the loop
    config.train.batch_size = 3830  # full batch: int(0.3 * 113**2) pairs, one step per epoch
    config.train.eval_batch_size = 8939  # the rest: the whole test split in one batch
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.schedule.warmup_epochs = 10  # = 10 steps at one step per epoch
    return config
