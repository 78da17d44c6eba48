"""Layers that act on every channel on its own with no per-channel weights: activations, dropout
and noise, pooling, padding, cropping, upsampling. A channel keeps its identity through them."""
from __future__ import annotations

from compressor.core._tf import keras
from compressor.layers import keras3_layers
from compressor.layers.base import CROSS_UNIT_ACTIVATIONS, Blocked, Handler, activation_name, register
from compressor.layers.keras3_layers import StochasticDepth

_L = keras.layers

DROPOUT = (_L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D, _L.GaussianNoise,
           _L.GaussianDropout, _L.AlphaDropout, _L.ActivityRegularization)
POOLING = (_L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D, _L.AveragePooling1D, _L.AveragePooling2D,
           _L.AveragePooling3D, _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D,
           _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D)


@register
class Activations(Handler):
    kinds = (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU, _L.ThresholdedReLU)
    family = "activation"
    keras3 = {"LeakyReLU": keras3_layers.renamed(_L.LeakyReLU, {"negative_slope": "alpha"})}
    observe_through = True

    def propagate(self, layer, ins, shapes, graph):
        if activation_name(layer) in CROSS_UNIT_ACTIVATIONS:
            raise Blocked(f"activation {activation_name(layer)} normalises across channels")
        return ins[0]


@register
class Softmax(Handler):
    kinds = (_L.Softmax,)
    family = "activation"

    def propagate(self, layer, ins, shapes, graph):
        raise Blocked("Softmax normalises across its axis")


@register
class Dropout(Handler):
    kinds = (*DROPOUT, StochasticDepth)  # StochasticDepth: drops a whole sample's branch, identity at inference
    keras3 = {"StochasticDepth": keras3_layers.ours(StochasticDepth)}
    family = "dropout/noise"
    observe_through = True
    route_through = True


@register
class Pooling(Handler):
    kinds = POOLING
    family = "pooling"
    route_through = True


@register
class Spatial(Handler):
    kinds = (_L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D, _L.Cropping1D, _L.Cropping2D,
             _L.Cropping3D, _L.UpSampling1D, _L.UpSampling2D, _L.UpSampling3D, _L.RepeatVector)
    family = "padding/cropping/upsampling"
