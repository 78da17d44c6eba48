"""ONNX writer through tf2onnx, and onnxruntime's int8 quantization."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx

from compressor.core import CompressorError, inputs, keras, tf
from exporters.files import make_readable, write_bytes_atomic
from exporters.float_inputs import leading_normalizations, onnx_nodes
from exporters.onnx_fusions import layer_norms, reshape_chains, unused_initializers
from exporters.onnx_quant import fold_pad_into_maxpool, quantize_qdq

OPSET = 17


_CONVERTED: dict[str, bytes] = {}  # model fingerprint -> serialized proto of its last conversion


def fingerprint(model: keras.Model) -> str:
    """The model's architecture and weights as one digest: the same function converts to the same file."""
    try:
        architecture = model.to_json()
    except (NotImplementedError, TypeError, ValueError):  # an export form's layer without a config: this object
        architecture = f"{id(model)}:" + ",".join(f"{type(layer).__name__}/{layer.name}" for layer in model.layers)
    digest = hashlib.blake2b(architecture.encode(), digest_size=16)
    for weight in model.weights:
        digest.update(weight.name.encode())
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def keras_to_onnx(model: keras.Model) -> onnx.ModelProto:
    """The tf2onnx conversion, once per model: the pruned model's float file and each int8 scheme
    start from the same graph (tf2onnx took ~45 s of MobileNetV2's export at 224 px each time)."""
    key = fingerprint(model)
    if key not in _CONVERTED:
        _CONVERTED.clear()  # the dense and the pruned model alternate; keep only the latest
        _CONVERTED[key] = _convert(model).SerializeToString()
    proto = onnx.ModelProto()
    proto.ParseFromString(_CONVERTED[key])
    return proto


def _convert(model: keras.Model) -> onnx.ModelProto:
    import tf2onnx

    if len(model.inputs) == 1:
        signature = (tf.TensorSpec((None,) + tuple(model.input_shape[1:]), _input_dtype(model), name="input"),)
    else:  # several inputs: each named as its Keras input, so runners feed them by name
        signature = ([tf.TensorSpec((None,) + tuple(t.shape[1:]), _input_dtype(model, i), name=n)
                      for i, (n, t) in enumerate(zip(inputs.names(model), model.inputs))],)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CompressorError(f"ONNX conversion of model '{model.name}' failed: {first}") from exc
    proto = fold_pad_into_maxpool(layer_norms(_drop_identity_reshapes(reshape_chains(_erfc_as_erf(proto)))))
    return _stable_dim_names(unused_initializers(proto))


def _input_dtype(model: keras.Model, index: int = 0):
    """The model's own input type when it is integer (token ids stay ids in the file), else float32."""
    dtype = tf.as_dtype(model.inputs[index].dtype)
    return dtype if dtype.is_integer else tf.float32


def _erfc_as_erf(proto: onnx.ModelProto) -> onnx.ModelProto:
    """TensorFlow writes exact GELU as 0.5 * x * erfc(-x / sqrt(2)), and tf2onnx 1.17 passes the Erfc
    through, but ONNX has no Erfc operator: onnxruntime refuses the whole file (measured on a
    transformer encoder). Rewrite erfc(z) as 1 - erf(z), which ONNX has."""
    if not any(node.op_type == "Erfc" for node in proto.graph.node):
        return proto
    one = "compressor_erfc_one"
    nodes = []
    for node in proto.graph.node:
        if node.op_type != "Erfc":
            nodes.append(node)
            continue
        erf = f"{node.output[0]}_erf"
        nodes.append(onnx.helper.make_node("Erf", [node.input[0]], [erf], name=f"{node.name}_erf"))
        nodes.append(onnx.helper.make_node("Sub", [one, erf], [node.output[0]], name=f"{node.name}_one_minus"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, np.float32), one))
    return proto


def _drop_identity_reshapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """tf2onnx leaves Reshapes to the shape a tensor already has (measured: 21 on MobileNetV2 at
    32x32, around depthwise convs on 1x1 maps). Each one is an op onnxruntime executes and it stops
    the Conv+BatchNormalization fusion; rewire their readers to the input and drop them."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    targets = {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}
    graph_outputs = {v.name for v in proto.graph.output}
    rename = {}
    for node in proto.graph.node:
        shape, target = shapes.get(node.input[0]), targets.get(node.input[1]) if len(node.input) > 1 else None
        if (node.op_type != "Reshape" or shape is None or target is None or node.output[0] in graph_outputs
                or len(shape) != len(target) or None in shape[1:] or target[0] != -1):
            continue
        if list(target[1:]) == shape[1:]:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
    if not rename:
        return proto
    kept = [node for node in proto.graph.node if not (node.op_type == "Reshape" and node.output[0] in rename)]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return proto


def _stable_dim_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """tf2onnx names unknown dims from a process-wide counter ("unk__21"); the same model must give
    the same bytes, so rename them by first appearance: the batch dim becomes "batch"."""
    names: dict[str, str] = {}
    values = list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info)
    for value in values:
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and dim.dim_param.startswith("unk__"):
                if dim.dim_param not in names:
                    names[dim.dim_param] = "batch" if index == 0 else f"dim_{len(names)}"
                dim.dim_param = names[dim.dim_param]
    return proto


def export_float(model: keras.Model, path: str | Path, compact: bool = False) -> Path:
    """Write the model; `compact` moves pruned initializers into sparse_initializer (smaller file)."""
    proto = keras_to_onnx(model)
    if compact:
        from exporters.onnx_sparse import to_sparse_initializers

        proto = to_sparse_initializers(proto)
    return write_bytes_atomic(path, proto.SerializeToString())


SMALL_MATMUL = 4096  # weights below this many elements stay float in dynamic int8


def small_matmuls(float_path: str | Path) -> list[str]:
    """MatMul nodes whose constant weight is tiny (a classifier head): quantizing their input at run
    time costs more than the int8 product saves (measured on the demo MLP: int8 everywhere 9.9 us vs
    9.5 us with the 64x10 head left float, float 9.7 us)."""
    model = onnx.load(str(float_path))
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type in ("MatMul", "Gemm")
            and any(sizes.get(i, SMALL_MATMUL) < SMALL_MATMUL for i in node.input[1:2])]


def reduce_range_needed() -> bool:
    """7-bit weights avoid int16 saturation in the u8/s8 VPMADDUBSW path of x86 CPUs without VNNI
    (onnxruntime's quantization guide); VNNI/AMX CPUs and non-x86 CPUs use the full 8 bits."""
    from exporters.cpu import cpu_flags

    flags = cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    return bool(x86 and flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _file_input_dtypes(path) -> dict:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)) for i in graph.input}


def _no_preprocessing_hint(record: logging.LogRecord) -> bool:
    """Drop only onnxruntime.quantization's generic "consider pre-processing" advice (the static path
    has already run it); every other log record, ours or the user's, passes."""
    return "pre-processing" not in record.getMessage()


def export_int8(float_path: str | Path, path: str | Path, calibration: np.ndarray | None = None,
                mode: str = "dynamic", calibrate: str = "minmax", per_channel: bool = True,
                float_layers: list[str] | None = None) -> Path:
    """int8 via onnxruntime.quantization: `dynamic` (per-tensor int8 weights, activations scaled at run
    time, tiny MatMuls left float) or `static` (QDQ int8 end to end, exporters/onnx_quant.py: weights
    per channel when `per_channel`, activation ranges by `calibrate` on `calibration`; `float_layers`'
    nodes stay float: exporters/float_inputs.py)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if mode == "static" and calibration is None:
        raise CompressorError("static int8 quantization needs calibration samples; pass data with x_calib or x_train")
    path = Path(path)
    skip = small_matmuls(float_path)
    keep_float = onnx_nodes(onnx.load(str(float_path), load_external_data=False), float_layers or [])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    root = logging.getLogger()
    root.addFilter(_no_preprocessing_hint)  # onnxruntime.quantization logs it on the root logger
    try:
        if mode == "dynamic":
            quantize_dynamic(str(float_path), tmp, weight_type=QuantType.QInt8, nodes_to_exclude=skip)
        else:
            quantize_qdq(float_path, tmp, calibration, input_dtypes=_file_input_dtypes(float_path), method=calibrate,
                         per_channel=per_channel, reduce_range=reduce_range_needed(), keep_float=keep_float)
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        root.removeFilter(_no_preprocessing_hint)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _preprocessed(plain: Path) -> Path:
    """onnxruntime's recommended pre-quantization pass (shape inference, constant folding, Conv+BN and
    Gemm fusion), so fewer float ops stay between the int8 ones (measured on MobileNetV2 at 32x32:
    static int8 p50 0.70 -> 0.61 ms). A model the pass cannot handle is quantized as exported.
    Runs in a scratch folder: onnxruntime's symbolic shape inference drops a debugging copy of the
    model into the working directory when it gives up, which must not land in the user's folder."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = plain.with_name(plain.name + ".pre").resolve()
    try:
        with tempfile.TemporaryDirectory(prefix="compressor-prequant-") as scratch, contextlib.chdir(scratch):
            quant_pre_process(str(plain.resolve()), str(out))
    except Exception:  # the pass is an optimisation: any failure of it leaves the exported graph
        out.unlink(missing_ok=True)
        return plain
    return out


def export_for_target(model: keras.Model, path: str | Path, *, calibration: np.ndarray | None = None,
                      sparse: bool = True, mode: str | None = None, **int8_options) -> Path:
    """The registry's exporter (exporters/targets.py): float (compact storage when `sparse`), or int8
    quantized from an uncompacted float export (the quantizer cannot read sparse initializers)."""
    if mode is None:
        return export_float(model, path, compact=sparse)
    path = Path(path)
    plain = path.with_name(f".{path.name}.float-for-int8")
    try:
        export_float(model, plain, compact=False)
        # dynamic mode keeps the exported MatMuls: on fused Gemms it ignores the small-head exclusion
        return export_int8(_preprocessed(plain) if mode == "static" else plain, path, calibration, mode=mode,
                           float_layers=leading_normalizations(model), **int8_options)
    finally:
        plain.unlink(missing_ok=True)
        plain.with_name(plain.name + ".pre").unlink(missing_ok=True)
