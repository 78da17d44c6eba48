"""Input normalisation kept in float in int8 files.

A model whose input feeds a `Normalization` layer (adapted on raw features: a tabular model's
columns span up to thousands) loses its small features when int8 quantizes the raw input with one
per-tensor scale: a step of a scale spanning 0..4,254 is about 33, so features of unit scale round
to nothing (a binary MLP's full-integer file scored the majority class). The Normalization's own
ops (SUB, MUL) stay float and quantization starts from their output, where every feature has unit
scale. Folding mean and variance into the next Dense would be exact in float but leaves the raw
input quantized, so it would not help; keeping two elementwise ops in float is exact and simple.
"""
from __future__ import annotations

from compressor.core import keras, tf


def leading_normalizations(model: keras.Model) -> list[str]:
    """Names of the Normalization layers that read a model input directly."""
    names = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Normalization):
            continue
        nodes = getattr(layer, "_inbound_nodes", [])
        sources = [src for node in nodes for src in _as_list(node.inbound_layers)]
        if sources and all(isinstance(src, keras.layers.InputLayer) for src in sources):
            names.append(layer.name)
    return names


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def tflite_nodes(model: keras.Model, layers: list[str]) -> list[str]:
    """The op output tensor names `layers` convert to (from a plain float conversion): what the
    quantization debugger's `denylisted_nodes` matches."""
    from ai_edge_litert.interpreter import Interpreter

    from compressor.core import quiet_stderr

    with quiet_stderr():
        flat = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    it = Interpreter(model_content=flat)
    tensors = {t["index"]: t["name"] for t in it.get_tensor_details()}
    marks = [f"/{name}/" for name in layers]
    return [tensors[i] for op in it._get_ops_details() for i in op["outputs"]
            if any(mark in tensors[i] for mark in marks)]


def onnx_nodes(proto, layers: list[str]) -> list[str]:
    """The ONNX node names tf2onnx gave `layers`' ops (for the quantizer's `nodes_to_exclude`)."""
    marks = [f"/{name}/" for name in layers]
    return [node.name for node in proto.graph.node if any(mark in node.name for mark in marks)]
