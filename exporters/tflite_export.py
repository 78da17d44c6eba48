"""TFLite writers: float with sparse encoding, and full-integer int8 with sparse encoding.

`EXPERIMENTAL_SPARSITY` makes the converter store pruned tensors compactly; whether the sparse
kernel then runs depends on the block pattern (float: 4x1 blocks, int8: 16x1 on FULLY_CONNECTED;
random zeros get a DENSIFY op and run dense), which the weight stage chose.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.core import CompressorError, keras, quiet_stderr, tf
from exporters.files import write_bytes_atomic


def _converter(model: keras.Model) -> "tf.lite.TFLiteConverter":
    return tf.lite.TFLiteConverter.from_keras_model(model)


def export_float(model: keras.Model, path: str | Path, sparse: bool = True) -> Path:
    conv = _converter(model)
    if sparse:
        conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return write_bytes_atomic(path, _convert(conv, model))


def export_int8(model: keras.Model, path: str | Path, calibration: np.ndarray, sparse: bool = True,
                samples: int = 200) -> Path:
    """Full-integer weights and activations (float32 input/output kept for drop-in use)."""
    dtype = tf.as_dtype(model.inputs[0].dtype)
    calib = calibration[:samples]
    # in the model's input type: token ids stay ids (rounded), the representative data is fed as is
    calib = np.rint(calib).astype(dtype.as_numpy_dtype) if dtype.is_integer else calib.astype(np.float32)

    def representative():
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT] + ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else [])
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return write_bytes_atomic(path, _convert(conv, model))


def export_dynamic_range(model: keras.Model, path: str | Path, sparse: bool = True) -> Path:
    """int8 weights, float activations quantized on the fly: keeps the accuracy of models whose
    activations full-integer int8 cannot hold (attention softmax, LayerNorm, GELU of a transformer)."""
    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT] + ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else [])
    return write_bytes_atomic(path, _convert(conv, model))


def export_for_target(model: keras.Model, path: str | Path, *, calibration: np.ndarray | None = None,
                      sparse: bool = True, int8: bool = False, encode: bool = True, dynamic: bool = False) -> Path:
    """The registry's exporter (exporters/targets.py): float or int8, sparse storage when asked and allowed."""
    if dynamic:
        return export_dynamic_range(model, path, sparse=sparse and encode)
    if int8:
        return export_int8(model, path, calibration, sparse=sparse and encode)
    return export_float(model, path, sparse=sparse and encode)


def _first_error(text: str) -> str:
    """The converter's own summary line, e.g. "error: 'tf.TensorListReserve' op requires …"."""
    for line in text.splitlines():
        if "error:" in line:
            return line[line.rindex("error:") + len("error:"):].strip()[:240]
    return ""


def _convert(conv, model) -> bytes:
    try:
        with quiet_stderr() as captured:
            return conv.convert()
    except Exception as exc:  # the converter raises many types; the user needs the cause, not the stack
        detail = _first_error("".join(captured)) or _first_error(str(exc)) or str(exc).strip().splitlines()[0][:240]
        raise CompressorError(
            f"TFLite conversion of model '{model.name}' failed: {detail}; drop the tflite targets from the recipe "
            "or replace the layer that needs TF ops"
        ) from exc
