"""The importance-criterion interface: a criterion scores each unit of a producer, low = idle.

Scores are normalised to [0, 1] per layer, so one threshold (tau_a) means the same for every
criterion. A criterion declares the statistics it reads (`needs`): the stages gather only those
beyond the unit activity they always collect (the dead-unit check reads it), so a criterion that
needs gradients gets |activation x gradient| on labelled calibration samples as well.

A criterion is a `Criterion` subclass decorated with `@register`; its `name` is what a recipe's
`criterion:` field accepts (the recipe reads this table).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from compressor.core.registry import Registry

#: What a criterion may read: unit activity on calibration data, loss gradients of that activity on
#: labelled samples, the unit's own weights, the BatchNormalization after it.
STATISTICS = frozenset({"activity", "gradients", "weights", "batch_norm"})


class Criterion(ABC):
    name: str = ""
    summary: str = ""  # one line for the recipe's example
    needs: frozenset[str] = frozenset({"activity"})  # of STATISTICS

    @property
    def needs_gradients(self) -> bool:
        return "gradients" in self.needs

    @abstractmethod
    def raw(self, model, producer: str, activity) -> np.ndarray:
        """Unnormalised importance per unit (higher = more important)."""

    def scores(self, model, producer: str, activity) -> np.ndarray:
        return relative(np.asarray(self.raw(model, producer, activity), dtype=np.float64))


def relative(values: np.ndarray) -> np.ndarray:
    """Values divided by the layer's largest (all zero if the largest is 0)."""
    top = float(np.max(values)) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


CRITERIA: Registry[Criterion] = Registry("criterion")


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: one instance of the criterion goes into CRITERIA under its `name`."""
    unknown = set(cls.needs) - STATISTICS
    if unknown:
        raise TypeError(f"criterion '{cls.name}' needs {sorted(unknown)}; known statistics: {sorted(STATISTICS)}")
    CRITERIA.register(cls())
    return cls
