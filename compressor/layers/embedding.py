"""Embedding: a lookup table whose last axis is a producer's units (the embedding width). It reads
integer ids, not channels, so nothing upstream is coupled to it."""
from __future__ import annotations

from compressor.core._tf import keras
from compressor.layers.base import Cut, Handler, register, take
from compressor.layers.layout import single

_L = keras.layers


@register
class Embedding(Handler):
    kinds = (_L.Embedding,)
    family = "embedding"

    def units(self, layer):
        return int(layer.output_dim)

    def unit_kernel(self, layer):
        return layer.embeddings

    def propagate(self, layer, ins, shapes, graph):
        graph.add_producer(layer.name, self.units(layer))
        return single(layer.name, self.units(layer))

    def resize(self, layer, cut: Cut):
        config = layer.get_config()
        config["output_dim"] = len(cut.out_kept)
        return config, [take(layer.embeddings.numpy(), cut.out_kept, axis=-1)]

