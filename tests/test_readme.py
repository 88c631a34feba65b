"""The README's commands, as written: every `jaxepochs ...` line in its shell blocks parses, names an experiment
that loads, and sets config keys and values that exist and validate (sweep specs expand, references exist,
lr-find's flags pass its checks); and after `make run`'s set-up, `jaxepochs` answers in a fresh shell."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest
from conftest import REPO

from jaxepochs import cli
from jaxepochs.host import config as config_lib


def readme_commands() -> list[tuple[int, list[str]]]:
    """(line, argv after `jaxepochs`) of each command in the README's shell blocks (indented ones and ```bash
    fences), continuation lines joined and comments dropped; `srun ... .venv/bin/jaxepochs run ...` counts from
    `jaxepochs`. Lines inside other fences (```python) are code, not commands."""
    lines = (REPO / "README.md").read_text().splitlines()
    commands, i, fence = [], 0, None
    while i < len(lines):
        if lines[i].startswith("```"):
            fence = None if fence is not None else (lines[i][3:].strip() or "text")
            i += 1
            continue
        shell = fence in ("bash", "sh", "shell") or (fence is None and lines[i].startswith("    "))
        match = re.match(r"^\s*(?:\S.*\s)?(?:\.venv/bin/)?jaxepochs (\w.*)$", lines[i]) if shell else None
        if match and not lines[i].lstrip().startswith("#"):
            text, start = match.group(1), i
            while text.rstrip().endswith("\\"):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            commands.append((start + 1, shlex.split(text.rstrip('"'), comments=True)))
        i += 1
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_it_documents():
    assert {argv[0] for _, argv in COMMANDS} >= {"run", "sweep", "reproduce", "lr-find"}
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[f"line{line}" for line, _ in COMMANDS])
def test_a_readme_command_parses_and_its_config_validates(argv, monkeypatch):
    monkeypatch.chdir(REPO)
    rest, overrides = cli._split_overrides(argv)
    rest, specs = cli._split_overrides(rest, "--sweep.")
    args = cli._parser().parse_args(rest)
    if args.command == "reproduce":
        from jaxepochs.studies import common

        assert args.name in common.available()
        return
    if args.command == "compare":
        return  # reads finished workdirs: tested in test_watching.py
    if args.command in ("predict", "export"):
        return  # read a trained run: tested in test_predict.py
    config = config_lib.validate(config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides))
    if args.command == "sweep" and args.search:
        from jaxepochs.sweep import optuna_search

        assert optuna_search.space(config, specs) and args.trials > 0 and args.batch > 0
    elif args.command == "sweep":
        from jaxepochs.sweep import grid as grid_lib

        assert grid_lib.expand(config, specs, args.random, args.random_seed)
    if args.command == "lr-find":
        from jaxepochs.studies import lr_find

        lr_find.check_arguments(args.min, args.max, args.steps, args.rates, args.epochs, args.rates_range)


def test_jaxepochs_answers_in_a_fresh_shell_once_the_environment_is_activated():
    if not (REPO / ".venv" / "bin" / "activate").exists():
        pytest.skip("no .venv here: `make test` creates it (this run installed jaxepochs another way)")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"  # nothing of this process's environment: a fresh login
    shell = subprocess.run(
        ["bash", "-c", "source .venv/bin/activate && jaxepochs --help"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shell.returncode == 0, shell.stderr
    assert "run" in shell.stdout and "sweep" in shell.stdout and "compare" in shell.stdout
