"""Zeros read back from exported files must match the Keras model that was exported.

Sparse Keras models are made by multiplying kernels with numpy masks (no tfmot needed), then
converted exactly as the exporters do: TFLite with EXPERIMENTAL_SPARSITY (float and full int8),
ONNX with tf2onnx (float, compacted, onnxruntime dynamic int8).
"""
from __future__ import annotations

import numpy as np
import pytest

from compressor.core._tf import keras, tf
from compressor.core.errors import CompressorError
from exporters import readback
from exporters.onnx_sparse import compact_onnx_file, to_sparse_initializers

IN, HID, OUT = 64, 32, 10


# ----------------------------------------------------------------------------- helpers (shared)


def make_model(pattern: str, sparsity: float = 0.8, seed: int = 0):
    """MLP IN-HID-OUT whose first kernel (shape (in, out)) is zeroed by a numpy mask.

    pattern: "none", "random", or "block4"/"block16" for Keras (4,1)/(16,1) blocks, i.e.
    4/16 consecutive *input* weights of one output unit.
    """
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [keras.layers.Input((IN,)), keras.layers.Dense(HID, activation="relu"), keras.layers.Dense(OUT)]
    )
    kernel, bias = model.layers[0].get_weights()
    if pattern == "none":
        mask = np.ones_like(kernel, dtype=bool)
    elif pattern == "random":
        mask = rng.random(kernel.shape) >= sparsity
    elif pattern.startswith("block"):
        b = int(pattern[len("block"):])
        mask = np.repeat(rng.random((IN // b, HID)) >= sparsity, b, axis=0)
    else:
        raise ValueError(pattern)
    # Non-zero biases so the converter keeps them as tensors.
    model.layers[0].set_weights([kernel * mask, bias + 0.1])
    k2, b2 = model.layers[1].get_weights()
    model.layers[1].set_weights([k2, b2 + 0.05])
    return model


def keras_kernel_zeros(model) -> int:
    return int(sum(np.count_nonzero(layer.get_weights()[0] == 0) for layer in model.layers))


def to_tflite(model, path, sparse: bool = True, int8: bool = False):
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    opts = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []
    if int8:
        rng = np.random.default_rng(1)

        def rep():
            for _ in range(16):
                yield [rng.random((1, IN), dtype=np.float32)]

        opts.append(tf.lite.Optimize.DEFAULT)
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    conv.optimizations = opts
    path.write_bytes(conv.convert())
    return path


def to_onnx(model, path):
    import tf2onnx

    proto, _ = tf2onnx.convert.from_keras(
        model, input_signature=[tf.TensorSpec((None, IN), tf.float32, name="x")], opset=17
    )
    path.write_bytes(proto.SerializeToString())
    return path


def tflite_op_names(path) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    interp.allocate_tensors()
    return [d["op_name"] for d in interp._get_ops_details()]


def first_kernel(tensors):
    """The stored (out, in) tensor of the first Dense layer."""
    return next(t for t in tensors if t.shape == (HID, IN))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("readback")


@pytest.fixture(scope="module")
def block4(tmp):
    m = make_model("block4")
    return m, to_tflite(m, tmp / "block4.tflite")


@pytest.fixture(scope="module")
def random_sparse(tmp):
    m = make_model("random", seed=1)
    return m, to_tflite(m, tmp / "random.tflite")


@pytest.fixture(scope="module")
def onnx_pair(tmp):
    m = make_model("random", sparsity=0.9, seed=2)
    dense = to_onnx(m, tmp / "m.onnx")
    return m, dense


# ----------------------------------------------------------------------------- TFLite


def test_dense_tflite_counts_zeros_in_dense_buffers(tmp):
    m = make_model("random", sparsity=0.5, seed=3)
    path = to_tflite(m, tmp / "dense.tflite", sparse=False)
    tensors = readback.tflite_weights(path)
    assert all(t.storage == "dense" and t.block is None for t in tensors)
    k = first_kernel(tensors)
    np.testing.assert_array_equal(k.values, m.layers[0].get_weights()[0].T)
    assert readback.count_weight_zeros(path) == (keras_kernel_zeros(m), IN * HID + HID * OUT)
    # min_rank=1 adds the two (non-zero) biases to the size, not to the zeros.
    assert readback.count_weight_zeros(path, min_rank=1) == (keras_kernel_zeros(m), IN * HID + HID * OUT + HID + OUT)


def test_block_sparse_float_tflite_is_decoded_exactly(block4):
    m, path = block4
    assert "DENSIFY" not in tflite_op_names(path)  # the sparse kernel runs
    k = first_kernel(readback.tflite_weights(path))
    assert k.storage == "sparse"
    assert k.block == (1, 4)  # (out, in) layout: 4 consecutive inputs of one output
    np.testing.assert_array_equal(k.values, m.layers[0].get_weights()[0].T)
    assert k.zeros == np.count_nonzero(m.layers[0].get_weights()[0] == 0)
    assert readback.count_weight_zeros(path)[0] == keras_kernel_zeros(m)


def test_random_sparse_float_tflite_has_densify_and_same_zeros(random_sparse):
    m, path = random_sparse
    assert "DENSIFY" in tflite_op_names(path)
    k = first_kernel(readback.tflite_weights(path))
    assert k.storage == "sparse" and k.block is None
    np.testing.assert_array_equal(k.values, m.layers[0].get_weights()[0].T)
    assert readback.count_weight_zeros(path)[0] == keras_kernel_zeros(m)
    assert 0.7 < k.sparsity < 0.9


def test_int8_block16_tflite_keeps_every_zero(tmp):
    m = make_model("block16", seed=4)
    path = to_tflite(m, tmp / "int8.tflite", int8=True)
    assert "DENSIFY" not in tflite_op_names(path)
    tensors = readback.tflite_weights(path)
    k = first_kernel(tensors)
    assert k.dtype == "int8" and k.quantized and k.storage == "sparse" and k.block == (1, 16)
    keras_zero = m.layers[0].get_weights()[0].T == 0
    # Every Keras zero is a stored zero; rounding may add a few more, never fewer.
    assert np.all(k.values[keras_zero] == 0)
    zeros, size = readback.count_weight_zeros(path)
    assert zeros >= keras_kernel_zeros(m) and size == IN * HID + HID * OUT
    # The int32 bias is quantized too and is counted only with min_rank=1.
    assert any(t.dtype == "int32" and t.quantized and t.shape == (HID,) for t in tensors)


def test_decoder_on_hand_made_block_csr():
    """A 2x8 tensor, (1,4) blocks, second dimension CSR: decoding follows TFLite's layout."""
    from ai_edge_litert import schema_py_generated as s

    def vec(values):
        v = s.Int32VectorT()
        v.values = values
        return v

    dense_dim = s.DimensionMetadataT(format=s.DimensionType.DENSE, denseSize=2)
    csr = s.DimensionMetadataT(format=s.DimensionType.SPARSE_CSR)
    csr.arraySegmentsType, csr.arraySegments = s.SparseIndexVector.Int32Vector, vec([0, 1, 2])
    csr.arrayIndicesType, csr.arrayIndices = s.SparseIndexVector.Int32Vector, vec([1, 0])
    block_dim = s.DimensionMetadataT(format=s.DimensionType.DENSE, denseSize=4)
    sp = s.SparsityParametersT(traversalOrder=[0, 1, 2], blockMap=[1], dimMetadata=[dense_dim, csr, block_dim])
    values = np.arange(1, 9, dtype=np.float32)
    dense, block = readback.decode_tflite_sparse(values, (2, 8), sp)
    expected = np.zeros((2, 8), np.float32)
    expected[0, 4:8] = [1, 2, 3, 4]
    expected[1, 0:4] = [5, 6, 7, 8]
    np.testing.assert_array_equal(dense, expected)
    assert block == (1, 4)
    with pytest.raises(ValueError):
        readback.decode_tflite_sparse(values[:5], (2, 8), sp)


def test_corrupt_and_missing_tflite(tmp, block4):
    _, path = block4
    bad = tmp / "truncated.tflite"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CompressorError):
        readback.tflite_weights(bad)
    junk = tmp / "junk.tflite"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(CompressorError, match="TFL3"):
        readback.stored_weights(junk)
    with pytest.raises(CompressorError, match="not found"):
        readback.stored_weights(tmp / "missing.tflite")
    with pytest.raises(CompressorError, match="unknown file type"):
        readback.stored_weights(tmp / "model.pb")


# ----------------------------------------------------------------------------- ONNX


def test_onnx_dense_and_sparse_initializers(tmp, onnx_pair):
    import onnx
    import onnxruntime as ort

    m, dense = onnx_pair
    expected = keras_kernel_zeros(m)
    zeros, size = readback.count_weight_zeros(dense)
    assert zeros == expected and size == IN * HID + HID * OUT
    assert all(t.storage == "dense" for t in readback.onnx_weights(dense))

    compact = tmp / "m-sparse.onnx"
    info = compact_onnx_file(dense, compact, min_sparsity=0.5)
    assert info["tensors_moved"] == 1
    assert info["bytes_after"] < info["bytes_before"] == dense.stat().st_size
    assert compact.stat().st_size == info["bytes_after"]
    assert readback.count_weight_zeros(compact) == (zeros, size)
    stored = {t.name: t for t in readback.onnx_weights(compact)}
    k = next(t for t in stored.values() if t.shape == (IN, HID))
    assert k.storage == "sparse_initializer"
    np.testing.assert_array_equal(k.values, m.layers[0].get_weights()[0])
    onnx.checker.check_model(onnx.load(str(compact)))

    x = np.random.default_rng(5).random((8, IN), dtype=np.float32)
    a = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(compact), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a, m(x).numpy(), atol=1e-5)


def test_to_sparse_initializers_skips_where_coo_does_not_pay(onnx_pair):
    import onnx

    _, dense = onnx_pair
    model = onnx.load(str(dense))
    # 90% zeros pays; at min_sparsity 0.95 nothing qualifies; the returned model is a copy.
    assert len(to_sparse_initializers(model, min_sparsity=0.95).graph.sparse_initializer) == 0
    assert len(to_sparse_initializers(model).graph.sparse_initializer) == 1
    assert len(model.graph.sparse_initializer) == 0
    with pytest.raises(CompressorError):
        to_sparse_initializers(model, min_sparsity=2.0)


def test_onnx_coordinate_indices_decode():
    from onnx import helper, numpy_helper

    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), name="w")
    indices = numpy_helper.from_array(np.array([[0, 2], [1, 0]], np.int64), name="w_idx")
    dense = readback.sparse_tensor_to_dense(helper.make_sparse_tensor(values, indices, [2, 3]))
    np.testing.assert_array_equal(dense, [[0, 0, 1.5], [-2.0, 0, 0]])


def test_tampered_onnx_changes_the_count(tmp, onnx_pair):
    import onnx
    from onnx import numpy_helper

    m, dense = onnx_pair
    model = onnx.load(str(dense))
    init = next(i for i in model.graph.initializer if tuple(i.dims) == (IN, HID))
    arr = numpy_helper.to_array(init).copy()
    flat = arr.reshape(-1)
    flat[np.flatnonzero(flat == 0)[:7]] = 0.25  # 7 stored zeros become non-zero
    init.CopyFrom(numpy_helper.from_array(arr, name=init.name))
    bad = tmp / "tampered.onnx"
    onnx.save(model, str(bad))
    assert readback.count_weight_zeros(bad)[0] == keras_kernel_zeros(m) - 7


def test_onnx_dynamic_int8_keeps_zeros(tmp, onnx_pair):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    m, dense = onnx_pair
    q = tmp / "m-int8.onnx"
    quantize_dynamic(str(dense), str(q), weight_type=QuantType.QInt8)
    tensors = [t for t in readback.onnx_weights(q) if len(t.shape) >= 2]
    assert tensors and all(t.dtype == "int8" and t.quantized for t in tensors)
    assert readback.count_weight_zeros(q)[0] >= keras_kernel_zeros(m)


def test_corrupt_onnx(tmp):
    bad = tmp / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff\xff")
    with pytest.raises(CompressorError, match="ONNX"):
        readback.onnx_weights(bad)


def test_dense_initializers_round_trip_for_quantization(tmp, onnx_pair):
    """onnxruntime.quantization rejects sparse initializers: densify first, zeros unchanged."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from exporters.onnx_sparse import to_dense_initializers

    m, dense = onnx_pair
    compact = to_sparse_initializers(onnx.load(str(dense)))
    back = to_dense_initializers(compact)
    assert len(back.graph.sparse_initializer) == 0
    onnx.checker.check_model(back)
    path = tmp / "round-trip.onnx"
    onnx.save(back, str(path))
    assert readback.count_weight_zeros(path) == readback.count_weight_zeros(dense)
    q = tmp / "round-trip-int8.onnx"
    quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8)
    assert readback.count_weight_zeros(q)[0] >= keras_kernel_zeros(m)


def test_fully_pruned_kernel_is_counted(tmp):
    """The converter stores an all-zero kernel sparse with an empty buffer: it must still count."""
    m = make_model("none", seed=6)
    kernel, bias = m.layers[0].get_weights()
    m.layers[0].set_weights([np.zeros_like(kernel), bias])
    path = to_tflite(m, tmp / "all-zero.tflite")
    k = first_kernel(readback.tflite_weights(path))
    assert k.storage == "sparse" and k.zeros == k.size == IN * HID
    assert readback.count_weight_zeros(path) == (IN * HID, IN * HID + HID * OUT)
