"""Flatten and Reshape: Flatten repeats the channel layout once per spatial position; a Reshape
keeps the mapping if it keeps the last axis, or flattens everything to one axis."""
from __future__ import annotations

import math

from compressor.core._tf import keras
from compressor.layers.base import Blocked, Cut, Handler, register
from compressor.layers.layout import Layout

_L = keras.layers


def flattened(layout: Layout, input_shape) -> Layout | None:
    spatial = tuple(input_shape)[1:-1]
    if any(dim is None for dim in spatial):
        return None
    return layout.repeated(math.prod(spatial))


def reshape_kind(layout: Layout, input_shape, target_shape) -> str | None:
    """'keep_last' if the channel axis survives, 'flat' if everything becomes one axis."""
    target = tuple(target_shape)
    if layout.outer == 1 and len(target) >= 1 and target[-1] == tuple(input_shape)[-1]:
        return "keep_last"
    return "flat" if len(target) == 1 else None


@register
class Flatten(Handler):
    kinds = (_L.Flatten,)
    family = "flatten/reshape"

    def propagate(self, layer, ins, shapes, graph):
        out = flattened(ins[0], shapes[0])
        if out is None:
            raise Blocked("Flatten of unknown spatial size")
        return out


@register
class Reshape(Handler):
    kinds = (_L.Reshape,)
    family = "flatten/reshape"

    def propagate(self, layer, ins, shapes, graph):
        kind = reshape_kind(ins[0], shapes[0], layer.target_shape)
        if kind is None:
            raise Blocked("Reshape that moves channels")
        return ins[0] if kind == "keep_last" else flattened(ins[0], shapes[0])

    def resize(self, layer, cut: Cut):
        layout, new_width = cut.layouts[0], len(cut.positions[0])
        config = layer.get_config()
        target = list(config["target_shape"])
        input_shape = tuple(layer.input_shape)
        if reshape_kind(layout, input_shape, target) == "keep_last":
            target[-1] = new_width
        elif target[0] != -1:
            target[0] = math.prod(input_shape[1:-1]) * new_width
        config["target_shape"] = tuple(target)
        return config, None
