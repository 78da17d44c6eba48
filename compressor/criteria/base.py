"""The importance-criterion interface: a criterion scores each unit of a producer, low = idle.

Scores are normalised to [0, 1] per layer, so one threshold (tau_a) means the same for every
criterion. A criterion that needs gradients says so, and the activity collection then gathers
|activation x gradient| on labelled calibration samples as well.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Criterion(ABC):
    name: str = ""
    summary: str = ""  # one line for the recipe's example
    needs_gradients: bool = False

    @abstractmethod
    def raw(self, model, producer: str, activity) -> np.ndarray:
        """Unnormalised importance per unit (higher = more important)."""

    def scores(self, model, producer: str, activity) -> np.ndarray:
        return relative(np.asarray(self.raw(model, producer, activity), dtype=np.float64))


def relative(values: np.ndarray) -> np.ndarray:
    """Values divided by the layer's largest (all zero if the largest is 0)."""
    top = float(np.max(values)) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)
