"""Files of a quantization-aware fine-tuned model (tfmot's fake-quant layers hold its int8 ranges).

The model arrives trained (compressor/train/qat.py does the fine-tune; exporters only convert), so
no calibration pass runs: the LiteRT converter reads the ranges from the fake-quant ops
(`Optimize.DEFAULT` writes full-integer int8 weights and activations, float32 input and output),
and tf2onnx turns each fake-quant op into a QuantizeLinear/DequantizeLinear pair (a QDQ file).
"""
from __future__ import annotations

from pathlib import Path

from compressor.core import keras, tf
from exporters.files import write_bytes_atomic


def export_tflite(model: keras.Model, path: str | Path, *, calibration=None, sparse: bool = True,
                  encode: bool = True) -> Path:
    """int8 LiteRT file of a QAT model; pruned tensors stored sparse when `sparse` and `encode`."""
    from exporters.tflite_export import convert

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT] + ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
                                                       if sparse and encode else [])
    return write_bytes_atomic(path, convert(conv, model))


def export_onnx(model: keras.Model, path: str | Path, *, calibration=None, sparse: bool = True) -> Path:
    """QDQ ONNX file of a QAT model (weights and activations quantized where the fake-quant ops are)."""
    from exporters.onnx_export import keras_to_onnx

    return write_bytes_atomic(path, keras_to_onnx(model).SerializeToString())
