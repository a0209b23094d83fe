"""Typed configs: dataclasses filled from a YAML recipe plus `--section.key value` overrides.

Every config field is declared with `option(default, "help")`; the help text is
what `--help` shows. Unknown keys and values of the wrong type are errors that
name the key. This module knows how to fill dataclasses, not what they mean.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from lmforge.errors import UserError

T = TypeVar("T")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help string."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def require_positive(config: Any, names: tuple[str, ...], section: str = "model") -> None:
    """ValueError naming `section.name` for the first of `names` that is not > 0."""
    for name in names:
        value = getattr(config, name)
        # A config built in Python skips from_dict's type checks: "64" or None must not become a TypeError later.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{section}.{name} must be a positive number, not {value!r}")
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{section}.{name} must be positive, not {value}")


def require_divisible(config: Any, name: str, by: str, section: str = "model") -> None:
    if getattr(config, name) % getattr(config, by):
        raise ValueError(f"{section}.{name} {getattr(config, name)} must be divisible by {by} {getattr(config, by)}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such recipe file: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
    return loaded


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """`["--train.lr", "1e-3", "--model.num_layers=4"]` -> `{"train": {"lr": 1e-3}, "model": {"num_layers": 4}}`."""
    nested: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if not argument.startswith("--"):
            raise UserError(f"unexpected argument {argument!r}; overrides look like --section.key value")
        key, has_value, value = argument[2:].partition("=")
        if not has_value:
            if index + 1 >= len(arguments):
                raise UserError(f"override --{key} needs a value")
            value = arguments[index + 1]
            index += 1
        index += 1
        target = nested
        *sections, leaf = key.replace("-", "_").split(".")
        for section in sections:
            target = target.setdefault(section, {})
        # YAML gives "1e-3", "true" and "[q, v]" their natural types; an empty value stays the empty string (YAML
        # reads it as null), so `--train.best_metric=` clears a recipe's string.
        target[leaf] = yaml.safe_load(value) if value else ""
    return nested


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a dict, checking every key and value type."""
    if not isinstance(values, dict):
        raise UserError(f"{where or cls.__name__} must be a mapping, not {values!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown config key {prefix}{unknown[0]}; valid keys: {', '.join(prefix + name for name in fields)}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        default = _default_of(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A section overrides the recipe's own default section key by key, not the section class's defaults.
            # Only keys the recipe changed are carried over: derived values (num_kv_heads = num_heads) must
            # follow the user's overrides, not the defaults they were derived from.
            plain = type(default)()
            changed = {k: v for k, v in dataclasses.asdict(default).items() if v != getattr(plain, k)}
            value = merge(changed, value)
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(str(error)) from None


def _default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _coerce(annotation: Any, value: Any, key: str) -> Any:
    origin = get_origin(annotation)
    arguments = get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        for candidate in arguments:
            if candidate is type(None):
                continue
            try:
                return _coerce(candidate, value, key)
            except UserError:
                continue
        raise UserError(f"{key}: {value!r} is not a valid {annotation}")
    if origin is Literal:
        if value not in arguments:
            raise UserError(f"{key} must be one of {', '.join(map(str, arguments))}, not {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, not {value!r}")
        return [_coerce(arguments[0], item, key) for item in value] if arguments else list(value)
    if annotation in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "1e-3" as a string; numbers written that way are still numbers.
        try:
            value = annotation(value)
        except ValueError:
            raise UserError(f"{key} must be {annotation.__name__}, not {value!r}") from None
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise UserError(f"{key} must be {annotation.__name__}, not {value!r}")
    return value


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every field, nested sections flattened: the text of `--help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            rows.extend(describe(hints[field.name], key + "."))
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        rows.append((key, field.metadata.get("help", ""), default))
    return rows


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
