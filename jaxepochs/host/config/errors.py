"""The one error a config that cannot run raises, and the phrasing of its messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and the fix."""


def suggest(key: str, candidates: Iterable[str]) -> str:
    """' Did you mean "..."?' for the candidate closest to `key`, or ""."""
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f' Did you mean "{close[0]}"?' if close else ""


def fail(key: str, problem: str, fix: str):
    raise ConfigError(f"config.{key} = {problem}. {fix}")


def one_of(names: Iterable[str]) -> str:
    """'"a", "b" or "c"'."""
    quoted = [f'"{name}"' for name in names]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)
