"""Importance criteria, chosen by name. Every module in this package that defines a `Criterion`
subclass with a `name` is registered: adding a criterion is one new module (and its name in the
recipe's list)."""
from __future__ import annotations

import importlib
import pkgutil

from compressor.criteria.base import Criterion, relative


def _discover() -> dict[str, Criterion]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Criterion) and value.name and not getattr(value, "__abstractmethods__", None):
                found[value.name] = value()
    return found


CRITERIA: dict[str, Criterion] = _discover()


def get(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown criterion '{name}'; choose one of {', '.join(sorted(CRITERIA))}") from None


__all__ = ["CRITERIA", "Criterion", "get", "relative"]
