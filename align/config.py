"""Strict, typed configs: dataclass fields with a default and a help text, loaded from YAML and
overridden by command-line flags.

    cfg = parse_config(DPOArgs, sys.argv[1:])   # --config x.yaml --lora_r 32

An unknown key (in the YAML or on the command line) or a value of the wrong type is a ConfigError that
names the key and lists the close valid names. Defaults live in one place: the dataclass field.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from align.errors import ConfigError

T = TypeVar("T")


def arg(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its default and help text (lists are copied per instance)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn `value` (from YAML or a command-line string) into type `tp`, or raise ConfigError."""
    origin = get_origin(tp)
    from_cli = isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None or (from_cli and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (from_cli and str(choice) == value):
                return choice
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if from_cli:
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # a bug in the config class, not user input


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _unknown(name: str, valid: list[str], where: str) -> ConfigError:
    # the closest names scoring 0.5 or more, and only those within 0.2 of the best: a near-certain match is named
    # alone (learning_rat: learning_rate, not also padding_free at 0.5)
    scored = sorted(((difflib.SequenceMatcher(None, name, v).ratio(), v) for v in valid), reverse=True)
    scored = [(score, v) for score, v in scored[:3] if score >= 0.5]
    close = [v for score, v in scored if score >= scored[0][0] - 0.2] if scored else []
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid names: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: unknown option {name!r}{hint}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def _split_argv(argv: list[str], fields: dict[str, dataclasses.Field]) -> tuple[str | None, dict[str, str]]:
    config_path = None
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {token!r}; options look like --name value")
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            is_flag = name in fields and fields[name].type is bool
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if is_flag and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"command line: --{name} needs a value")
            else:
                value = nxt
                i += 1
        if name == "config":
            config_path = value
        else:
            if name not in fields:
                raise _unknown(name, list(fields), "command line")
            overrides[name] = value
        i += 1
    return config_path, overrides


def format_help(cls: type) -> str:
    lines = [f"options for {cls.__name__} (from --config file.yaml, overridden by --name value):"]
    for name, f in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{name} ({_type_name(f.type)}, default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def build_config(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Make `cls` from a mapping, strictly: unknown keys and wrong types are ConfigErrors."""
    fields = _fields(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise _unknown(name, list(fields), where)
        kwargs[name] = _coerce(value, fields[name].type, f"{where}: {name}")
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def parse_config(cls: type[T], argv: list[str] | None = None) -> T:
    """Build a `cls` config from `--config file.yaml` plus `--name value` overrides (flags win); a config with
    `log_level` (align.log.LogArgs) sets align's log level."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(format_help(cls))
        sys.exit(0)
    fields = _fields(cls)
    config_path, overrides = _split_argv(argv, fields)
    values: dict[str, Any] = {}
    where = "config"
    if config_path is not None:
        values.update(load_yaml(config_path))
        where = str(config_path)
        for name in values:
            if name not in fields:
                raise _unknown(name, list(fields), where)
    values.update(overrides)
    cfg = build_config(cls, values, where)
    if hasattr(cfg, "log_level"):  # align.log.LogArgs: the level holds from here on, for the whole run
        from align.log import set_level

        set_level(cfg.log_level)
    return cfg
