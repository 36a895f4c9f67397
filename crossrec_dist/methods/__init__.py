"""The adaptation methods, found by looking in this folder: every module whose name does not start
with ``_`` (helpers) and is not ``base`` holds one :class:`~.base.Method` subclass with a
``name``. Adding a method is adding one file here; the CLI, recipe checks, the fine-tuning config,
the experiment runner and the report iterate over :func:`all_methods`.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import InputError
from .base import ALL_LINEAR, ITEM_TABLE, ROLES, Method

__all__ = ["Method", "all_methods", "get_method", "method_names", "with_role", "ALL_LINEAR", "ITEM_TABLE", "ROLES"]

_NOT_METHODS = {"base"}


def discover(paths, package: str) -> dict[str, type[Method]]:
    """name -> Method subclass, one from each public module of the package at ``paths``."""
    found: dict[str, type[Method]] = {}
    for info in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_METHODS:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Method)
                   and v.__module__ == module.__name__ and v.name]
        if len(classes) != 1:
            raise RuntimeError(f"{module.__name__} must define exactly one Method subclass with a name "
                               f"(found {[c.__name__ for c in classes]})")
        cls = classes[0]
        if cls.name in found:
            raise RuntimeError(f"two methods are called {cls.name!r}: {found[cls.name].__module__} and {module.__name__}")
        if cls.role is not None and cls.role not in ROLES:
            raise RuntimeError(f"{module.__name__}: unknown role {cls.role!r}; one of {ROLES}")
        found[cls.name] = cls
    return found


_REGISTRY = discover(__path__, __name__)


def all_methods() -> list[type[Method]]:
    """Every method, ordered by name."""
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str, field: str = "--method") -> type[Method]:
    """The method called ``name``; an unknown name is bad input naming ``field``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(method_names())}", field=field) from None


def with_role(role: str) -> list[str]:
    """Names of the methods that play ``role`` (one of ROLES) in reports."""
    return [c.name for c in all_methods() if c.role == role]
