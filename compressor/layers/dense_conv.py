"""Dense and plain convolutions: the producers. Their units are the last axis of the kernel; they
read their input channels as kernel rows (axis -2), so a removed upstream unit is a row cut (or a
row folded onto its kept twin when the cluster stage merges units)."""
from __future__ import annotations

from compressor.core._tf import keras
from compressor.layers.base import (
    CROSS_UNIT_ACTIVATIONS,
    Blocked,
    Cut,
    Handler,
    activation_name,
    fold_rows,
    map_weights,
    positions,
    register,
    size,
    take,
)
from compressor.layers.export_forms import dense_form, grouped_conv_form
from compressor.layers.layout import single

_L = keras.layers


@register
class DenseConv(Handler):
    kinds = (_L.Dense, _L.Conv1D, _L.Conv2D, _L.Conv3D)
    family = "dense/conv"
    foldable = True
    magnitude_kernel = "kernel"

    def check(self, layer):
        if getattr(layer, "groups", 1) != 1 and not _depthwise_like(layer):
            return "grouped convolution"
        return super().check(layer)

    def units(self, layer):
        if _depthwise_like(layer):
            return None  # one filter per input channel: it follows its input, like DepthwiseConv
        return int(layer.units if isinstance(layer, _L.Dense) else layer.filters)

    def propagate(self, layer, ins, shapes, graph):
        if _depthwise_like(layer):
            if ins[0].outer != 1:
                raise Blocked("convolution over a flattened layout")
            return ins[0].touched(layer.name)
        units = self.units(layer)
        graph.add_producer(layer.name, units)
        if activation_name(layer) in CROSS_UNIT_ACTIVATIONS:
            graph.block_space(layer.name,
                              f"'{layer.name}' has activation {activation_name(layer)}, which mixes its units")
        if not isinstance(layer, _L.Dense) and ins[0].outer != 1:
            raise Blocked("convolution over a flattened layout")
        return single(layer.name, units)

    def resize(self, layer, cut: Cut):
        config = layer.get_config()
        if _depthwise_like(layer):  # ConvNeXt's depthwise conv (Keras 3 writes Conv2D(groups=C))
            kept = cut.positions[0]
            config["filters"] = config["groups"] = len(kept)
            return config, map_weights(layer, lambda short, value: take(value, kept, axis=-1))
        config["units" if isinstance(layer, _L.Dense) else "filters"] = len(cut.out_kept)

        def rule(short, value):
            if short == "kernel":
                value = take(fold_rows(value, cut.pairs, axis=-2), cut.positions[0], axis=-2)
                return take(value, cut.out_kept, axis=-1)
            return take(value, cut.out_kept, axis=0) if short == "bias" else value

        return config, map_weights(layer, rule)

    def macs(self, layer, in_shape, out_shape, nonzero_only):
        units = layer.units if isinstance(layer, _L.Dense) else layer.filters
        return positions(out_shape, int(units)) * size(layer.kernel, nonzero_only)

    def export_form(self, layer, input_shapes, call_kwargs):
        if _depthwise_like(layer):
            return grouped_conv_form(layer, input_shapes)
        return dense_form(layer, input_shapes) if type(layer) is _L.Dense else None


def _depthwise_like(layer) -> bool:
    """A grouped conv with one group per input and output channel computes a depthwise conv."""
    groups = int(getattr(layer, "groups", 1) or 1)
    return (groups > 1 and groups == int(layer.filters) == int(layer.kernel.shape[-1])
            and int(layer.kernel.shape[-2]) == 1)


@register
class ConvTranspose(Handler):
    """Counted for MACs; channel removal through transposed convolutions is not supported."""

    kinds = (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)
    left_whole = True
    family = "transposed conv"

    def check(self, layer):
        return "transposed convolution"

    def macs(self, layer, in_shape, out_shape, nonzero_only):
        kernel = layer.kernel  # (..., filters, in_channels): each input position scatters the kernel
        return positions(in_shape, int(kernel.shape[-1])) * size(kernel, nonzero_only)
