"""Merge layers. Elementwise merges (Add, Multiply, ...) couple the channels of their inputs: the
producers behind a residual Add, or behind a squeeze-excite gate and the tensor it gates, must
lose the same indices (union-find in surgery). Concatenate puts its inputs' channels side by side."""
from __future__ import annotations

from compressor.core._tf import keras
from compressor.layers.base import Blocked, Handler, is_last_axis, register
from compressor.layers.layout import Layout

_L = keras.layers


@register
class Elementwise(Handler):
    kinds = (_L.Add, _L.Subtract, _L.Average, _L.Maximum, _L.Minimum, _L.Multiply)
    family = "elementwise merge"

    def propagate(self, layer, ins, shapes, graph):
        first = ins[0]
        if not all(first.same_structure(other) for other in ins[1:]):
            raise Blocked(f"{type(layer).__name__} of different layouts")
        for other in ins[1:]:
            for seg_a, seg_b in zip(first.segments, other.segments):
                graph.couple(seg_a.space, seg_b.space)
        touched = next((s.touched_by for lay in ins for s in lay.segments if s.touched_by), None)
        return first.touched(touched) if touched else first


@register
class Concatenate(Handler):
    kinds = (_L.Concatenate,)
    family = "concatenate"

    def propagate(self, layer, ins, shapes, graph):
        if not (is_last_axis(layer.axis, len(shapes[0])) and all(lay.outer == 1 for lay in ins)):
            raise Blocked("Concatenate off the channel axis")
        return Layout(tuple(seg for lay in ins for seg in lay.segments))
