"""Export forms: static-shape stand-ins for layers whose tf-keras code computes shapes at run time
(and the depthwise form of a grouped conv with one group per channel, see GroupedAsDepthwise).

Why: the exported files keep a dynamic batch dimension, and tf-keras' `Dense` on a rank-3 input
(`tf.tensordot`), `EinsumDense`/`MultiHeadAttention` (`tf.einsum`) and `LayerNormalization` (its
fused path reshapes to [1, prod(leading dims), C, 1]) then compute every reshape target from
`tf.shape` at run time. Both converters keep that arithmetic: a 2-block transformer encoder
(d_model 64) became 202 LiteRT ops of which 14 were FULLY_CONNECTED and 4 BATCH_MATMUL, the rest
Shape/Gather/ReduceProd/Pack/Reshape; in onnxruntime ~65% of node time went to shape ops. Shrinking
the matmuls then barely moves latency, so pruning could not pay.

The forms below compute the same function with every shape a constant except the batch (a reshape
with -1 for the batch, matmuls on the last axis, layer norm as means over the last axis). They are
used only when the model is handed to a converter (`compressor.core.export_form`), never in the
user's or the pruned Keras model; a layer whose non-batch dimensions are not all static, or that is
called with masks (but attention's rank-3 attention_mask), keeps its own code. Weights are held in the
layout the converters store (query/key/value kernels (d_model, heads * head_dim), output kernel
(heads * head_dim, d_model)), so verification lays the files' tensors over these kernels channel by
channel; the query kernel and bias carry attention's 1/sqrt(head_dim) scale.
"""
from __future__ import annotations

import math

import numpy as np

from compressor.core._tf import keras, tf


def _static(shape) -> bool:
    """All dimensions but the batch are known."""
    return shape is not None and len(shape) >= 2 and all(d is not None for d in shape[1:])


def _apply_activation(name: str, activation, x):
    if name == "gelu":
        # exact GELU through erf: LiteRT fuses it into one GELU op, and ONNX has Erf but no Erfc (tf.nn.gelu)
        return x * 0.5 * (1.0 + tf.math.erf(x / math.sqrt(2.0)))
    return activation(x)


class _ExportLayer(keras.layers.Layer):
    """Holds fixed weight values; built with them as initial values (never trained)."""

    def __init__(self, values: dict[str, np.ndarray], name: str):
        super().__init__(name=name, trainable=False)
        self._values = values

    def build(self, input_shape):
        for key, value in self._values.items():
            setattr(self, key, self.add_weight(
                name=key, shape=value.shape, dtype=tf.float32, trainable=False,
                initializer=keras.initializers.Constant(value)))
        super().build(input_shape)


def _flat(x):
    """(batch, ..., C) -> (batch * ..., C) with a constant target."""
    return tf.reshape(x, [-1, int(x.shape[-1])])


def _affine(flat, kernel, bias):
    y = tf.matmul(flat, kernel)  # 2-D: FULLY_CONNECTED in LiteRT, Gemm in onnxruntime
    return y if bias is None else y + bias


class StaticDense(_ExportLayer):
    """Dense on a rank >= 3 input (tf-keras uses tf.tensordot, which reads tf.shape at run time)."""

    def __init__(self, layer):
        values = {"kernel": layer.kernel.numpy()}
        if layer.use_bias:
            values["bias"] = layer.bias.numpy()
        super().__init__(values, layer.name)
        self._activation = layer.activation
        self._activation_name = getattr(layer.activation, "__name__", "")
        self._units = int(layer.units)

    def call(self, inputs):
        y = _affine(_flat(inputs), self.kernel, getattr(self, "bias", None))
        y = _apply_activation(self._activation_name, self._activation, y)
        return tf.reshape(y, [-1, *(int(d) for d in inputs.shape[1:-1]), self._units])


class StaticMultiHeadAttention(_ExportLayer):
    """Self- or cross-attention on (batch, tokens, features) inputs, optionally masked."""

    def __init__(self, layer):
        heads, key_dim = int(layer._num_heads), int(layer._key_dim)
        value_dim = int(layer._value_dim or key_dim)
        values = {}
        scale = 1.0 / math.sqrt(float(key_dim))  # folded into the query projection: one Mul less
        for key, sub, factor in (("query", layer._query_dense, scale), ("key", layer._key_dense, 1.0),
                                 ("value", layer._value_dense, 1.0)):
            kernel = sub.kernel.numpy() * np.float32(factor)
            values[f"{key}_kernel"] = kernel.reshape(kernel.shape[0], -1)
            if sub.bias is not None:
                values[f"{key}_bias"] = sub.bias.numpy().reshape(-1) * np.float32(factor)
        out = layer._output_dense
        values["output_kernel"] = out.kernel.numpy().reshape(heads * value_dim, -1)
        if out.bias is not None:
            values["output_bias"] = out.bias.numpy()
        super().__init__(values, layer.name)
        self._heads, self._key_dim, self._value_dim = heads, key_dim, value_dim

    def _split(self, x, which: str, depth: int, perm):
        """Project and split heads: (batch, tokens, C) -> heads-major layout given by perm."""
        y = _affine(_flat(x), getattr(self, f"{which}_kernel"), getattr(self, f"{which}_bias", None))
        return tf.transpose(tf.reshape(y, [-1, int(x.shape[1]), self._heads, depth]), perm)

    def call(self, query, value, key=None, attention_mask=None, **_unused):
        key = value if key is None else key
        q = self._split(query, "query", self._key_dim, [0, 2, 1, 3])
        k = self._split(key, "key", self._key_dim, [0, 2, 3, 1])
        v = self._split(value, "value", self._value_dim, [0, 2, 1, 3])
        scores = tf.matmul(q, k)  # (batch, heads, T, S)
        if attention_mask is not None:  # (batch, T or 1, S), tf-keras' masked softmax: -1e9 where masked
            keep = tf.expand_dims(tf.cast(attention_mask, scores.dtype), 1)
            scores += (1.0 - keep) * -1e9
        scores = tf.nn.softmax(scores, axis=-1)
        context = tf.transpose(tf.matmul(scores, v), [0, 2, 1, 3])  # (batch, T, heads, value_dim)
        context = tf.reshape(context, [-1, self._heads * self._value_dim])
        y = _affine(context, self.output_kernel, getattr(self, "output_bias", None))
        return tf.reshape(y, [-1, int(query.shape[1]), int(self.output_kernel.shape[-1])])


class StaticLayerNorm(_ExportLayer):
    """LayerNormalization over the last axis as means over that axis (no fused reshape)."""

    def __init__(self, layer):
        values = {}
        if layer.scale:
            values["gamma"] = layer.gamma.numpy()
        if layer.center:
            values["beta"] = layer.beta.numpy()
        super().__init__(values, layer.name)
        self._epsilon = float(layer.epsilon)

    def call(self, inputs):
        mean = tf.reduce_mean(inputs, axis=-1, keepdims=True)
        centred = inputs - mean
        variance = tf.reduce_mean(tf.pow(centred, 2.0), axis=-1, keepdims=True)
        y = centred / tf.sqrt(variance + self._epsilon)
        if hasattr(self, "gamma"):
            y = y * self.gamma
        if hasattr(self, "beta"):
            y = y + self.beta
        return y


class GroupedAsDepthwise(_ExportLayer):
    """A Conv2D with one group per channel (Keras 3 ConvNeXt writes its depthwise conv so) as the
    depthwise conv it computes: tf-keras runs a grouped Conv2D through a nested tf.function, which
    tf2onnx leaves as a PartitionedCall that onnxruntime refuses (the whole dense ConvNeXt file),
    and both converters have a native depthwise op. Kernel (kh, kw, 1, C) -> (kh, kw, C, 1)."""

    def __init__(self, layer):
        values = {"depthwise_kernel": np.transpose(layer.kernel.numpy(), (0, 1, 3, 2))}
        if layer.use_bias:
            values["bias"] = layer.bias.numpy()
        super().__init__(values, layer.name)
        self._strides = (1, *layer.strides, 1)
        self._padding = layer.padding.upper()
        self._dilations = tuple(layer.dilation_rate)
        self._activation = layer.activation
        self._activation_name = getattr(layer.activation, "__name__", "")

    def call(self, inputs):
        y = tf.nn.depthwise_conv2d(inputs, self.depthwise_kernel, self._strides, self._padding,
                                   dilations=self._dilations)
        if hasattr(self, "bias"):
            y = y + self.bias
        return _apply_activation(self._activation_name, self._activation, y)


def grouped_conv_form(layer, input_shapes):
    if not isinstance(layer, keras.layers.Conv2D) or layer.data_format != "channels_last":
        return None
    if len(input_shapes) != 1 or not _static(input_shapes[0]):
        return None
    return GroupedAsDepthwise(layer)


def dense_form(layer, input_shapes):
    if len(input_shapes) != 1 or len(input_shapes[0]) < 3 or not _static(input_shapes[0]):
        return None
    return StaticDense(layer)


def attention_form(layer, input_shapes, call_kwargs: dict):
    """MultiHeadAttention over (batch, tokens, features) with the default attention axis; an
    attention_mask of rank 3 (KerasHub's padding mask) is applied as tf-keras applies it."""
    if any(call_kwargs.get(k) for k in ("use_causal_mask", "return_attention_scores")):
        return None
    mask = call_kwargs.get("attention_mask")
    if mask is not None and len(getattr(mask, "shape", ())) != 3:
        return None
    if layer._attention_axes not in (None, (1,), [1]) or layer._output_shape is not None:
        return None
    if not input_shapes or any(len(s) != 3 or not _static(s) for s in input_shapes):
        return None
    return StaticMultiHeadAttention(layer)


def layer_norm_form(layer, input_shapes):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    shape = input_shapes[0] if len(input_shapes) == 1 else None
    if shape is None or not _static(shape) or list(axis) not in ([-1], [len(shape) - 1]):
        return None
    return StaticLayerNorm(layer)


def _own_nodes(model, layer) -> list:
    """The layer's calls in this model: a layer object shared with another model (tfmot's
    strip_pruning hands back the wrapped layers) also lists the other model's calls."""
    keys = getattr(model, "_network_nodes", None)
    nodes = layer.inbound_nodes
    if not keys:
        return nodes
    return [node for i, node in enumerate(nodes) if f"{layer.name}_ib-{i}" in keys]


def export_model(model, form_of):
    """A clone of `model` where `form_of(layer, input_shapes, call_kwargs)` returns a stand-in, or
    `model` itself when no layer has one (convnets: nothing to replace, nothing cloned)."""
    forms = {}
    for layer in model.layers:
        nodes = _own_nodes(model, layer)
        if len(nodes) != 1:
            continue  # a layer called several times keeps its own code
        shapes = [tuple(t.shape) for t in tf.nest.flatten(nodes[0].input_tensors)]
        form = form_of(layer, shapes, dict(nodes[0].call_kwargs))
        if form is not None:
            forms[layer.name] = form
    if not forms:
        return model

    def clone(layer):
        if layer.name in forms:
            return forms[layer.name]
        new = type(layer).from_config(layer.get_config())
        new._name = layer.name
        return new

    exported = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name not in forms and layer.weights:
            exported.get_layer(layer.name).set_weights(layer.get_weights())
    return exported
