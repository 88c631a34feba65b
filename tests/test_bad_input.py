"""Bad configs, data and command lines fail early, with a message that names the problem and the fix."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest
from conftest import EXPERIMENT, tiny_config

import jaxepochs
from jaxepochs import cli
from jaxepochs.data.loading import DataError, Split, check_split, load_dataset, split_validation
from jaxepochs.host.config import ConfigError, apply_overrides, base_config, load_config_file, validate

# --- configs ------------------------------------------------------------------------------------------------


def test_unknown_override_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r'"train\.epoch".*Did you mean "epochs"'):
        apply_overrides(base_config(), {"train.epoch": "5"})


def test_unknown_override_section():
    with pytest.raises(ConfigError, match=r'"trian\.epochs".*Did you mean "train"'):
        apply_overrides(base_config(), {"trian.epochs": "5"})


def test_override_of_a_section_is_refused():
    with pytest.raises(ConfigError, match=r"--config\.train names a section"):
        apply_overrides(base_config(), {"train": "5"})


def test_unknown_key_in_a_config_given_to_validate():
    config = base_config()
    config.optimizer.learnig_rate = 0.1  # a typo adds a new field to an unlocked ConfigDict
    with pytest.raises(ConfigError, match=r'Unknown config key "optimizer\.learnig_rate".*"learning_rate"'):
        validate(config)


def test_unknown_top_level_key_given_to_validate():
    config = base_config()
    config.sed = 3
    with pytest.raises(ConfigError, match=r'Unknown config key "sed".*Did you mean "seed"'):
        validate(config)


def test_validate_fills_in_defaults_for_missing_keys():
    config = base_config()
    del config.train["eval_batch_size"]
    assert validate(config).train.eval_batch_size == base_config().train.eval_batch_size


def test_unknown_model_name():
    with pytest.raises(ConfigError, match=r'model\.name = "resnet" is not a known model'):
        apply_overrides(base_config(), {"model.name": "resnet"})


def test_unknown_optimizer_suggests_one():
    with pytest.raises(ConfigError, match=r'"adm" is not a known optimizer.*Did you mean "adam"'):
        apply_overrides(base_config(), {"optimizer.name": "adm"})


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("train.batch_size", "0", r"train\.batch_size = 0 is not a positive integer"),
        ("train.batch_size", "-3", r"train\.batch_size = -3 is not a positive integer"),
        ("train.eval_batch_size", "0", r"train\.eval_batch_size = 0"),
        ("train.epochs", "-1", r"train\.epochs = -1 is negative"),
        ("optimizer.learning_rate", "0", r"optimizer\.learning_rate.*must be positive"),
        ("data.validation_fraction", "1.0", r"data\.validation_fraction.*\[0, 1\)"),
        ("model.hidden_sizes", "(16, 0)", r"model\.hidden_sizes.*1 or more"),
    ],
)
def test_out_of_range_values(key, value, words):
    with pytest.raises(ConfigError, match=words):
        apply_overrides(base_config(), {key: value})


def test_cnn_needs_one_kernel_and_stride_per_convolution():
    with pytest.raises(ConfigError, match=r"one kernel size and one stride per convolution"):
        apply_overrides(base_config(), {"model.name": "cnn", "model.channels": "(4, 4)"})


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("train.epochs", "abc", r'train\.epochs=abc: cannot read "abc" as a whole number'),
        ("train.batch_size", "2.5", r'cannot read "2\.5" as a whole number'),
        ("optimizer.learning_rate", "fast", r'cannot read "fast" as a number'),
        ("model.hidden_sizes", "wide", r'cannot read "wide" as a tuple'),
    ],
)
def test_override_value_of_the_wrong_type(key, value, words):
    with pytest.raises(ConfigError, match=words):
        apply_overrides(base_config(), {key: value})


@pytest.mark.parametrize(
    "text, expected",
    [("(16,)", (16,)), ("()", ()), ("16", (16,)), ("(32, 8)", (32, 8)), ("[4, 2]", (4, 2))],
)
def test_tuple_overrides(text, expected):
    assert apply_overrides(base_config(), {"model.hidden_sizes": text}).model.hidden_sizes == expected


def test_overrides_keep_field_types():
    config = apply_overrides(base_config(), {"optimizer.learning_rate": "1", "train.epochs": "7", "data.name": "7"})
    assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
    assert config.train.epochs == 7
    assert config.data.name == "7"  # strings are taken as written


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="No experiment module"):
        load_config_file(tmp_path / "nope.py")


def test_experiment_without_get_config(tmp_path):
    module = tmp_path / "empty_experiment.py"
    module.write_text("X = 1\n")
    with pytest.raises(ConfigError, match=r"has no get_config\(\)"):
        load_config_file(module)


def test_experiment_file_is_valid():
    config = load_config_file(EXPERIMENT)
    assert config.data.name == "mnist1d" and config.model.hidden_sizes == (100, 100)


# --- data ---------------------------------------------------------------------------------------------------


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DataError, match=r'Unknown dataset "mnist2d".*digits, mnist1d.*tfds:<name>'):
        jaxepochs.train_and_evaluate(tiny_config({"data.name": "mnist2d"}), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_batch_larger_than_the_training_set(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size = 5000 is larger than the 3600 training examples"):
        jaxepochs.train_and_evaluate(tiny_config({"train.batch_size": "5000"}), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_labels_out_of_range_name_the_classes():
    with pytest.raises(DataError, match=r"labels span \[0, 9\] but the model has 5 classes.*at least 10"):
        load_dataset(tiny_config({"model.num_classes": "5"}))


def test_tfds_dataset_not_prepared(tmp_path):
    config = tiny_config({"data.name": "tfds:mnist", "data.data_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r'TFDS dataset "mnist" is not prepared in .*download_and_prepare'):
        load_dataset(config)


def test_tfds_dataset_that_does_not_exist(tmp_path):
    config = tiny_config({"data.name": "tfds:no_such_dataset_xyz", "data.data_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r'TFDS has no dataset "no_such_dataset_xyz"'):
        load_dataset(config)


def test_tfds_split_that_does_not_exist():
    with pytest.raises(DataError, match=r'no split "validation".*data\.train_split'):
        load_dataset(tiny_config({"data.train_split": "validation"}))


def _split(n_x: int, n_y: int, classes: int = 3) -> Split:
    x = np.zeros((n_x, 4), np.float32)
    y = np.arange(n_y, dtype=np.int32) % classes
    return Split(x, y)


def test_check_split_lengths():
    with pytest.raises(DataError, match=r"train: 10 inputs but 9 labels"):
        check_split(_split(10, 9), 3, "train")


def test_check_split_labels_shape():
    split = Split(np.zeros((4, 2), np.float32), np.zeros((4, 1), np.int32))
    with pytest.raises(DataError, match=r"labels have shape \(4, 1\)"):
        check_split(split, 3, "train")


def test_check_split_negative_labels():
    split = Split(np.zeros((3, 2), np.float32), np.asarray([0, -1, 2], np.int32))
    with pytest.raises(DataError, match=r"labels span \[-1, 2\]"):
        check_split(split, 3, "test")


def test_check_split_non_finite_inputs():
    split = _split(6, 6)
    split.x[2, 1] = np.nan
    with pytest.raises(DataError, match="NaN or inf"):
        check_split(split, 3, "train")


def test_check_split_accepts_good_data():
    assert check_split(_split(6, 6), 3, "train") is None  # returns quietly: no DataError
    assert check_split(_split(0, 0), 3, "empty") is None


def test_validation_fraction_that_leaves_nothing():
    with pytest.raises(DataError, match="leaves no training examples out of 1"):
        split_validation(_split(1, 1), 0.5, 0)


# --- command line -------------------------------------------------------------------------------------------


def _cli(tmp_path, *extra: str) -> list[str]:
    return ["run", "--config", str(EXPERIMENT), "--workdir", str(tmp_path / "run"), "--quiet", *extra]


def test_cli_unknown_override_key(tmp_path, capsys):
    assert cli.main(_cli(tmp_path, "--config.train.epoch=1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxepochs: error: ")
    assert '"train.epoch"' in err and 'Did you mean "epochs"' in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_override_without_value(tmp_path, capsys):
    assert cli.main(_cli(tmp_path, "--config.train.epochs")) == 2
    assert "jaxepochs: error: --config.train.epochs needs a value" in capsys.readouterr().err


def test_cli_bad_value(tmp_path, capsys):
    assert cli.main(_cli(tmp_path, "--config.train.batch_size=0")) == 2
    assert "jaxepochs: error: config.train.batch_size = 0" in capsys.readouterr().err


def test_cli_used_workdir(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    assert cli.main(_cli(tmp_path, "--config.train.epochs=0")) == 2
    assert "holds run outputs but no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("hidden, parameters", [("(16,)", (40 * 16 + 16) + (16 * 10 + 10)), ("()", 40 * 10 + 10)])
def test_cli_tiny_run(tmp_path, capsys, hidden, parameters):
    # Batch 64 as in tiny_config: the (16,) run builds the programs other tests built (compilation cache).
    argv = _cli(
        tmp_path,
        "--config.train.epochs=1",
        "--config.train.batch_size=64",
        f"--config.model.hidden_sizes={hidden}",
    )
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    workdir = tmp_path / "run"
    written = json.loads((workdir / "config.json").read_text())
    assert tuple(written["model"]["hidden_sizes"]) == ast.literal_eval(hidden)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["num_parameters"] == parameters
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1


def test_cli_override_with_a_space(tmp_path):
    rest, overrides = cli._split_overrides(["run", "--config.train.epochs", "3", "--config.seed=2"])
    assert rest == ["run"]
    assert overrides == {"train.epochs": "3", "seed": "2"}
