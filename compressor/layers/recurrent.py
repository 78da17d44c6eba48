"""LSTM, GRU, SimpleRNN and Bidirectional: consumers of their input's channels, their own units left
whole. A recurrent unit is coupled across the layer (4 LSTM / 3 GRU gate columns of the input
kernel, the same columns and a row of the recurrent kernel, and every other unit through the
state), so the stages do not remove it; but the layer reads its input channels as rows of its input
kernel, exactly like Dense, so a producer upstream (a per-step Dense or Conv1D) still prunes: a
removed unit is a row cut of each direction's input kernel."""
from __future__ import annotations

from compressor.core._tf import keras
from compressor.layers.base import (
    Blocked,
    Cut,
    Handler,
    fold_rows,
    map_weights,
    register,
    size,
    take,
)

_L = keras.layers


@register
class Recurrent(Handler):
    kinds = (_L.LSTM, _L.GRU, _L.SimpleRNN, _L.Bidirectional)
    left_whole = True  # its units stay: reported as unpruned
    family = "recurrent"

    def check(self, layer):
        inner = layer.forward_layer if isinstance(layer, _L.Bidirectional) else layer
        if type(inner) not in (_L.LSTM, _L.GRU, _L.SimpleRNN):
            return f"recurrent layer of type {type(inner).__name__}"
        return None

    def propagate(self, layer, ins, shapes, graph):
        if len(ins) != 1 or ins[0].outer != 1 or len(shapes[0]) != 3:
            raise Blocked("recurrent layer over a flattened or nested input")
        return graph.fresh_output(layer, "recurrent units are left whole")

    def resize(self, layer, cut: Cut):
        """Rows of each direction's input kernel (short name 'kernel') follow the input's kept channels."""
        def rule(short, value):
            if short != "kernel":
                return value
            return take(fold_rows(value, cut.pairs, axis=0), cut.positions[0], axis=0)

        return None, map_weights(layer, rule)

    def macs(self, layer, in_shape, out_shape, nonzero_only):
        steps = in_shape[1] if len(in_shape) >= 3 and in_shape[1] is not None else 1
        return int(steps) * sum(size(w, nonzero_only) for w in layer.weights if len(w.shape) == 2)


@register
class ConvRecurrent(Handler):
    """Known and left whole, its input kept: convolutional gates couple every channel."""

    kinds = (_L.ConvLSTM2D,)
    left_whole = True
    family = "recurrent"

    def check(self, layer):
        return "recurrent layers are left whole"
