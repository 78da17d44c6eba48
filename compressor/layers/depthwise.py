"""Depthwise and separable convolutions. A depthwise conv follows its input: channel c becomes
outputs c*m..c*m+m-1 (m = depth_multiplier) with per-channel weights, so it shrinks with whatever
produced its input. A separable conv is a depthwise step that follows its input and a pointwise
step whose filters are the layer's own units."""
from __future__ import annotations

from compressor.core._tf import keras
from compressor.layers.base import (
    Blocked,
    Cut,
    Handler,
    expand,
    fold_rows,
    map_weights,
    positions,
    register,
    size,
    take,
)
from compressor.layers.layout import single

_L = keras.layers


@register
class Depthwise(Handler):
    kinds = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)
    family = "depthwise conv"

    def check(self, layer):
        if getattr(layer, "groups", 1) != 1:
            return "grouped convolution"
        return super().check(layer)

    def propagate(self, layer, ins, shapes, graph):
        if ins[0].outer != 1:
            raise Blocked("convolution over a flattened layout")
        return ins[0].times_inner(int(layer.depth_multiplier), layer.name)

    def resize(self, layer, cut: Cut):
        multiplier = int(layer.depth_multiplier)

        def rule(short, value):
            if short == "depthwise_kernel":
                return take(value, cut.positions[0], axis=-2)
            return take(value, expand(cut.positions[0], multiplier), axis=0) if short == "bias" else value

        return None, map_weights(layer, rule)

    def macs(self, layer, in_shape, out_shape, nonzero_only):
        kernel = layer.depthwise_kernel
        channels = int(kernel.shape[-2]) * int(kernel.shape[-1])  # C * depth_multiplier
        return positions(out_shape, channels) * size(kernel, nonzero_only)


@register
class Separable(Handler):
    kinds = (_L.SeparableConv1D, _L.SeparableConv2D)
    family = "separable conv"
    exact_fold = False  # the depthwise step scales each input channel before the fold
    magnitude_kernel = "pointwise_kernel"

    def units(self, layer):
        return int(layer.filters)

    def unit_kernel(self, layer):
        return layer.pointwise_kernel

    def propagate(self, layer, ins, shapes, graph):
        if ins[0].outer != 1:
            raise Blocked("convolution over a flattened layout")
        graph.add_producer(layer.name, self.units(layer))
        return single(layer.name, self.units(layer))

    def resize(self, layer, cut: Cut):
        multiplier = int(layer.depth_multiplier)
        config = layer.get_config()
        config["filters"] = len(cut.out_kept)

        def rule(short, value):
            if short == "depthwise_kernel":
                return take(value, cut.positions[0], axis=-2)
            if short == "pointwise_kernel":
                value = fold_rows(value, cut.pairs, axis=-2, multiplier=multiplier)
                value = take(value, expand(cut.positions[0], multiplier), axis=-2)
                return take(value, cut.out_kept, axis=-1)
            return take(value, cut.out_kept, axis=0) if short == "bias" else value

        return config, map_weights(layer, rule)

    def macs(self, layer, in_shape, out_shape, nonzero_only):
        # The depthwise step is strided; the 1x1 pointwise step runs at the same output grid.
        return positions(out_shape, layer.filters) * (size(layer.depthwise_kernel, nonzero_only)
                                                       + size(layer.pointwise_kernel, nonzero_only))
