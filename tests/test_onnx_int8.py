"""int8 files at deployment shape run int8 end to end: no float convolution is left in the graph
onnxruntime runs (residual Add, Concatenate, pooling, Pad and activations inside int8, no
Quantize/Dequantize or Transpose between the convs), and LiteRT's int8 file has no float conv."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from compressor.core._tf import keras
from exporters import onnx_export, targets
from exporters.onnx_quant import fold_pad_into_maxpool, optimized_op_counts

L = keras.layers


def _block(x, expand: int, out: int, stride: int):
    """An inverted residual block as MobileNetV2 writes it (ZeroPadding before a strided depthwise)."""
    y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(expand, 1, use_bias=False)(x)))
    if stride == 2:
        y = L.ZeroPadding2D(((0, 1), (0, 1)))(y)
    y = L.DepthwiseConv2D(3, stride, padding="same" if stride == 1 else "valid", use_bias=False)(y)
    y = L.BatchNormalization()(L.Conv2D(out, 1, use_bias=False)(L.ReLU(6.0)(L.BatchNormalization()(y))))
    return L.Add()([x, y]) if stride == 1 and x.shape[-1] == out else y


def small_convnet(size: int = 96) -> keras.Model:
    """ResNet's stem (ZeroPadding, 7x7/2 conv, ReLU, ZeroPadding, 3x3/2 MaxPool), inverted residual
    blocks with Adds, a Concatenate of two branches, global pooling and a softmax classifier."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3))
    x = L.Conv2D(16, 7, 2, use_bias=False)(L.ZeroPadding2D(3)(inp))
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.MaxPooling2D(3, 2)(L.ZeroPadding2D(1)(x))
    x = _block(_block(x, 32, 16, 1), 48, 24, 2)
    x = _block(x, 48, 24, 1)
    x = L.Concatenate()([L.ReLU()(L.Conv2D(16, 1)(x)), L.ReLU()(L.Conv2D(16, 3, padding="same")(x))])
    return keras.Model(inp, L.Dense(10, activation="softmax")(L.GlobalAveragePooling2D()(x)))


def _convs(model) -> int:
    return sum(isinstance(layer, (L.Conv2D, L.DepthwiseConv2D)) for layer in model.layers)


@pytest.fixture(scope="module")
def convnet():
    model = small_convnet()
    calib = np.random.default_rng(0).random((16, 96, 96, 3), dtype=np.float32)
    return model, calib


def test_onnxruntime_int8_runs_every_conv_in_int8_with_few_conversions(convnet, tmp_path):
    model, calib = convnet
    target = targets.target("onnxruntime-int8")
    path = target.export(model, tmp_path / "pruned-int8.onnx", calibration=calib, scheme=target.schemes[0])
    ops = optimized_op_counts(path)
    assert "Conv" not in ops and "FusedConv" not in ops, ops           # no float convolution is left
    assert ops.get("QLinearConv", 0) == _convs(model), ops
    assert ops.get("QLinearAdd", 0) == 2 and ops.get("QLinearConcat", 0) == 1, ops
    assert not {"Pad", "Add", "Concat", "MaxPool", "Relu", "Clip"} & set(ops), ops
    # one QuantizeLinear at the input, one DequantizeLinear before the float Softmax, and at most the
    # Transpose of the pooled vector: nothing bounces between int8 and float inside the network
    assert ops.get("QuantizeLinear", 0) <= 1 and ops.get("DequantizeLinear", 0) <= 1, ops
    assert ops.get("Transpose", 0) <= 1, ops


def test_a_zero_pad_before_a_max_pool_on_relu_output_is_folded_exactly(convnet, tmp_path):
    """The Pad would keep the pool out of onnxruntime's blocked float layout (two reorders) and in
    float between a Dequantize and a Quantize in the int8 graph."""
    import onnxruntime as ort

    model, calib = convnet
    proto = onnx_export.keras_to_onnx(model)
    producer = {o: n for n in proto.graph.node for o in n.output}
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    assert pools and all(producer[p.input[0]].op_type == "Relu" for p in pools)
    assert fold_pad_into_maxpool(proto) == proto  # nothing left to fold
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": calib[:4]})[0]
    np.testing.assert_allclose(out, model.predict(calib[:4], verbose=0), rtol=1e-4, atol=1e-6)


def test_litert_int8_has_no_float_conv(convnet, tmp_path):
    from exporters.runtimes import open_runner

    model, calib = convnet
    target = targets.target("tflite-int8")
    path = target.export(model, tmp_path / "pruned-int8.tflite", calibration=calib,
                         scheme=next(s for s in target.schemes if s.name == "int8-dense"))
    interpreter = open_runner(path, resolver="builtin").interpreter
    tensors = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    convs = [op for op in interpreter._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert len(convs) == _convs(model)
    assert all(tensors[op["inputs"][0]] == np.int8 for op in convs), "a float conv is left in the int8 file"
