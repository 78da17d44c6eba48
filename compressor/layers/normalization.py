"""Per-channel normalisation and scaling: BatchNormalization, Keras' Normalization, LayerScale-style
per-channel gains and PReLU follow their input's channels (their weights are sliced with it);
LayerNormalization normalises *across* channels, so removing one would change every other."""
from __future__ import annotations

import numpy as np

from compressor.core._tf import keras
from compressor.layers import keras3_layers
from compressor.layers.base import Blocked, Cut, Handler, is_last_axis, map_weights, register, take
from compressor.layers.export_forms import layer_norm_form
from compressor.layers.keras3_layers import ConstantTerm as ConstantTermLayer
from compressor.layers.keras3_layers import LayerScale as LayerScaleLayer

_L = keras.layers


@register
class PerChannel(Handler):
    """Channel-wise affine layers: every weight with a channel axis is sliced on its last axis."""

    kinds = (_L.BatchNormalization, _L.PReLU)
    family = "per-channel normalisation"
    observe_through = True

    def propagate(self, layer, ins, shapes, graph):
        axis = getattr(layer, "axis", -1)
        if isinstance(layer, _L.BatchNormalization) and not is_last_axis(axis, len(shapes[0])):
            raise Blocked("BatchNormalization not on the channel axis")
        return ins[0].touched(layer.name)

    def resize(self, layer, cut: Cut):
        width = cut.layouts[0].width

        def rule(short, value):
            if value.ndim and value.shape[-1] == width and width > 1:
                return take(value, cut.positions[0], axis=-1)
            return value  # shared alpha / scalar count

        return None, map_weights(layer, rule)


@register
class KerasNormalization(PerChannel):
    """`keras.layers.Normalization` (EfficientNet's input standardisation): mean/variance per channel."""

    kinds = (_L.Normalization,)
    family = "input normalisation"
    observe_through = False

    def propagate(self, layer, ins, shapes, graph):
        if not is_last_axis(getattr(layer, "axis", -1), len(shapes[0])):
            raise Blocked("Normalization not on the channel axis")
        return ins[0].touched(layer.name)


@register
class LayerScale(PerChannel):
    """ConvNeXt's per-channel residual gain (the tf-keras class Keras 3 imports are rebuilt with)."""

    kinds = (LayerScaleLayer,)
    family = "layer scale"
    keras3 = {"LayerScale": keras3_layers.ours(LayerScaleLayer)}

    def propagate(self, layer, ins, shapes, graph):
        return ins[0].touched(layer.name)

    def resize(self, layer, cut: Cut):
        config = layer.get_config()
        config["projection_dim"] = len(cut.positions[0])
        return config, super().resize(layer, cut)[1]


@register
class ConstantTerm(Handler):
    """x + c, x * c, ... with a stored constant (Keras 3 inline tensors): a constant with a channel
    axis is sliced with its input's channels; one broadcast over channels leaves them alone."""

    kinds = (ConstantTermLayer,)
    family = "constant term"

    def propagate(self, layer, ins, shapes, graph):
        if layer.constant_shape and layer.constant_shape[-1] > 1:
            return ins[0].touched(layer.name)
        return ins[0]

    def resize(self, layer, cut: Cut):
        value = layer.constant.numpy()
        if not value.ndim or value.shape[-1] == 1:
            return None, None
        config = layer.get_config()
        config["shape"] = [*value.shape[:-1], len(cut.positions[0])]
        return config, [take(value, cut.positions[0], axis=-1)]


@register
class Rescaling(Handler):
    kinds = (_L.Rescaling,)
    family = "rescaling"

    def propagate(self, layer, ins, shapes, graph):
        if np.ndim(layer.scale) or np.ndim(layer.offset):
            raise Blocked("per-channel scale or offset stored in the config")
        return ins[0]


@register
class LayerNorm(Handler):
    kinds = (_L.LayerNormalization,)
    family = "layer normalisation"
    keras3 = {"LayerNormalization": keras3_layers.layer_normalization}

    def propagate(self, layer, ins, shapes, graph):
        raise Blocked("normalises across channels: the residual-stream width is kept")

    def export_form(self, layer, input_shapes, call_kwargs):
        return layer_norm_form(layer, input_shapes)
