"""Typed dataclass configs: defaults in code, a YAML file on top, ``--set a.b=value`` on top of that.

Unknown keys and values of the wrong type are input errors that name the offending key, so a typo in
a recipe never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from .errors import InputError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false are booleans. PyYAML follows YAML 1.1, where
    ``no``/``yes``/``on``/``off`` are booleans too, so ``mixed_precision: no`` (a documented value)
    arrived as False and was refused, and a string field meant ``no`` got ``"False"``. A bool field
    still takes yes/no/on/off (``_coerce``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text: str):
    """Parse YAML text as configs here read it (YAML 1.2 booleans, see ``_Loader``)."""
    return yaml.load(text, Loader=_Loader)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise InputError(f"expected a mapping, got {value!r}", path=source, field=key)
        return from_dict(tp, value, source=source, prefix=key + ".")
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except InputError as e:
                errors.append(str(e))
        raise InputError(f"value {value!r} does not fit {tp}", path=source, field=key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise InputError(f"expected a list, got {value!r}", path=source, field=key)
        inner = args[0] if args else Any
        out = [_coerce(v, inner, key, source) for v in value]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"expected a mapping, got {value!r}", path=source, field=key)
        k_tp, v_tp = args if len(args) == 2 else (Any, Any)
        return {_coerce(k, k_tp, key, source): _coerce(v, v_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise InputError(f"expected true/false, got {value!r}", path=source, field=key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InputError(f"expected an integer, got {value!r}", path=source, field=key)
        try:
            f = float(value)
        except ValueError:
            raise InputError(f"expected an integer, got {value!r}", path=source, field=key) from None
        if f != int(f):
            raise InputError(f"expected an integer, got {value!r}", path=source, field=key)
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"expected a number, got {value!r}", path=source, field=key) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise InputError(f"expected a string, got {value!r}", path=source, field=key)
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, *, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly nested) dict, refusing unknown keys."""
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"known: {', '.join(sorted(types))}", path=source, field=prefix + unknown[0])
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        f = defaults[k]
        if isinstance(v, dict) and dataclasses.is_dataclass(types[k]) and f.default_factory is not dataclasses.MISSING:
            # A nested section keeps the defaults its parent chose (e.g. fine-tuning's own TrainConfig
            # defaults); the mapping only overrides the keys it names.
            v = deep_merge(dataclasses.asdict(f.default_factory()), v)
        kwargs[k] = _coerce(v, types[k], prefix + k, source)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def parse_overrides(pairs: Iterable[str]) -> dict:
    """``["train.lr=1e-3", "model.layers=4"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"override {pair!r} is not key=value", field="--set")
        key, raw = pair.split("=", 1)
        value = load_yaml(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", path=str(path))
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise InputError(f"invalid YAML: {e}", path=str(path),
                         line=None if line is None else line + 1) from None
    if not isinstance(data, dict):
        raise InputError("top level must be a mapping", path=str(path))
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                base: dict | None = None) -> T:
    """Defaults <- ``base`` (e.g. a preset) <- YAML file <- ``--set`` overrides."""
    data = dict(base or {})
    source = "<defaults>"
    if path:
        data = deep_merge(data, read_yaml(path))
        source = str(path)
    ov = parse_overrides(overrides)
    if ov:
        if path:
            # The file must be valid on its own: merged first, ``--set train.x=1`` would silently
            # replace a section of the wrong type (``train: 5``) instead of reporting it.
            from_dict(cls, data, source=source)
        data = deep_merge(data, ov)
        source = source if not path else source + " + --set"
    return from_dict(cls, data, source=source)
