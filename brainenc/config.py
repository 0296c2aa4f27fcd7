"""Dataclass configurations: plain data, never code.

- :func:`from_dict` builds a (nested) dataclass from a mapping and rejects unknown keys
  with a did-you-mean message naming the full key path;
- :func:`load_toml` / :func:`apply_overrides` read pipeline specs and ``key.sub=value``
  command-line overrides;
- :func:`config_hash` gives a stable digest used for cache keys and run folders.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union

from brainenc.exceptions import ConfigError

T = TypeVar("T")

__all__ = ["from_dict", "nested_config", "to_dict", "load_toml", "apply_overrides", "config_hash", "canonical_json"]


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if tp is Any:
        return value
    optional, inner = _is_optional(tp)
    if optional:
        if value is None:
            return None
        return _coerce(value, inner, key)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}' must be a table of {tp.__name__} fields; {value!r} was provided")
        return from_dict(tp, value, _prefix=key + ".")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"'{key}' must be one of {set(allowed)}; {value!r} was provided")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list; {value!r} was provided")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"'{key}' must have {len(args)} items; {value!r} was provided")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        out = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}' must be a table; {value!r} was provided")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false; {value!r} was provided")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer; {value!r} was provided")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number; {value!r} was provided")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string; {value!r} was provided")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, _prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors.

    Parameters
    ----------
    cls : dataclass type
    data : mapping or None
        Missing keys take the dataclass defaults.

    Raises
    ------
    ConfigError
        Naming the full key path, e.g. ``unknown key 'fit.alpah'; did you mean 'alphas'?``.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown key '{_prefix}{k}' for {cls.__name__}{hint}")
    kwargs = {name: _coerce(v, hints[name], _prefix + name) for name, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise ConfigError(f"{cls.__name__}: {exc}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        check()
    return obj


def nested_config(cls: type[T], value: Any, name: str, prefix: str = "", base: Mapping[str, Any] | None = None) -> T:
    """A validated copy of a nested config table (an estimator's ``model`` / ``train`` parameter).

    Parameters
    ----------
    cls : dataclass type
    value : None, a ``cls`` instance or a mapping of its fields
        None = ``base`` alone; a mapping overrides ``base`` field by field; an instance is copied
        (a fitted model never aliases the parameter) and checked.
    name, prefix : str
        Error messages name ``prefix + name + '.' + field``.
    base : mapping, optional
        Field values under the mapping (e.g. a preset's).
    """
    full = f"{prefix}{name}."
    try:
        if value is None:
            return from_dict(cls, dict(base or {}), _prefix=full)
        if isinstance(value, cls):
            out = dataclasses.replace(value)
            check = getattr(out, "check", None)
            if callable(check):
                check()
            return out
        if isinstance(value, Mapping):
            return from_dict(cls, {**dict(base or {}), **value}, _prefix=full)
    except ConfigError as exc:  # a dataclass check() names the bare field: add the table's path
        msg = str(exc)
        if msg.startswith("'") and not msg.startswith("'" + full):
            raise ConfigError("'" + full + msg[1:]) from None
        raise
    raise ConfigError(f"'{prefix}{name}' must be None, a {cls.__name__} or a mapping of its fields; "
                      f"{type(value).__name__} was provided")


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict/list values suitable for JSON/TOML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_toml(path: str | Path) -> dict:
    """Read a TOML file, with a one-line error naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings need no quotes on the command line


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as TOML literals) to a copy of ``data``."""
    out = json.loads(json.dumps(data))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like 'section.key=value'")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a table")
        node[parts[-1]] = _parse_value(text.strip())
    return out


def canonical_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable hex digest of a config (dataclass or mapping)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]
