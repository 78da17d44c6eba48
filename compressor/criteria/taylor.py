"""First-order Taylor importance (Molchanov et al., 2017/2019): removing unit c changes the loss by
about |a_c * dL/da_c|, averaged over labelled calibration samples. It needs gradients, which the
activity collection gathers when a criterion declares them."""
from __future__ import annotations

from compressor.criteria.base import Criterion, register


@register
class Taylor(Criterion):
    name = "taylor"
    summary = "mean |activation x loss gradient| / layer max"
    needs = frozenset({"activity", "gradients"})

    def raw(self, model, producer, activity):
        if activity.taylor is None:
            raise ValueError("the taylor criterion needs activity collected with labels (gradients)")
        return activity.taylor
