"""Configuration: frozen dataclasses, loadable from TOML/dicts; unknown keys are an error.

Usage::

    @dataclass(frozen=True)
    class TrainConfig:
        steps: int = 1000
        optimizer: OptimConfig = OptimConfig()

    cfg = load_config(TrainConfig, "train.toml", overrides={"steps": 10})
    print(dump_toml(cfg))

Nested dataclass fields map to TOML tables. Overrides use dotted keys ("optimizer.lr").
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any], _where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; nested dataclasses from sub-mappings.
    Raises :class:`ConfigError` naming the unknown key and the valid ones."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{_where or cls.__name__}' must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{_where}] " if _where else ""
        raise ConfigError(
            f"unknown config key(s) {where}{', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints.get(name)
        sub = _dataclass_type(tp)
        if sub is not None and isinstance(value, Mapping):
            # a partial table overrides the parent's default for this field, not the sub-class defaults
            default = _field_default(fields[name])
            if dataclasses.is_dataclass(default):
                value = merge_dicts(to_dict(default), value)
            kwargs[name] = from_dict(sub, value, f"{_where}.{name}" if _where else name)
        else:
            kwargs[name] = _coerce(value, tp, f"{_where}.{name}" if _where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config for {cls.__name__}: {e}") from e


def merge_dicts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, everything else in ``update`` replaces ``base``."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain nested dict (tuples become lists, None values are dropped)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif v is None:
            continue
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        elif isinstance(v, Path):
            out[f.name] = str(v)
        else:
            out[f.name] = v
    return out


def read_config_data(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Nested dict from TOML file ``path`` (if given), updated by dotted-key ``overrides``
    (``{"optimizer.lr": 1e-3}``; None values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found; write one with `boltzflow train --print-config > {p.name}`")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from e
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a table")
        node[parts[-1]] = value
    return data


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> T:
    """Defaults of ``cls``, updated from TOML file ``path`` (if given), then by dotted-key ``overrides``."""
    return from_dict(cls, read_config_data(path, overrides))


def dump_toml(obj: Any, show_unset: bool = False) -> str:
    """Serialise a dataclass (or nested dict) as TOML. Supports scalars, lists of scalars, tables.
    TOML has no null: fields that are None are left out, or with ``show_unset`` written as a
    commented line naming the field and its type (``# lr = <float>  (unset: ...)``)."""
    if dataclasses.is_dataclass(obj):
        data = _to_dict_with_unset(obj) if show_unset else to_dict(obj)
    else:
        data = dict(obj)
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


@dataclasses.dataclass(frozen=True)
class _Unset:
    """A None-valued dataclass field in :func:`dump_toml` output; ``type`` is its annotation."""

    type: str


def _to_dict_with_unset(obj: Any) -> dict[str, Any]:
    """:func:`to_dict` that keeps None fields as :class:`_Unset` markers."""
    out = to_dict(obj)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = _to_dict_with_unset(v)
        elif v is None:
            tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out[f.name] = _Unset(tp.replace(" | None", "").replace("Optional[", "").rstrip("]") or "value")
    return out


def _emit_table(data: Mapping[str, Any], prefix: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    if prefix and scalars:
        lines.append(f"[{'.'.join(prefix)}]")
    for k, v in scalars.items():
        if isinstance(v, _Unset):
            lines.append(f"# {k} = <{v.type}>  (unset by default; uncomment and give a value to set it)")
            continue
        lines.append(f"{k} = {_toml_value(v)}")
    if scalars:
        lines.append("")
    for k, v in tables.items():
        _emit_table(v, prefix + [k], lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write value {v!r} of type {type(v).__name__} to TOML")


def _dataclass_type(tp: Any):
    if tp is None:
        return None
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Light coercion: lists -> tuples for tuple fields, ints -> floats for float fields."""
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (origin is tuple or tp is tuple) and isinstance(value, list):
        return tuple(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"config key '{where}' must be {tp.__name__}, got {value!r}")
    return value
