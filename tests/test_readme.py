"""The README's and the docs pages' commands, as written: every `jaxepochs ...` line in their shell blocks parses,
names an experiment that loads, and sets config keys and values that exist and validate (sweep specs expand,
references exist, lr-find's flags pass its checks); every config key a page names exists; the README stays short,
every page opens with its promise and smallest example and is in the site's nav, and the site builds with no
warning; and after `make run`'s set-up, `jaxepochs` answers in a fresh shell."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from jaxepochs import cli
from jaxepochs.host import config as config_lib

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page_commands(path) -> list[tuple[int, list[str]]]:
    """(line, argv after `jaxepochs`) of each command in a page's shell blocks (indented ones and ```bash fences,
    a list item's indented fence too), continuation lines joined and comments dropped; `srun ...
    .venv/bin/jaxepochs run ...` counts from `jaxepochs`. Lines inside other fences (```python, ```text: an
    error shown as the user sees it) are not commands."""
    lines = path.read_text().splitlines()
    commands, i, fence = [], 0, None
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fence = None if fence is not None else (lines[i].lstrip()[3:].strip() or "text")
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


COMMANDS = [(f"{path.stem}:{line}", argv) for path in PAGES for line, argv in page_commands(path)]


def test_the_pages_show_the_commands_they_document():
    assert {argv[0] for _, argv in COMMANDS} >= {"run", "sweep", "reproduce", "lr-find", "predict", "export"}
    assert len(COMMANDS) >= 40
    assert {argv[0] for _, argv in page_commands(REPO / "README.md")} >= {"run", "sweep"}


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[where for where, _ in COMMANDS])
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


def test_the_readme_is_a_front_page_of_at_most_150_lines_that_maps_the_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for heading in ("## Install", "## Your own experiment", "## One sweep", "## Resume and restart", "## The docs"):
        assert heading in readme
    linked = set(re.findall(r"\]\(docs/([a-z-]+\.md)", readme))
    assert linked == {path.name for path in PAGES[1:]} - {"index.md"}


def test_every_page_is_in_the_sites_nav_and_opens_with_its_promise_and_smallest_example():
    nav = re.findall(r"^  - [^:]+: ([a-z-]+\.md)$", (REPO / "mkdocs.yml").read_text(), flags=re.M)
    assert sorted(nav) == sorted(path.name for path in PAGES[1:])
    for path in PAGES[1:]:
        lines = path.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "", path.name
        assert lines[2] and not lines[2].startswith(("#", "`", "|", "-")), f"{path.name}: the promise, one line"
        assert lines[3] == "" and lines[4].startswith("```"), f"{path.name}: the smallest example after the promise"


def _config_keys_named(text: str) -> list[str]:
    """`section.key` (or `section.key = value`) in backticks, for the config's own sections."""
    return [f"{m[0]}.{m[1]}" for m in re.findall(r"`([a-z_]+)\.([a-z_][a-z0-9_.]*)(?: = [^`]*)?`", text)]


@pytest.mark.parametrize("path", PAGES, ids=[path.name for path in PAGES])
def test_every_config_key_a_page_names_exists(path):
    base = config_lib.base_config()
    unknown = []
    for key in _config_keys_named(path.read_text()):
        section, *rest = key.split(".")
        if section not in base or section == "hparams":  # hparams: each experiment's own keys
            continue
        node = base[section]
        for part in rest:
            if not hasattr(node, "keys") or part not in node:
                unknown.append(key)
                break
            node = node[part]
    assert not unknown, f"{path.name} names config keys that do not exist: {unknown}"


def test_the_docs_site_builds_with_no_warning(tmp_path):
    """`make docs` is `mkdocs build --strict`: a broken link, a page missing from the nav or an API name that does
    not resolve fails it."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("train_and_evaluate") >= 2
