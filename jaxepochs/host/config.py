"""Experiment configs: the schema of known keys, loading `experiments/NAME.py`, and `--config.a.b=v` overrides.

Every experiment's `get_config()` starts from `base_config()` and changes what it needs. `validate` checks a
config against the schema, so a typo anywhere (a file, an override, the Python API) names the unknown key.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import pathlib
from collections.abc import Iterable

import ml_collections

from jaxepochs.core import early_stopping as early_stopping_lib
from jaxepochs.core import optim
from jaxepochs.data import MNIST1D_ARGS

MODELS = ("mlp", "cnn", "gru", "transformer")
TASKS = ("classification", "regression", "binary")  # core.task.TASKS
COMPUTE_DTYPES = ("float32", "bfloat16")
OPTIMIZERS = optim.OPTIMIZERS


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """Every key jaxepochs knows, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # What the model learns: classification (integer labels, cross-entropy, accuracy), regression (float targets,
    # mean squared error; mse, mae) or binary (0/1 labels, sigmoid cross-entropy, accuracy). An experiment
    # module's loss_fn and metrics_fn replace the task's.
    c.task = "classification"
    # The experiment module the config came from (written by load_config_file): its hooks (get_model, loss_fn,
    # metrics_fn, get_data, augment) are read from it, and config.json records it and a hash of its source.
    c.experiment = ml_collections.ConfigDict()
    c.experiment.module = ""
    c.experiment.source_sha256 = ""

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist1d"  # a built-in dataset (mnist1d, digits) or "tfds:<name>" for a prepared TFDS one
    c.data.data_dir = ""  # empty: $TFDS_DATA_DIR, else ~/tensorflow_datasets
    c.data.validation_fraction = 0.1  # held out of the training split, deterministically
    c.data.split_seed = 0  # seeds the validation split; independent of `seed` so runs share one split
    c.data.train_split = "train"  # TFDS split names, for tfds:<name> datasets
    c.data.test_split = "test"
    c.data.input_key = ""  # tfds:<name>: the feature that is the input; "" = the first of its supervised keys
    c.data.label_key = ""  # tfds:<name>: the feature that is the label; "" = the second of its supervised keys
    c.data.label_noise = 0.0  # fraction of training labels redrawn uniformly over the classes (seeded by split_seed)
    c.data.args = mnist1d_args()  # mnist1d only: the generator's get_dataset_args(); a variant is its own TFDS config
    # Streaming: None chooses (stream a dataset larger than device_memory_fraction of the device's free memory);
    # True streams the splits from the host a chunk of batches at a time; False keeps them on the device.
    c.data.stream = ml_collections.config_dict.placeholder(bool)
    c.data.device_memory_fraction = 0.5
    c.data.device_memory_bytes = 0  # the device memory the fraction is of; 0: measured (free memory now)
    c.data.modular = ml_collections.ConfigDict()  # modular_addition only: (a + b) mod p, each setting a TFDS config
    c.data.modular.modulus = 113
    c.data.modular.train_fraction = 0.3  # of the p * p pairs; the rest are the test split
    c.data.modular.seed = 0  # which pairs are for training

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.hidden_sizes = (100, 100)  # mlp: empty is logistic regression
    c.model.channels = (25, 25, 25)  # cnn
    c.model.kernel_sizes = (5, 3, 3)  # cnn
    c.model.strides = (2, 2, 2)  # cnn
    c.model.padding = 1  # cnn: zeros on each side of every convolution
    c.model.conv = "auto"  # cnn: "patches" (slices + one matmul), "native" (nn.Conv), "auto": patches on CPU only
    c.model.residual = False  # mlp: hidden layers after the first add their input (h = h + relu(W h)), as MNIST-1D's
    c.model.gru_hidden = 6  # gru: hidden size per direction
    c.model.bidirectional = True  # gru
    c.model.num_classes = 0  # 0: taken from the dataset
    c.model.d_model = 128  # transformer: one layer on token inputs (modular_addition); see models.Transformer1L
    c.model.num_heads = 4  # transformer: heads of d_model / num_heads each
    c.model.d_mlp = 512  # transformer: hidden units of its ReLU MLP
    c.model.vocab_size = 0  # transformer: tokens are 0..vocab_size-1; 0 means num_classes + 1
    # mlp, cnn, gru: flax's initialisers, or "torch": PyTorch's uniform +-1/sqrt(fan_in) (and, for gru, its cell)
    c.model.init = "flax"

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 150
    c.train.batch_size = 100
    c.train.shuffle = True  # False: every epoch takes the batches in dataset order (as MNIST-1D's notebook trains)
    c.train.eval_batch_size = 1000  # evaluation only; capped at the split size
    c.train.log_test = False  # also evaluate the test split every epoch (test_loss, test_accuracy in metrics.jsonl)
    c.train.test_every = 1  # with log_test: evaluate the test split every this many epochs (and after the last)
    c.train.validate_every = 1  # evaluate the validation split every this many epochs (and after the last)
    # Epochs per compiled call: 0 chooses them so the host meets the run about every host_interval_seconds (and
    # never past a due checkpoint or the last epoch); N > 0 runs N epochs per call. The rows are the same.
    c.train.epochs_per_call = 0
    c.train.host_interval_seconds = 0.5
    # Streamed epochs (data larger than the device, or data.stream = True): batches per compiled chunk, read and
    # put on the device while the chunk before trains; 0 chooses chunks of about 32 MB (at most an epoch).
    c.train.steps_per_call = 0
    # 0: an epoch is one pass over the training split. S > 0: an epoch is S steps of a stream that reads the split
    # round and round (each pass in its own order, every example once a pass); the epoch is then streamed.
    c.train.steps_per_epoch = 0
    # JAX's persistent compilation cache: a later run of the same shapes loads its programs instead of compiling
    # them. "" leaves JAX's own setting (off unless $JAX_COMPILATION_CACHE_DIR or jax.config sets it).
    c.train.compilation_cache_dir = "~/.cache/jaxepochs/xla"
    # "bfloat16": the forward and backward passes compute in bfloat16 (parameters, optimizer state, the loss and
    # the metrics stay float32); "float32": everything in float32.
    c.train.compute_dtype = "float32"
    # k > 1: each optimizer step sums the gradients of k micro-batches of batch_size / k rows (a scan inside the
    # step): the step of the whole batch in the memory of one micro-batch.
    c.train.accumulate_steps = 1
    c.train.profile_epochs = ()  # epochs traced by jax.profiler into WORKDIR/profile/ (each runs as a call alone)

    c.init = init_config()  # from_workdir, epoch, include, exclude, reinit: start from a run (host/warm_start.py)
    c.finetune = finetune_config()  # groups, freeze, unfreeze_epochs, rate_scales (host/finetune.py)
    c.mesh = mesh_config()  # data, runs, shard_params: where a run's arrays live (core/layout.py)

    c.optimizer = optimizer_config()  # name, learning_rate, momentum, b1, b2, weight_decay, clip_norm, schedule

    c.early_stopping = early_stopping_config()  # Keras's EarlyStopping, plus Prechelt's rules; see early_stopping.py

    c.logging = logging_config()  # csv, tensorboard, mlflow: where the rows go besides metrics.jsonl

    c.checkpoint = ml_collections.ConfigDict()  # orbax; rerunning in the workdir resumes from the newest one
    c.checkpoint.enabled = True
    c.checkpoint.every_epochs = 0  # 0: by time (every_seconds); always at the end, at a stop and at Ctrl-C
    c.checkpoint.every_seconds = 30.0
    c.checkpoint.every_steps = 0  # streamed epochs: also every this many steps inside an epoch (0: by time there)
    c.checkpoint.max_to_keep = 3
    return c


def finetune_config() -> ml_collections.ConfigDict:
    """Fine-tuning's groups (host/finetune.py), bottom to top: the model's top-level submodules, or `groups` by
    path pattern ("name=pattern,pattern"); those frozen throughout; the epoch each starts training (one per group;
    empty: all from epoch 1); each group's multiplier of the learning rate (empty: optimizer.layer_decay)."""
    return ml_collections.ConfigDict({"groups": (), "freeze": (), "unfreeze_epochs": (), "rate_scales": ()})


def logging_config() -> ml_collections.ConfigDict:
    """Where a run's rows go besides metrics.jsonl (host/writers.py): metrics.csv, TensorBoard event files under
    WORKDIR/tensorboard/, and an MLflow run (mlflow installed: pip install 'jaxepochs[mlflow]')."""
    c = ml_collections.ConfigDict()
    c.csv = True
    c.tensorboard = True
    c.mlflow = False
    c.mlflow_tracking_uri = ""  # "": $MLFLOW_TRACKING_URI, else ./mlruns
    c.mlflow_experiment = "jaxepochs"
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


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f' Did you mean "{close[0]}"?' if close else ""


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(
                f'Unknown config key "{path}".{_suggest(key, schema.keys())} '
                f"Known keys here: {', '.join(sorted(schema.keys()))}."
            )
        if isinstance(schema[key], ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f'Config key "{path}" is a section; set its fields, e.g. "{path}.<field>".')
            _check_keys(value, schema[key], path + ".")


def _fill_defaults(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
    for key, default in schema.items():
        if key not in config:
            config[key] = default
        elif isinstance(default, ml_collections.ConfigDict):
            _fill_defaults(config[key], default)


def _kind_problem(value, default) -> str | None:
    """Why `value` cannot stand where the schema has `default`, or None: whole numbers stay whole (True is not
    one, nor is 2.5), numbers stay numbers, flags stay flags, text stays text."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_number = lambda v: is_int(v) or isinstance(v, float)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "is not True or False"
    if is_int(default):
        return None if is_int(value) else "is not a whole number"
    if isinstance(default, float):
        return None if is_number(value) else "is not a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "is not a string"
    if isinstance(default, tuple | list) and default:
        if not isinstance(value, tuple | list):
            return "is not a tuple"
        element = default[0]
        return next((f"holds {v!r}, which {p}" for v in value if (p := _kind_problem(v, element))), None)
    return None


def _check_types(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
    for key, default in schema.items():
        value = config[key]
        if isinstance(default, ml_collections.ConfigDict):
            _check_types(value, default, f"{prefix}{key}.")
        elif default is not None and value is not None and (problem := _kind_problem(value, default)):
            _fail(f"{prefix}{key}", f"{value!r} {problem}", f"Use a value like the default, {default!r}.")


SEED_KEYS = ("seed", "data.split_seed", "data.modular.seed")


def _validate_seeds(config: ml_collections.ConfigDict) -> None:
    for key in SEED_KEYS:
        value = flatten(config)[key]
        if not 0 <= value < 2**32:
            _fail(key, f"{value!r} is out of range", "Use a seed from 0 to 2**32 - 1.")


def _fail(key: str, problem: str, fix: str):
    raise ConfigError(f"config.{key} = {problem}. {fix}")


def _validate_train(t: ml_collections.ConfigDict) -> None:
    if not isinstance(t.batch_size, int) or t.batch_size < 1:
        _fail("train.batch_size", f"{t.batch_size!r} is not a positive integer", "Use a batch size of 1 or more.")
    if not isinstance(t.eval_batch_size, int) or t.eval_batch_size < 1:
        _fail("train.eval_batch_size", f"{t.eval_batch_size!r} is not a positive integer", "Use 1 or more.")
    if not isinstance(t.epochs, int) or t.epochs < 0:
        _fail("train.epochs", f"{t.epochs!r} is negative", "Use 0 (evaluate only) or more epochs.")  # types: above
    if not isinstance(t.test_every, int) or t.test_every < 1:
        _fail("train.test_every", f"{t.test_every!r} is not a positive integer", "Use 1 or more.")
    for key in ("steps_per_call", "steps_per_epoch"):
        value, least = t[key], 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            _fail(f"train.{key}", f"{value!r} is not a whole number >= {least}", f"Use {least} or more steps.")
    if not isinstance(t.validate_every, int) or t.validate_every < 1:
        _fail("train.validate_every", f"{t.validate_every!r} is not a positive integer", "Use 1 or more.")
    if not isinstance(t.epochs_per_call, int) or t.epochs_per_call < 0:
        _fail(
            "train.epochs_per_call",
            f"{t.epochs_per_call!r} is not a whole number >= 0",
            "Use 0 (chosen from host_interval_seconds) or a number of epochs, 1 or more.",
        )
    if not t.host_interval_seconds > 0:
        _fail("train.host_interval_seconds", f"{t.host_interval_seconds!r}", "Use a positive number of seconds.")
    if t.compute_dtype not in COMPUTE_DTYPES:
        _fail("train.compute_dtype", f"{t.compute_dtype!r}{_suggest(t.compute_dtype, COMPUTE_DTYPES)}",
              f"Use one of {', '.join(COMPUTE_DTYPES)}.")  # fmt: skip
    if not isinstance(t.accumulate_steps, int) or t.accumulate_steps < 1:
        _fail("train.accumulate_steps", f"{t.accumulate_steps!r} is not a positive integer", "Use 1 (off) or more.")
    if t.batch_size % t.accumulate_steps:
        _fail(
            "train.accumulate_steps",
            f"{t.accumulate_steps} does not divide train.batch_size = {t.batch_size}",
            "Use a divisor of the batch size (each micro-batch is batch_size / accumulate_steps rows).",
        )
    bad = [e for e in t.profile_epochs if not isinstance(e, int) or isinstance(e, bool) or not 1 <= e <= t.epochs]
    if bad:
        _fail("train.profile_epochs", f"{tuple(t.profile_epochs)}", f"Name epochs of the run, 1 to {t.epochs}.")


def _validate_finetune(config: ml_collections.ConfigDict) -> None:
    decay, f = config.optimizer.layer_decay, config.finetune
    if not 0 < decay <= 1:
        _fail("optimizer.layer_decay", f"{decay!r}", "Use a factor in (0, 1]: 1 trains every group at one rate.")
    if f.rate_scales and decay != 1.0:
        _fail("finetune.rate_scales", f"{tuple(f.rate_scales)} with optimizer.layer_decay = {decay}", "Use one.")
    if any(not isinstance(r, int | float) or isinstance(r, bool) or r < 0 for r in f.rate_scales):
        _fail("finetune.rate_scales", f"{tuple(f.rate_scales)}", "Use one multiplier of 0 or more per group.")
    names = [str(spec).partition("=")[0].strip() for spec in f.groups]
    for spec, name in zip(f.groups, names, strict=True):
        if "=" not in str(spec) or not name or not str(spec).partition("=")[2].strip(", "):
            _fail(
                "finetune.groups",
                f"{tuple(f.groups)}",
                f'{spec!r} is not "name=pattern[,pattern]" (e.g. "head=Dense_2/*").',
            )
    if len(set(names)) != len(names):
        _fail("finetune.groups", f"{tuple(f.groups)}", "Give each group its own name.")
    if f.groups and not (f.freeze or f.unfreeze_epochs or f.rate_scales or decay != 1.0):
        _fail(
            "finetune.groups",
            f"{tuple(f.groups)}, which nothing uses",
            "Set finetune.freeze, finetune.unfreeze_epochs, finetune.rate_scales or optimizer.layer_decay, or drop it.",
        )


def _validate_init(init: ml_collections.ConfigDict) -> None:
    if init.epoch not in ("last", "best") and not str(init.epoch).isdigit():
        _fail("init.epoch", f"{init.epoch!r}", 'Use "last", "best" or the number of an epoch with a checkpoint.')
    if not init.from_workdir and (any(init[key] for key in ("include", "exclude", "reinit")) or init.epoch != "last"):
        _fail(
            "init.from_workdir",
            '"", while init.include/exclude/reinit/epoch select what a run takes from it',
            "Set init.from_workdir to the workdir of the run to start from, or leave init at its defaults.",
        )


def _validate_mesh(m: ml_collections.ConfigDict) -> None:
    for key in ("data", "runs"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 0:
            _fail(f"mesh.{key}", f"{m[key]!r} is not a whole number >= 0", "Use 0 (chosen) or a number of devices.")


def _validate_model(m: ml_collections.ConfigDict) -> None:
    if m.name not in MODELS:
        _fail("model.name", f'"{m.name}" is not a known model{_suggest(m.name, MODELS)}', f"Use one of {MODELS}.")
    if m.name == "cnn":
        n = len(m.channels)
        if n == 0 or len(m.kernel_sizes) != n or len(m.strides) != n:
            _fail(
                "model.channels/kernel_sizes/strides",
                f"{tuple(m.channels)}/{tuple(m.kernel_sizes)}/{tuple(m.strides)}",
                "Give one kernel size and one stride per convolution, and at least one convolution.",
            )
    convs = ("auto", "patches", "native")
    if m.conv not in convs:
        _fail("model.conv", f'"{m.conv}"{_suggest(m.conv, convs)}', 'Use "auto", "patches" or "native".')
    if m.init not in ("flax", "torch"):
        _fail("model.init", f'"{m.init}"{_suggest(m.init, ("flax", "torch"))}', 'Use "flax" or "torch".')
    if any(int(h) < 1 for h in m.hidden_sizes):
        _fail("model.hidden_sizes", f"{tuple(m.hidden_sizes)}", "Every hidden size must be 1 or more.")
    if m.name == "transformer" and (m.d_model % m.num_heads or min(m.d_model, m.num_heads, m.d_mlp) < 1):
        _fail(
            "model.d_model/num_heads/d_mlp",
            f"{m.d_model}/{m.num_heads}/{m.d_mlp}",
            "Use positive sizes with d_model divisible by num_heads.",
        )


def _validate_data(d: ml_collections.ConfigDict) -> None:
    if not 0.0 <= d.validation_fraction < 1.0:
        _fail("data.validation_fraction", f"{d.validation_fraction!r}", "Use a fraction in [0, 1).")
    if not 0.0 < d.device_memory_fraction <= 1.0:
        _fail("data.device_memory_fraction", f"{d.device_memory_fraction!r}", "Use a fraction in (0, 1].")
    if not isinstance(d.device_memory_bytes, int) or d.device_memory_bytes < 0:
        _fail("data.device_memory_bytes", f"{d.device_memory_bytes!r}", "Use 0 (measured) or a number of bytes.")
    if not 0.0 <= d.label_noise <= 1.0:
        _fail("data.label_noise", f"{d.label_noise!r}", "Use a fraction of labels in [0, 1].")
    if d.name != "mnist1d" and flatten(d.args) != flatten(mnist1d_args()):
        _fail("data.args", f"{d.args.to_dict()}", f'It configures the mnist1d generator, but data.name is "{d.name}".')
    q = d.modular
    if d.name == "modular_addition" and (q.modulus < 2 or not 0.0 < q.train_fraction < 1.0):
        _fail(
            "data.modular",
            f"modulus={q.modulus}, train_fraction={q.train_fraction}",
            "Use a modulus of 2 or more and a train_fraction in (0, 1).",
        )
    a = d.args
    if d.name == "mnist1d" and (a.num_samples < 10 or not 0.0 < a.train_split < 1.0):
        _fail(
            "data.args",
            f"num_samples={a.num_samples}, train_split={a.train_split}",
            "Use num_samples >= 10 (one per class) and train_split in (0, 1).",
        )


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with defaults filled in; raises ConfigError naming any problem. A plain dict
    is taken as the ConfigDict it spells (missing keys at their defaults)."""
    schema = base_config()
    if not isinstance(config, ml_collections.ConfigDict | dict):
        raise TypeError(
            f"config is {type(config).__name__}; pass an ml_collections.ConfigDict (an experiment module's "
            "get_config(), or jaxepochs.base_config() with your changes) or a dict of the same keys."
        )
    config = ml_collections.ConfigDict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    _check_keys(config, schema, "")
    _fill_defaults(config, schema)
    _check_types(config, schema, "")
    _validate_seeds(config)
    _validate_train(config.train)
    _validate_model(config.model)
    if config.task not in TASKS:
        _fail("task", f'"{config.task}" is not a known task{_suggest(config.task, TASKS)}', f"Use one of {TASKS}.")
    o = config.optimizer
    if o.name not in OPTIMIZERS:
        _fail(
            "optimizer.name",
            f'"{o.name}" is not a known optimizer{_suggest(o.name, OPTIMIZERS)}',
            f"Use one of {OPTIMIZERS}.",
        )
    if not o.learning_rate > 0:
        _fail("optimizer.learning_rate", f"{o.learning_rate!r}", "The learning rate must be positive.")
    _validate_data(config.data)
    _validate_mesh(config.mesh)
    _validate_init(config.init)
    _validate_finetune(config)
    try:
        optim.validate_schedule(o.schedule.to_dict(), config.train.epochs)
        names = _task_metrics(config)
        if config.early_stopping.enabled and names:  # a module's metrics_fn: checked once its names are known
            make_early_stopping(config.early_stopping, config.data.validation_fraction > 0, names)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_strips(config)
    k = config.checkpoint
    if k.every_epochs < 0 or k.every_seconds < 0 or k.max_to_keep < 1:
        _fail(
            "checkpoint",
            f"every_epochs={k.every_epochs}, every_seconds={k.every_seconds}, max_to_keep={k.max_to_keep}",
            "Use every_epochs >= 0, every_seconds >= 0 and max_to_keep >= 1.",
        )
    return config


def _validate_strips(config: ml_collections.ConfigDict) -> None:
    """Prechelt's pq and up measure at strip ends, every k epochs after start_from_epoch: on a validation metric
    those must be epochs that validate (a strip end without a value is not measured)."""
    e, n = config.early_stopping, config.train.validate_every
    if not (e.enabled and e.rule in ("pq", "up") and e.monitor.startswith("val_") and n > 1):
        return
    if e.k % n or e.start_from_epoch % n:
        _fail(
            "early_stopping.k",
            f"{e.k} (start_from_epoch {e.start_from_epoch}) ends strips on epochs that train.validate_every = {n} "
            f'does not validate (rule "{e.rule}" measures {e.monitor} at strip ends)',
            f"Use k and start_from_epoch multiples of {n}, or train.validate_every = 1.",
        )


def make_early_stopping(
    es_config: ml_collections.ConfigDict, has_validation: bool = True, metric_names=("loss", "accuracy")
):
    """The EarlyStopping of an `early_stopping` section; ConfigError naming the key and the valid choices. The
    monitor is one of the logged metrics: train_<name> or (with a validation split) val_<name>."""
    splits = ("train", "val") if has_validation else ("train",)
    available = tuple(f"{split}_{name}" for split in splits for name in metric_names)
    fields = {key: value for key, value in es_config.items() if key != "enabled"}
    try:
        return early_stopping_lib.EarlyStopping(**fields, known_monitors=available)
    except ValueError as e:
        raise ConfigError(f"config.early_stopping: {e}") from None


def _tuples_where_the_schema_has_them(value, schema):
    if isinstance(schema, ml_collections.ConfigDict) and isinstance(value, dict):
        return {k: _tuples_where_the_schema_has_them(v, schema[k]) if k in schema else v for k, v in value.items()}
    if isinstance(schema, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def from_json(text: str) -> ml_collections.ConfigDict:
    """A config.json read back as the config that wrote it (JSON has lists where the config had tuples)."""
    return validate(ml_collections.ConfigDict(_tuples_where_the_schema_has_them(json.loads(text), base_config())))


TASK_METRICS = {  # "loss" and the built-in tasks' metrics (core/task.py)
    "classification": ("loss", "accuracy"),
    "regression": ("loss", "mae", "mse"),
    "binary": ("loss", "accuracy"),
}


def _task_metrics(config) -> tuple[str, ...] | None:
    """The metrics' names, where the config alone tells them (None when the module gives its own metrics_fn)."""
    path = config.experiment.module
    if path and pathlib.Path(path).is_file() and hasattr(import_experiment(path), "metrics_fn"):
        return None
    return TASK_METRICS[config.task]


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports an experiment module by path and returns its validated `get_config()`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"No experiment module at {path}. Pass a file such as experiments/mnist1d_mlp.py.")
    module = import_experiment(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(); an experiment module must define one.")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}; return jaxepochs.base_config().")
    config.experiment = ml_collections.ConfigDict(
        {"module": str(path.resolve()), "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    )
    return validate(config)


def import_experiment(path: str | pathlib.Path):
    """The experiment module at `path`, imported (once per path and source: edits are seen)."""
    path = pathlib.Path(path).resolve()
    source = path.read_bytes()
    key = (str(path), hashlib.sha256(source).hexdigest())
    if key not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"jaxepochs_experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return _MODULES[key]


_MODULES: dict = {}


def _parse_value(text: str, current):
    """Parses an override's text into the type of the field it replaces."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
    elif isinstance(current, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(current, tuple | list):
        if isinstance(value, int | float):
            value = (value,)
        if isinstance(value, tuple | list):
            return type(current)(value)
    elif current is None:
        return value
    kind = {"int": "a whole number", "float": "a number", "bool": "True or False"}.get(type(current).__name__)
    raise ConfigError(f'cannot read "{text}" as {kind or "a " + type(current).__name__}')


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
    """{"train.epochs": 150, ...}: every field under its dotted key (tuples as lists, as in config.json)."""
    out = {}
    for key, value in config.items() if hasattr(config, "items") else []:
        if isinstance(value, ml_collections.ConfigDict | dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple | list) else value
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Applies {"train.epochs": "5", ...} as the CLI's `--config.train.epochs=5`, then validates."""
    config = validate(config)
    for dotted, text in overrides.items():
        parent, node, parts = None, config, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(parts[:i]) or "the config"
                raise ConfigError(
                    f'Unknown config key "{dotted}" in --config.{dotted}={text}: '
                    f'"{part}" is not a field of {where}.{_suggest(part, known)}'
                )
            parent, node = node, node[part]
        if isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{dotted} names a section; override one of its fields instead.")
        try:
            parent[parts[-1]] = _parse_value(text, node)
        except ConfigError as e:
            raise ConfigError(f"--config.{dotted}={text}: {e} (the field's current value is {node!r}).") from None
    return validate(config)
