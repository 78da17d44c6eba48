"""Criteria read from the weights alone (no data): L2 magnitude of each unit, and the scale of the
BatchNormalization right after it (network slimming's |gamma|)."""
from __future__ import annotations

import numpy as np

from compressor.criteria.base import Criterion, register


@register
class Magnitude(Criterion):
    name = "magnitude"
    summary = "L2 norm of the unit's weights / layer max"
    needs = frozenset({"weights"})

    def raw(self, model, producer, activity):
        from compressor.layers import handler_for  # TensorFlow on first use: the recipe reads this table

        layer = model.get_layer(producer)
        return handler_for(layer).unit_norms(layer)


@register
class BNScale(Criterion):
    name = "bn_scale"
    summary = "|gamma| of the BatchNormalization after the unit (magnitude if there is none)"
    needs = frozenset({"batch_norm", "weights"})

    def raw(self, model, producer, activity):
        if activity.batch_norm is None:
            return Magnitude().raw(model, producer, activity)
        return np.abs(model.get_layer(activity.batch_norm).gamma.numpy())
