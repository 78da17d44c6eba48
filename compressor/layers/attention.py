"""MultiHeadAttention: its removable units are whole heads. tf-keras keeps the query/key/value
kernels as (d_model, heads, head_dim) with biases (heads, head_dim) and the output kernel as
(heads, head_dim, d_model), so removing heads is a slice on the heads axis of all four projections
and a rebuild with fewer `num_heads`; input and output widths (the residual stream) are kept."""
from __future__ import annotations

import numpy as np

from compressor.core._tf import keras, tf
from compressor.layers import keras3_layers
from compressor.layers.base import Cut, Handler, register, size, take
from compressor.layers.export_forms import attention_form

_L = keras.layers


def _projections(layer):
    """(sublayer, heads axis of its kernel, heads axis of its bias) for q, k, v and the output."""
    return [(layer._query_dense, 1, 0), (layer._key_dense, 1, 0), (layer._value_dense, 1, 0),
            (layer._output_dense, 0, None)]


@register
class MultiHeadAttention(Handler):
    kinds = (_L.MultiHeadAttention,)
    family = "attention"
    units_on_output = False
    keras3 = {"MultiHeadAttention": keras3_layers.multi_head_attention}

    def units(self, layer):
        return int(layer._num_heads)

    def propagate(self, layer, ins, shapes, graph):
        graph.add_producer(layer.name, self.units(layer))
        for layout in ins:
            for space in layout.spaces:
                graph.block_space(space, f"read by attention '{layer.name}', whose input width is kept")
        return graph.fresh_output(layer, "attention output width follows its query width")

    def unit_sq(self, layer):
        heads = self.units(layer)
        total = tf.zeros((heads,))
        for sub, k_axis, b_axis in _projections(layer):
            kernel = tf.reshape(tf.experimental.numpy.moveaxis(sub.kernel, k_axis, 0), (heads, -1))
            total += tf.reduce_sum(tf.square(kernel), axis=1)
            if b_axis is not None and sub.bias is not None:
                total += tf.reduce_sum(tf.square(tf.reshape(sub.bias, (heads, -1))), axis=1)
        return total

    def unit_kernel(self, layer):
        return None

    def resize(self, layer, cut: Cut):
        config = layer.get_config()
        config["num_heads"] = len(cut.out_kept)
        axis_of = {}
        for sub, k_axis, b_axis in _projections(layer):
            axis_of[id(sub.kernel)] = k_axis
            if sub.bias is not None:
                axis_of[id(sub.bias)] = b_axis
        weights = []
        for variable in layer.weights:
            axis = axis_of.get(id(variable))
            value = variable.numpy()
            weights.append(value if axis is None else take(value, cut.out_kept, axis=axis))
        return config, weights

    def macs(self, layer, in_shape, out_shape, nonzero_only):
        tokens = int(np.prod(in_shape[:-1]))
        kv_tokens = tokens  # self-attention; cross-attention with another length is rare in encoders
        projections = sum(size(sub.kernel, nonzero_only) for sub, _, _ in _projections(layer))
        attention = int(layer._num_heads) * (int(layer._key_dim) + int(layer._value_dim or layer._key_dim))
        return tokens * projections + tokens * kv_tokens * attention

    def export_form(self, layer, input_shapes, call_kwargs):
        return attention_form(layer, input_shapes, call_kwargs)
