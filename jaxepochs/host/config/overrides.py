"""Changing a config from text: `--config.a.b=v` overrides (parsed into the type of the field they replace), and
a config.json read back."""

from __future__ import annotations

import ast
import contextlib
import functools
import json

import ml_collections

from jaxepochs.host.config.errors import ConfigError, suggest
from jaxepochs.host.config.schema import base_config
from jaxepochs.host.config.validate import validate


def _tuples_where_the_schema_has_them(value, schema):
    if isinstance(schema, ml_collections.ConfigDict) and isinstance(value, dict):
        return {k: _tuples_where_the_schema_has_them(v, schema[k]) if k in schema else v for k, v in value.items()}
    if isinstance(schema, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def from_json(text: str) -> ml_collections.ConfigDict:
    """A config.json read back as the config that wrote it (JSON has lists where the config had tuples)."""
    return validate(ml_collections.ConfigDict(_tuples_where_the_schema_has_them(json.loads(text), base_config())))


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


_ABSENT = object()


@functools.cache
def _schema() -> ml_collections.ConfigDict:
    """The built-in defaults, built once and only read (base_config takes 2 ms; a sweep applies overrides per run)."""
    return base_config()


def _schema_default(schema: ml_collections.ConfigDict, parts: list[str]):
    """The built-in default of a dotted key, or _ABSENT where the schema has no such key (the module's own)."""
    node = schema
    for part in parts:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Applies {"train.epochs": "5", ...} as the CLI's `--config.train.epochs=5`, then validates."""
    config, schema = validate(config), _schema()
    for dotted, text in overrides.items():
        parent, node, parts = None, config, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(parts[:i]) or "the config"
                raise ConfigError(
                    f'Unknown config key "{dotted}" in --config.{dotted}={text}: '
                    f'"{part}" is not a field of {where}.{suggest(part, known)}'
                )
            parent, node = node, node[part]
        if isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{dotted} names a section; override one of its fields instead.")
        # A field whose schema allows None (train.class_weight) parses as one that holds None, whatever the
        # experiment set it to: "None" is None there, and "(1.0, 5.0)" a tuple where "balanced" was.
        any_type = _schema_default(schema, parts) is None
        try:
            with parent.ignore_type() if any_type else contextlib.nullcontext():
                parent[parts[-1]] = _parse_value(text, None if any_type else node)
        except ConfigError as e:
            raise ConfigError(f"--config.{dotted}={text}: {e} (the field's current value is {node!r}).") from None
    return validate(config)
