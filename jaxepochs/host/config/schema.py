"""The schema: every key jaxepochs knows, with its default, one builder per section.

Every experiment's `get_config()` starts from `base_config()` and changes what it needs; validation
(config/validate.py) checks a config against it.
"""

from __future__ import annotations

import ml_collections

from jaxepochs.core import optim
from jaxepochs.data import MNIST1D_ARGS


def base_config() -> ml_collections.ConfigDict:
    """Every key jaxepochs knows, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # What the model learns: classification (integer labels, cross-entropy, accuracy), regression (float targets,
    # mean squared error; mse, mae) or binary (0/1 labels, sigmoid cross-entropy, accuracy). An experiment
    # module's loss_fn and metrics_fn replace the task's.
    c.task = "classification"
    c.experiment = experiment_config()  # module, source_sha256: where the config came from
    c.data = data_config()  # the dataset, its validation split, and whether it is streamed
    c.model = model_config()  # the built-in models' settings (models.py)
    c.train = train_config()  # epochs, batches, evaluation, the host's pace, compilation, precision
    c.init = init_config()  # from_workdir, epoch, include, exclude, reinit: start from a run (host/warm_start.py)
    c.finetune = finetune_config()  # groups, freeze, unfreeze_epochs, rate_scales (host/finetune.py)
    c.mesh = mesh_config()  # data, runs, shard_params: where a run's arrays live (core/layout.py)

    c.optimizer = optimizer_config()  # name, learning_rate, momentum, b1, b2, weight_decay, clip_norm, schedule

    c.early_stopping = early_stopping_config()  # Keras's EarlyStopping, plus Prechelt's rules; see early_stopping.py

    c.logging = logging_config()  # csv, tensorboard, mlflow: where the rows go besides metrics.jsonl

    c.checkpoint = checkpoint_config()  # orbax; rerunning in the workdir resumes from the newest one
    # The experiment's own settings: whatever keys get_config sets here are known keys (overridable, sweepable,
    # in config.json). Their numbers reach loss_fn, metrics_fn and augment as a third argument, traced per run.
    c.hparams = ml_collections.ConfigDict()
    return c


def experiment_config() -> ml_collections.ConfigDict:
    """The experiment module the config came from (written by load_config_file): its hooks (get_model, loss_fn,
    metrics_fn, get_data, augment) are read from it, and config.json records it and a hash of its source."""
    return ml_collections.ConfigDict({"module": "", "source_sha256": ""})


def data_config() -> ml_collections.ConfigDict:
    """The keys of the `data` section: the dataset, its splits, label noise, and streaming."""
    d = ml_collections.ConfigDict()
    d.name = "mnist1d"  # a built-in dataset (mnist1d, digits) or "tfds:<name>" for a prepared TFDS one
    d.data_dir = ""  # empty: $TFDS_DATA_DIR, else ~/tensorflow_datasets
    d.validation_fraction = 0.1  # held out of the training split, deterministically
    d.split_seed = 0  # seeds the validation split; independent of `seed` so runs share one split
    d.train_split = "train"  # TFDS split names, for tfds:<name> datasets
    d.test_split = "test"
    # More evaluation sets, each evaluated when validation is (train.eval_every may say otherwise), as
    # <name>_<metric> rows: TFDS splits as "name=split" or "split" ("shifted=test_shifted", "corrupted").
    d.eval_splits = ()
    d.input_key = ""  # tfds:<name>: the feature that is the input; "" = the first of its supervised keys
    d.label_key = ""  # tfds:<name>: the feature that is the label; "" = the second of its supervised keys
    d.label_noise = 0.0  # fraction of training labels redrawn uniformly over the classes (seeded by split_seed)
    d.args = mnist1d_args()  # mnist1d only: the generator's get_dataset_args(); a variant is its own TFDS config
    # Streaming: None chooses (stream a dataset larger than device_memory_fraction of the device's free memory);
    # True streams the splits from the host a chunk of batches at a time; False keeps them on the device.
    d.stream = ml_collections.config_dict.placeholder(bool)
    d.device_memory_fraction = 0.5
    d.device_memory_bytes = 0  # the device memory the fraction is of; 0: measured (free memory now)
    d.modular = ml_collections.ConfigDict()  # modular_addition only: (a + b) mod p, each setting a TFDS config
    d.modular.modulus = 113
    d.modular.train_fraction = 0.3  # of the p * p pairs; the rest are the test split
    d.modular.seed = 0  # which pairs are for training
    return d


def model_config() -> ml_collections.ConfigDict:
    """The keys of the `model` section: the built-in model (models.MODELS) and each one's settings."""
    m = ml_collections.ConfigDict()
    m.name = "mlp"
    m.hidden_sizes = (100, 100)  # mlp: empty is logistic regression
    m.channels = (25, 25, 25)  # cnn
    m.kernel_sizes = (5, 3, 3)  # cnn
    m.strides = (2, 2, 2)  # cnn
    m.padding = 1  # cnn: zeros on each side of every convolution
    m.conv = "auto"  # cnn: "patches" (slices + one matmul), "native" (nn.Conv), "auto": patches on CPU only
    m.residual = False  # mlp: hidden layers after the first add their input (h = h + relu(W h)), as MNIST-1D's
    m.gru_hidden = 6  # gru: hidden size per direction
    m.bidirectional = True  # gru
    m.num_classes = 0  # 0: taken from the dataset
    m.d_model = 128  # transformer: one layer on token inputs (modular_addition); see models.Transformer1L
    m.num_heads = 4  # transformer: heads of d_model / num_heads each
    m.d_mlp = 512  # transformer: hidden units of its ReLU MLP
    m.vocab_size = 0  # transformer: tokens are 0..vocab_size-1; 0 means num_classes + 1
    # mlp, cnn, gru: flax's initialisers, or "torch": PyTorch's uniform +-1/sqrt(fan_in) (and, for gru, its cell)
    m.init = "flax"
    return m


def train_config() -> ml_collections.ConfigDict:
    """The keys of the `train` section: how the epochs run."""
    t = ml_collections.ConfigDict()
    t.epochs = 150
    t.batch_size = 100
    t.shuffle = True  # False: every epoch takes the batches in dataset order (as MNIST-1D's notebook trains)
    t.eval_batch_size = 1000  # evaluation only; capped at the split size
    t.log_test = False  # also evaluate the test split every epoch (test_loss, test_accuracy in metrics.jsonl)
    t.test_every = 1  # with log_test: evaluate the test split every this many epochs (and after the last)
    t.validate_every = 1  # evaluate the validation split every this many epochs (and after the last)
    t.eval_every = ()  # further evaluation sets' own cadence, "name=N" each (others: validate_every's)
    # Epochs per compiled call: 0 chooses them so the host meets the run about every host_interval_seconds (and
    # never past a due checkpoint or the last epoch); N > 0 runs N epochs per call. The rows are the same.
    t.epochs_per_call = 0
    t.host_interval_seconds = 0.5
    # Streamed epochs (data larger than the device, or data.stream = True): batches per compiled chunk, read and
    # put on the device while the chunk before trains; 0 chooses chunks of about 32 MB (at most an epoch).
    t.steps_per_call = 0
    # 0: an epoch is one pass over the training split. S > 0: an epoch is S steps of a stream that reads the split
    # round and round (each pass in its own order, every example once a pass); the epoch is then streamed.
    t.steps_per_epoch = 0
    # JAX's persistent compilation cache: a later run of the same shapes loads its programs instead of compiling
    # them. "" leaves JAX's own setting (off unless $JAX_COMPILATION_CACHE_DIR or jax.config sets it).
    t.compilation_cache_dir = "~/.cache/jaxepochs/xla"
    # "bfloat16": the forward and backward passes compute in bfloat16 (parameters, optimizer state, the loss and
    # the metrics stay float32); "float32": everything in float32.
    t.compute_dtype = "float32"
    # k > 1: each optimizer step sums the gradients of k micro-batches of batch_size / k rows (a scan inside the
    # step): the step of the whole batch in the memory of one micro-batch.
    t.accumulate_steps = 1
    t.profile_epochs = ()  # epochs traced by jax.profiler into WORKDIR/profile/ (each runs as a call alone)
    # Classification's built-in loss weighted per class in training, as Keras's class_weight: None (off), one
    # weight per class (a tuple), or "balanced" (N / (classes * the class's count) over the training split).
    t.class_weight = None
    # Averages of the parameters (core/averages.py): an exponential moving average updated after every step (0:
    # none; 0.999 remembers about 1,000 steps), or SWA's equal-weight average of the parameters at the end of each
    # epoch from swa_start_epoch on (0: none). eval_weights: what validation, test, the best epoch, `load` and the
    # exports see: "ema" or "swa" (the average), "trained" (the trained parameters), "" (the average if one is kept);
    # "both": the average, and the validation split at the trained parameters too (val_trained_<metric>).
    t.ema_decay = 0.0
    t.swa_start_epoch = 0
    t.eval_weights = ""
    return t


def checkpoint_config() -> ml_collections.ConfigDict:
    """The keys of the `checkpoint` section (orbax; rerunning in the workdir resumes from the newest one)."""
    k = ml_collections.ConfigDict()
    k.enabled = True
    k.every_epochs = 0  # 0: by time (every_seconds); always at the end, at a stop and at Ctrl-C
    k.every_seconds = 30.0
    k.every_steps = 0  # streamed epochs: also every this many steps inside an epoch (0: by time there)
    k.max_to_keep = 3
    k.keep_best = 0  # also keep the checkpoints of the k best epochs by early_stopping.monitor (a run's)
    return k


def finetune_config() -> ml_collections.ConfigDict:
    """Fine-tuning's groups (host/finetune.py), bottom to top: the model's top-level submodules, or `groups` by
    path pattern ("name=pattern,pattern"); those frozen throughout; the epoch each starts training (one per group;
    empty: all from epoch 1); each group's multiplier of the learning rate (empty: optimizer.layer_decay)."""
    return ml_collections.ConfigDict({"groups": (), "freeze": (), "unfreeze_epochs": (), "rate_scales": ()})


def logging_config() -> ml_collections.ConfigDict:
    """Where a run's rows go besides metrics.jsonl (host/writers.py): metrics.csv, TensorBoard event files under
    WORKDIR/tensorboard/, and an MLflow run (mlflow installed: pip install 'jaxepochs[mlflow]'); and whether the
    run ends by drawing curves.png (0.3-0.7 s of matplotlib a run: off where TensorBoard or MLflow shows them);
    `norms`: each epoch's mean over its steps of the global L2 norms of the gradient, the update and the
    parameters, as train_grad_norm, train_update_norm and train_param_norm (three reductions a step)."""
    c = ml_collections.ConfigDict()
    c.csv = True
    c.curves = True
    c.tensorboard = True
    c.mlflow = False
    c.mlflow_tracking_uri = ""  # "": $MLFLOW_TRACKING_URI, else ./mlruns
    c.mlflow_experiment = "jaxepochs"
    # A Weights & Biases run (wandb installed: pip install 'jaxepochs[wandb]'; host/wandb_writer.py).
    c.wandb = False
    c.wandb_project = "jaxepochs"
    c.wandb_dir = ""  # wandb.init's dir, its files in DIR/wandb/: "" = $WANDB_DIR, else the workdir
    c.wandb_mode = ""  # "offline" or "online" (needs `wandb login` or $WANDB_API_KEY): "" = $WANDB_MODE, else offline
    c.norms = False
    c.layer_norms = False  # the gradient's and the parameters' norms per top-level group (train_grad_norm_Dense_0)
    return c


def init_config() -> ml_collections.ConfigDict:
    """Where a run's parameters start: freshly initialised (from_workdir empty), or taken from another run's
    checkpoint (host/warm_start.py): its epoch ("last", "best" or a number) and fnmatch path patterns of the
    parameters taken (include, exclude) and of those initialised afresh (reinit: a new head)."""
    i = ml_collections.ConfigDict()
    i.from_workdir = ""
    i.epoch = "last"
    i.include = ()
    i.exclude = ()
    i.reinit = ()
    return i


def mesh_config() -> ml_collections.ConfigDict:
    """The device mesh (core/layout.py): a run splits each batch over `data` devices; a sweep splits its runs
    over `runs` devices and each run's batches over `data`. 0 chooses: a run puts every device on `data`, a
    sweep on `runs`. With shard_params the parameters and optimizer state are split over `data` too (FSDP)."""
    m = ml_collections.ConfigDict()
    m.data = 0
    m.runs = 0
    m.shard_params = False
    return m


def schedule_config() -> ml_collections.ConfigDict:
    """The keys of `optimizer.schedule`, with their defaults (optim.SCHEDULE_DEFAULTS: every length in epochs)."""
    return ml_collections.ConfigDict(dict(optim.SCHEDULE_DEFAULTS))


def early_stopping_config() -> ml_collections.ConfigDict:
    """The keys of the `early_stopping` section, with their defaults (core/early_stopping.py's EarlyStopping)."""
    e = ml_collections.ConfigDict()
    e.enabled = False
    e.monitor = "val_loss"
    e.mode = "auto"  # auto, min, max
    e.min_delta = 0.0
    e.patience = 0
    e.baseline = ml_collections.config_dict.placeholder(float)  # None: no baseline
    e.start_from_epoch = 0
    e.restore_best = False  # end with the best epoch's parameters
    e.rule = "patience"  # patience (Keras), gl, pq, up (Prechelt 1998)
    e.alpha = ml_collections.config_dict.placeholder(float)  # gl / pq threshold; None: default
    e.k = 5  # strip length (pq, up)
    e.strips = 1  # s of UP_s
    e.stop_on_nonfinite = True  # divergence guard: stop at a NaN/inf monitored value
    e.divergence_threshold = ml_collections.config_dict.placeholder(float)
    return e


def optimizer_config() -> ml_collections.ConfigDict:
    """The keys of the `optimizer` section, with their defaults (optim.OPTIMIZER_DEFAULTS)."""
    o = ml_collections.ConfigDict(dict(optim.OPTIMIZER_DEFAULTS))
    o.schedule = schedule_config()
    return o


def mnist1d_args() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(MNIST1D_ARGS))


def flatten(tree: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
    """{"train.epochs": 150, ...}: every field of a config (or any section, or dict of dicts) under its dotted key
    (tuples as lists, as in config.json)."""
    out = {}
    for key, value in tree.items() if hasattr(tree, "items") else []:
        if isinstance(value, ml_collections.ConfigDict | dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple | list) else value
    return out
