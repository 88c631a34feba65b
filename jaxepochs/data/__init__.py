"""Data: the built-in TFDS builders (`datasets`, generated locally) and the loading of a config's splits onto the
device (`loading`). This module holds what the config layer needs without importing TFDS."""

BUILTIN_NAMES = ("mnist1d", "digits", "modular_addition")

# mnist1d.data.get_dataset_args() of mnist1d 0.0.2+, less its download url (tests check they agree).
MNIST1D_ARGS = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": (36, 60),
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}
