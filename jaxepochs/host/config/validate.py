"""Checking a config against the schema: a typo anywhere (a file, an override, the Python API) names the unknown
key, and a value that cannot run names the key and the fix. Pure: nothing is imported or read.
"""

from __future__ import annotations

import ml_collections

from jaxepochs.core import optax_optim, optim
from jaxepochs.core.task import TASKS
from jaxepochs.host.config import stopping
from jaxepochs.host.config.errors import ConfigError, fail, one_of, suggest
from jaxepochs.host.config.schema import base_config, flatten, mnist1d_args
from jaxepochs.models import CONVS, INITS, MODELS

COMPUTE_DTYPES = ("float32", "bfloat16")
OPTIMIZERS = (*optim.OPTIMIZERS, *optax_optim.NAMES)


def _check_keys(section: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
    for key, value in section.items():
        path = f"{prefix}{key}"
        if path == "hparams":  # the experiment's own keys: any it declares
            _check_hparams(value)
            continue
        if key not in schema:
            raise ConfigError(
                f'Unknown config key "{path}".{suggest(key, schema.keys())} '
                f"Known keys here: {', '.join(sorted(schema.keys()))}."
            )
        if isinstance(schema[key], ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f'Config key "{path}" is a section; set its fields, e.g. "{path}.<field>".')
            _check_keys(value, schema[key], path + ".")


def _check_hparams(section) -> None:
    """config.hparams: a section of the experiment's own values (numbers, flags, text, tuples of them)."""
    if not isinstance(section, ml_collections.ConfigDict):
        raise ConfigError('Config key "hparams" is a section; set its fields, e.g. config.hparams.weight = 0.5.')
    for key, value in section.items():
        atoms = value if isinstance(value, tuple | list) else (value,)
        if not key.isidentifier() or not all(isinstance(a, int | float | bool | str) for a in atoms):
            fail(
                f"hparams.{key}",
                f"{value!r}",
                "Give numbers, True/False, text or tuples of them, named by identifiers.",
            )


def _validate_class_weight(t, task: str) -> None:
    w = t.class_weight
    if w is None:
        return
    if w != "balanced" and not (isinstance(w, tuple | list) and w and all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in w)):  # fmt: skip
        fail("train.class_weight", f"{w!r}", 'Use None, "balanced", or one weight >= 0 per class, e.g. (1.0, 5.0).')
    if task != "classification":
        fail("train.class_weight", f"{w!r} with task {task!r}", "Class weights weight the classification loss only.")


def _fill_defaults(section: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
    for key, default in schema.items():
        if key not in section:
            section[key] = default
        elif isinstance(default, ml_collections.ConfigDict):
            _fill_defaults(section[key], default)


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


def _check_types(section: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
    for key, default in schema.items():
        value = section[key]
        if isinstance(default, ml_collections.ConfigDict):
            _check_types(value, default, f"{prefix}{key}.")
        elif default is not None and value is not None and (problem := _kind_problem(value, default)):
            fail(f"{prefix}{key}", f"{value!r} {problem}", f"Use a value like the default, {default!r}.")


SEED_KEYS = ("seed", "data.split_seed", "data.modular.seed")


def _validate_seeds(flat: dict) -> None:
    for key in SEED_KEYS:
        value = flat[key]
        if not 0 <= value < 2**32:
            fail(key, f"{value!r} is out of range", "Use a seed from 0 to 2**32 - 1.")


def _validate_train(t: ml_collections.ConfigDict) -> None:
    if not isinstance(t.batch_size, int) or t.batch_size < 1:
        fail("train.batch_size", f"{t.batch_size!r} is not a positive integer", "Use a batch size of 1 or more.")
    if not isinstance(t.eval_batch_size, int) or t.eval_batch_size < 1:
        fail("train.eval_batch_size", f"{t.eval_batch_size!r} is not a positive integer", "Use 1 or more.")
    if not isinstance(t.epochs, int) or t.epochs < 0:
        fail("train.epochs", f"{t.epochs!r} is negative", "Use 0 (evaluate only) or more epochs.")  # types: above
    if not isinstance(t.test_every, int) or t.test_every < 1:
        fail("train.test_every", f"{t.test_every!r} is not a positive integer", "Use 1 or more.")
    for key in ("steps_per_call", "steps_per_epoch"):
        value, least = t[key], 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            fail(f"train.{key}", f"{value!r} is not a whole number >= {least}", f"Use {least} or more steps.")
    if not isinstance(t.validate_every, int) or t.validate_every < 1:
        fail("train.validate_every", f"{t.validate_every!r} is not a positive integer", "Use 1 or more.")
    for entry in t.eval_every:
        name, eq, n = str(entry).partition("=")
        if not (eq and name.strip() and n.strip().isdigit() and int(n) >= 1):
            fail("train.eval_every", f"entry {entry!r}", 'Give "name=N" per evaluation set, N >= 1: ("shifted=5",).')
    if not isinstance(t.epochs_per_call, int) or t.epochs_per_call < 0:
        fail(
            "train.epochs_per_call",
            f"{t.epochs_per_call!r} is not a whole number >= 0",
            "Use 0 (chosen from host_interval_seconds) or a number of epochs, 1 or more.",
        )
    if not t.host_interval_seconds > 0:
        fail("train.host_interval_seconds", f"{t.host_interval_seconds!r}", "Use a positive number of seconds.")
    if t.compute_dtype not in COMPUTE_DTYPES:
        fail("train.compute_dtype", f"{t.compute_dtype!r}{suggest(t.compute_dtype, COMPUTE_DTYPES)}",
              f"Use one of {', '.join(COMPUTE_DTYPES)}.")  # fmt: skip
    if not isinstance(t.accumulate_steps, int) or t.accumulate_steps < 1:
        fail("train.accumulate_steps", f"{t.accumulate_steps!r} is not a positive integer", "Use 1 (off) or more.")
    if t.batch_size % t.accumulate_steps:
        fail(
            "train.accumulate_steps",
            f"{t.accumulate_steps} does not divide train.batch_size = {t.batch_size}",
            "Use a divisor of the batch size (each micro-batch is batch_size / accumulate_steps rows).",
        )
    bad = [e for e in t.profile_epochs if not isinstance(e, int) or isinstance(e, bool) or not 1 <= e <= t.epochs]
    if bad:
        fail("train.profile_epochs", f"{tuple(t.profile_epochs)}", f"Name epochs of the run, 1 to {t.epochs}.")


EVAL_WEIGHTS = ("", "ema", "swa", "both", "trained")


def _validate_averages(t: ml_collections.ConfigDict, optimizer_name: str) -> None:
    """train.ema_decay, train.swa_start_epoch and train.eval_weights (core/averages.py)."""
    decay, start = t.ema_decay, t.swa_start_epoch
    if not isinstance(decay, int | float) or isinstance(decay, bool) or not 0 <= decay < 1:
        fail("train.ema_decay", f"{decay!r}", "Use 0 (no average) or a decay in (0, 1), e.g. 0.999.")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        fail("train.swa_start_epoch", f"{start!r}", "Use 0 (no average) or the first epoch to average, 1 or more.")
    if decay and start:
        fail("train.swa_start_epoch", f"{start} with train.ema_decay = {decay}", "Keep one average: set one to 0.")
    if t.eval_weights not in EVAL_WEIGHTS:
        fail("train.eval_weights", f"{t.eval_weights!r}{suggest(t.eval_weights, EVAL_WEIGHTS[1:])}",
             'Use "ema" or "swa" (the average), "both", "trained", or "" (the average if one is kept).')  # fmt: skip
    for name, key, value in (("ema", "train.ema_decay", decay), ("swa", "train.swa_start_epoch", start)):
        if t.eval_weights == name and not value:
            fail("train.eval_weights", f'"{name}" with {key} = 0', f"Set {key} to keep the average.")
    if t.eval_weights == "both" and not (decay or start):
        fail("train.eval_weights", '"both" without an average', "Set train.ema_decay or train.swa_start_epoch.")
    if (decay or start) and optimizer_name == "schedule_free_adamw":
        key = "train.ema_decay" if decay else "train.swa_start_epoch"
        fail(key, f"{decay or start} with optimizer schedule_free_adamw",
             f"Schedule-free AdamW evaluates an average of its own; drop {key}.")  # fmt: skip


def _validate_finetune(f: ml_collections.ConfigDict, decay: float) -> None:
    """The finetune section `f`, and optimizer.layer_decay (`decay`) beside it."""
    if not 0 < decay <= 1:
        fail("optimizer.layer_decay", f"{decay!r}", "Use a factor in (0, 1]: 1 trains every group at one rate.")
    if f.rate_scales and decay != 1.0:
        fail("finetune.rate_scales", f"{tuple(f.rate_scales)} with optimizer.layer_decay = {decay}", "Use one.")
    if any(not isinstance(r, int | float) or isinstance(r, bool) or r < 0 for r in f.rate_scales):
        fail("finetune.rate_scales", f"{tuple(f.rate_scales)}", "Use one multiplier of 0 or more per group.")
    names = [str(spec).partition("=")[0].strip() for spec in f.groups]
    for spec, name in zip(f.groups, names, strict=True):
        if "=" not in str(spec) or not name or not str(spec).partition("=")[2].strip(", "):
            fail(
                "finetune.groups",
                f"{tuple(f.groups)}",
                f'{spec!r} is not "name=pattern[,pattern]" (e.g. "head=Dense_2/*").',
            )
    if len(set(names)) != len(names):
        fail("finetune.groups", f"{tuple(f.groups)}", "Give each group its own name.")
    if f.groups and not (f.freeze or f.unfreeze_epochs or f.rate_scales or decay != 1.0):
        fail(
            "finetune.groups",
            f"{tuple(f.groups)}, which nothing uses",
            "Set finetune.freeze, finetune.unfreeze_epochs, finetune.rate_scales or optimizer.layer_decay, or drop it.",
        )


def _validate_init(init: ml_collections.ConfigDict) -> None:
    if init.epoch not in ("last", "best") and not str(init.epoch).isdigit():
        fail("init.epoch", f"{init.epoch!r}", 'Use "last", "best" or the number of an epoch with a checkpoint.')
    if not init.from_workdir and (any(init[key] for key in ("include", "exclude", "reinit")) or init.epoch != "last"):
        fail(
            "init.from_workdir",
            '"", while init.include/exclude/reinit/epoch select what a run takes from it',
            "Set init.from_workdir to the workdir of the run to start from, or leave init at its defaults.",
        )


WANDB_MODES = ("offline", "online")  # and "": $WANDB_MODE, else offline (host/wandb_writer.py)


def _validate_logging(g: ml_collections.ConfigDict) -> None:
    if g.wandb_mode not in ("", *WANDB_MODES):
        fail("logging.wandb_mode", f'"{g.wandb_mode}"{suggest(g.wandb_mode, WANDB_MODES)}',
             f'Use {one_of(WANDB_MODES)} (online needs `wandb login` or $WANDB_API_KEY), or "" ($WANDB_MODE, else '
             '"offline").')  # fmt: skip


def _validate_mesh(m: ml_collections.ConfigDict) -> None:
    for key in ("data", "runs"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 0:
            fail(f"mesh.{key}", f"{m[key]!r} is not a whole number >= 0", "Use 0 (chosen) or a number of devices.")


def _validate_model(m: ml_collections.ConfigDict) -> None:
    if m.name not in MODELS:
        fail("model.name", f'"{m.name}" is not a known model{suggest(m.name, MODELS)}', f"Use one of {MODELS}.")
    if m.name == "cnn":
        n = len(m.channels)
        if n == 0 or len(m.kernel_sizes) != n or len(m.strides) != n:
            fail(
                "model.channels/kernel_sizes/strides",
                f"{tuple(m.channels)}/{tuple(m.kernel_sizes)}/{tuple(m.strides)}",
                "Give one kernel size and one stride per convolution, and at least one convolution.",
            )
    if m.conv not in CONVS:
        fail("model.conv", f'"{m.conv}"{suggest(m.conv, CONVS)}', f"Use {one_of(CONVS)}.")
    if m.init not in INITS:
        fail("model.init", f'"{m.init}"{suggest(m.init, INITS)}', f"Use {one_of(INITS)}.")
    if any(int(h) < 1 for h in m.hidden_sizes):
        fail("model.hidden_sizes", f"{tuple(m.hidden_sizes)}", "Every hidden size must be 1 or more.")
    if m.name == "transformer" and (m.d_model % m.num_heads or min(m.d_model, m.num_heads, m.d_mlp) < 1):
        fail(
            "model.d_model/num_heads/d_mlp",
            f"{m.d_model}/{m.num_heads}/{m.d_mlp}",
            "Use positive sizes with d_model divisible by num_heads.",
        )


def _validate_data(d: ml_collections.ConfigDict) -> None:
    if not 0.0 <= d.validation_fraction < 1.0:
        fail("data.validation_fraction", f"{d.validation_fraction!r}", "Use a fraction in [0, 1).")
    if not 0.0 < d.device_memory_fraction <= 1.0:
        fail("data.device_memory_fraction", f"{d.device_memory_fraction!r}", "Use a fraction in (0, 1].")
    if not isinstance(d.device_memory_bytes, int) or d.device_memory_bytes < 0:
        fail("data.device_memory_bytes", f"{d.device_memory_bytes!r}", "Use 0 (measured) or a number of bytes.")
    if not 0.0 <= d.label_noise <= 1.0:
        fail("data.label_noise", f"{d.label_noise!r}", "Use a fraction of labels in [0, 1].")
    if d.name != "mnist1d" and flatten(d.args) != flatten(mnist1d_args()):
        fail("data.args", f"{d.args.to_dict()}", f'It configures the mnist1d generator, but data.name is "{d.name}".')
    q = d.modular
    if d.name == "modular_addition" and (q.modulus < 2 or not 0.0 < q.train_fraction < 1.0):
        fail(
            "data.modular",
            f"modulus={q.modulus}, train_fraction={q.train_fraction}",
            "Use a modulus of 2 or more and a train_fraction in (0, 1).",
        )
    a = d.args
    if d.name == "mnist1d" and (a.num_samples < 10 or not 0.0 < a.train_split < 1.0):
        fail(
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
    _validate_seeds(flatten(config))
    _validate_train(config.train)
    _validate_averages(config.train, config.optimizer.name)
    _validate_class_weight(config.train, config.task)
    _validate_model(config.model)
    if config.task not in TASKS:
        fail("task", f'"{config.task}" is not a known task{suggest(config.task, TASKS)}', f"Use one of {TASKS}.")
    o = config.optimizer
    if o.name not in OPTIMIZERS:
        fail(
            "optimizer.name",
            f'"{o.name}" is not a known optimizer{suggest(o.name, OPTIMIZERS)}',
            f"Use one of {OPTIMIZERS}.",
        )
    if not o.learning_rate > 0:
        fail("optimizer.learning_rate", f"{o.learning_rate!r}", "The learning rate must be positive.")
    _validate_data(config.data)
    _validate_mesh(config.mesh)
    _validate_init(config.init)
    _validate_logging(config.logging)
    _validate_finetune(config.finetune, config.optimizer.layer_decay)
    try:
        optim.validate_schedule(o.schedule.to_dict(), config.train.epochs)
        es, has_val = config.early_stopping, config.data.validation_fraction > 0
        # With an experiment module, a monitor of its metrics is checked where their names are known: hooks.py.
        stopping.check(es, has_val, stopping.known_names(config.task, config.experiment.module, es.monitor, has_val))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stopping.check_strips(config.early_stopping, config.train.validate_every, config.train.eval_every)
    k = config.checkpoint
    if k.every_epochs < 0 or k.every_seconds < 0 or k.max_to_keep < 1 or k.keep_best < 0:
        fail(
            "checkpoint",
            f"every_epochs={k.every_epochs}, every_seconds={k.every_seconds}, max_to_keep={k.max_to_keep}, "
            f"keep_best={k.keep_best}",
            "Use every_epochs >= 0, every_seconds >= 0, max_to_keep >= 1 and keep_best >= 0.",
        )
    return config
