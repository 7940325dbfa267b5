"""One schema for Python, YAML and the command line.

A recipe's settings are a dataclass. Each field's ``metadata["help"]`` is its documentation; from that one
definition we derive the CLI flags (``--max-steps``), accept the same names in a YAML file (``max_steps: 100``),
and build the dataclass in Python (``PretrainConfig(max_steps=100)``). Precedence: defaults < YAML < flags, also
when one field decides another (``epochs`` sets ``max_steps``: ``--max-steps 1`` beats ``epochs: 2`` in the YAML,
and a note says so). A field that does not exist is an error that names it and suggests the closest real one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from lmforge.errors import ConfigError

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """Optional[int] -> int, list[str] -> list, Literal['a','b'] -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0])
    if origin in (list, tuple):
        return list
    return tp


def _convert(name: str, tp, value):
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            inner = typing.get_args(tp)
            inner_t = _base_type(inner[0]) if inner else str
            return [inner_t(v) for v in value]
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field {name!r}: cannot read {value!r} as {getattr(base, '__name__', base)}") from None
    return value


def _unknown(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config field {name!r}{hint}")


def build(cls: type[T], values: dict[str, Any] | None = None) -> T:
    """Build dataclass `cls` from a dict (YAML or flags), converting types and rejecting unknown fields."""
    values = dict(values or {})
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = k.replace("-", "_")
        if key not in names:
            raise _unknown(key, names)
        kwargs[key] = _convert(key, types_[key], v)
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per dataclass field; defaults are None so we can tell 'not given' from 'given'."""
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and default != "":
            help_ = f"{help_} (default: {default})"
        if _base_type(types_[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, default=None, nargs="?", const="true", metavar="BOOL", help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_)


def from_cli(cls: type[T], args: argparse.Namespace, config_path: str | None = None, note=None, **fixed) -> T:
    """Defaults < YAML file < flags given on the command line < `fixed` (positional args).

    Some fields decide others (`epochs` sets `max_steps`): the class lists them in `DECIDES` as {field: field it
    sets}. When both are given, the one from the stronger source wins (a flag beats the file: `--max-steps 1`
    with a YAML that sets `epochs` runs one step), the other is dropped, and `note` (default: stderr) says which
    won and why. Given in the same place, the deciding field wins, as documented on it.
    """
    import sys

    note = note or (lambda msg: print(f"note: {msg}", file=sys.stderr))
    values = load_yaml(config_path) if config_path else {}
    names = {f.name for f in dataclasses.fields(cls)}
    for k in list(values):
        if k.replace("-", "_") not in names:
            raise _unknown(k, sorted(names))
    values = {k.replace("-", "_"): v for k, v in values.items()}
    flags = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    for decider, decided in getattr(cls, "DECIDES", {}).items():
        where = {n: ("flag", f"--{n.replace('_', '-')} {flags[n]}") if n in flags else
                 ("file", f"{n}: {values[n]} in {config_path}")
                 for n in (decider, decided) if n in flags or n in values}
        if len(where) < 2:
            continue
        if where[decided][0] == "flag" and where[decider][0] == "file":
            note(f"{where[decided][1]} wins over {where[decider][1]}: a command-line flag beats the config file")
            values.pop(decider)
        else:
            why = "a command-line flag beats the config file" if where[decider][0] == "flag" and \
                where[decided][0] == "file" else f"{decider} sets {decided} when both are given"
            note(f"{where[decider][1]} wins over {where[decided][1]}: {why}")
            values.pop(decided, None)
            flags.pop(decided, None)
    values.update(flags)
    values.update({k: v for k, v in fixed.items() if v is not None})
    return build(cls, values)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
