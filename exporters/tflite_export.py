"""TFLite writers: float with sparse encoding, and full-integer int8 with sparse encoding.

`EXPERIMENTAL_SPARSITY` makes the converter store pruned tensors compactly; whether the sparse
kernel then runs depends on the block pattern (float: 4x1 blocks, int8: 16x1 on FULLY_CONNECTED;
random zeros get a DENSIFY op and run dense), which the weight stage chose.

Recurrent layers (LSTM, GRU, SimpleRNN, Bidirectional) are converted unrolled: tf-keras runs them as
a while loop over a TensorList whose element shape holds the batch, which the converter refuses
with a dynamic batch ("'tf.TensorListReserve' op requires element_shape to be static"). Its fused
UNIDIRECTIONAL_SEQUENCE_LSTM needs a fixed batch, and LiteRT then cannot resize the file's input
(the state tensors keep batch 1). Unrolled over the fixed sequence length, each step is
FULLY_CONNECTED + LOGISTIC/TANH/MUL/ADD, which every LiteRT kernel runs at any batch, int8 included.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.core import CompressorError, inputs, keras, quiet_stderr, tf
from exporters.files import write_bytes_atomic
from exporters.float_inputs import leading_normalizations, tflite_nodes


def _converter(model: keras.Model) -> "tf.lite.TFLiteConverter":
    return tf.lite.TFLiteConverter.from_keras_model(unrolled(model))


def _recurrent(layer) -> bool:
    L = keras.layers
    if isinstance(layer, L.Bidirectional):
        return True
    return isinstance(layer, (L.LSTM, L.GRU, L.SimpleRNN))


def _unrolled_config(layer) -> dict:
    """The layer's config with `unroll` on (both directions of a Bidirectional)."""
    config = layer.get_config()
    if isinstance(layer, keras.layers.Bidirectional):
        for key in ("layer", "backward_layer"):
            if config.get(key):
                config[key]["config"]["unroll"] = True
        return config
    config["unroll"] = True
    return config


def _check_unrollable(layer) -> None:
    inner = layer.forward_layer if isinstance(layer, keras.layers.Bidirectional) else layer
    shape = tuple(layer.input_shape) if not isinstance(layer.input_shape, list) else tuple(layer.input_shape[0])
    if inner.stateful:
        raise CompressorError(f"recurrent layer '{layer.name}' is stateful, which LiteRT cannot run unrolled; "
                              "rebuild it with stateful=False or drop the tflite targets from the recipe")
    if len(shape) < 2 or shape[1] is None:
        raise CompressorError(f"recurrent layer '{layer.name}' reads sequences of unknown length {shape}, which "
                              "LiteRT cannot convert; build the model with a fixed length (keras.Input((steps, "
                              "features))) or drop the tflite targets from the recipe")


def unrolled(model: keras.Model) -> keras.Model:
    """`model` with its recurrent layers unrolled over their fixed sequence length (why: module
    docstring); every other layer is shared with `model`, not copied. `model` itself if it has none."""
    if not any(_recurrent(layer) for layer in model.layers):
        return model
    fresh = {}

    def clone(layer):
        if not _recurrent(layer):
            return layer
        _check_unrollable(layer)
        fresh[layer.name] = layer
        return type(layer).from_config(_unrolled_config(layer))

    copy = keras.models.clone_model(model, clone_function=clone)
    for name, layer in fresh.items():
        copy.get_layer(name).set_weights(layer.get_weights())
    return copy


def export_float(model: keras.Model, path: str | Path, sparse: bool = True) -> Path:
    conv = _converter(model)
    if sparse:
        conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return write_bytes_atomic(path, convert(conv, model))


def export_int8(model: keras.Model, path: str | Path, calibration: np.ndarray, sparse: bool = True,
                samples: int = 200) -> Path:
    """Full-integer weights and activations (float32 input/output kept for drop-in use)."""
    # in the model's input type: token ids stay ids (rounded), the representative data is fed as is
    if inputs.is_multi(calibration):  # several inputs: one sample of each, keyed by the signature's names
        calib = {n: _typed(np.asarray(calibration[n])[:samples], t) for n, t in zip(inputs.names(model), model.inputs)}
    else:
        calib = _typed(calibration[:samples], model.inputs[0])

    def representative():
        for i in range(inputs.count(calib)):
            one = inputs.rows(calib, slice(i, i + 1))
            yield one if inputs.is_multi(one) else [one]

    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT] + ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else [])
    conv.representative_dataset = representative
    float_layers = leading_normalizations(model)
    if float_layers:  # quantize from the Normalization's output (exporters/float_inputs.py)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]  # the debugger takes no sparsity: encoded afterwards
        return write_bytes_atomic(path, _selective(conv, model, representative, float_layers, sparse))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return write_bytes_atomic(path, convert(conv, model))


def _selective(conv, model: keras.Model, representative, float_layers: list[str], sparse: bool) -> bytes:
    """Full-integer int8 but for `float_layers`' ops, through the converter's quantization debugger
    (its documented selective quantization: denylisted nodes keep float kernels); sparse storage
    by the converter's own sparsity pass on the result (the debugger refuses EXPERIMENTAL_SPARSITY)."""
    from tensorflow.lite.python.convert import mlir_sparsify

    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=tflite_nodes(model, float_layers))
    try:
        with quiet_stderr():
            debugger = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=representative,
                                                                 debug_options=options)
            flat = debugger.get_nondebug_quantized_model()
            return mlir_sparsify(flat) if sparse else flat
    except Exception as exc:
        raise CompressorError(f"TFLite int8 conversion of model '{model.name}' with {', '.join(float_layers)} kept "
                              f"in float failed: {str(exc).strip()[:200]}; drop tflite-int8 from the recipe's "
                              "targets") from exc


def _typed(samples: np.ndarray, tensor) -> np.ndarray:
    dtype = tf.as_dtype(tensor.dtype)
    return np.rint(samples).astype(dtype.as_numpy_dtype) if dtype.is_integer else samples.astype(np.float32)


def export_dynamic_range(model: keras.Model, path: str | Path, sparse: bool = True) -> Path:
    """int8 weights, float activations quantized on the fly: keeps the accuracy of models whose
    activations full-integer int8 cannot hold (attention softmax, LayerNorm, GELU of a transformer)."""
    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT] + ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else [])
    return write_bytes_atomic(path, convert(conv, model))


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


def convert(conv, model) -> bytes:
    try:
        with quiet_stderr() as captured:
            return conv.convert()
    except Exception as exc:  # the converter raises many types; the user needs the cause, not the stack
        detail = _first_error("".join(captured)) or _first_error(str(exc)) or str(exc).strip().splitlines()[0][:240]
        raise CompressorError(
            f"TFLite conversion of model '{model.name}' failed: {detail}; drop the tflite targets from the recipe "
            "or replace the layer that needs TF ops"
        ) from exc
