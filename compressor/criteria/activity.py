"""Criteria read from what a unit does on calibration data (the source article's tau_a)."""
from __future__ import annotations

from compressor.criteria.base import Criterion, register


@register
class MeanAbs(Criterion):
    name = "mean_abs"
    summary = "mean |activation| / layer max"

    def raw(self, model, producer, activity):
        return activity.mean_abs


@register
class APoZ(Criterion):
    """Average Percentage of Zeros after ReLU (Hu et al. 2016): 1 - APoZ, so idle is low."""

    name = "apoz"
    summary = "1 - fraction of zero outputs"

    def raw(self, model, producer, activity):
        return 1.0 - activity.apoz

    def scores(self, model, producer, activity):
        return self.raw(model, producer, activity)  # already in [0, 1]
