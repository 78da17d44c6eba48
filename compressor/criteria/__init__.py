"""Importance criteria, chosen by name. A criterion is a `Criterion` subclass decorated with
`@register` (compressor/criteria/base.py) in a module imported below; the recipe's `criterion:`
names are read from the table, so adding a criterion is one class."""
from __future__ import annotations

from compressor.criteria import activity, taylor, weights  # noqa: F401  (each registers its criteria)
from compressor.criteria.base import CRITERIA, STATISTICS, Criterion, register, relative


def get(name: str) -> Criterion:
    return CRITERIA.lookup(name)


__all__ = ["CRITERIA", "STATISTICS", "Criterion", "get", "register", "relative"]
