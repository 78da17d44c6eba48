"""Static int8 for onnxruntime: a QDQ graph that onnxruntime's CPU kernels run in int8 from the
first convolution to the classifier, calibrated once per model and calibration method.

Why each choice (measured on keras.applications MobileNetV2 alpha 1.0 and ResNet50 at 224x224):
- activations uint8 on x86: onnxruntime's x86 kernels fuse QDQ into QLinearConv (channels-last,
  the Keras layout, so no Transpose is left between convs), QLinearAdd, QLinearGlobalAveragePool
  and NhwcMaxPool only for uint8 activations; with int8 activations 15 of MobileNetV2's 52 convs,
  every residual Add and 31 Transposes stayed float. ARM kernels prefer int8 activations.
- Softmax stays float: its int8 kernel cost more than the float one on 1000 classes and rounds the
  probabilities to 1/256 steps.
- a zero Pad in front of a MaxPool on a non-negative tensor is folded into the pool (exact), since
  onnxruntime runs a QDQ Pad in float between a DequantizeLinear and a QuantizeLinear.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.core import inputs

CALIBRATION_LIMIT = 200   # samples read for calibration
CALIBRATION_ELEMENTS = 2 ** 19  # input values a calibration call runs at once: 3 samples at 224x224x3, at most 8
METHODS = ("minmax", "percentile", "entropy")


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def activation_type():
    """The activation type onnxruntime's CPU kernels run QDQ end to end in: uint8 on x86, int8 elsewhere."""
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if x86() else QuantType.QInt8


def op_types() -> list[str]:
    """Every op type onnxruntime's quantizer knows, less Softmax (kept float: faster and exact)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - {"Softmax"})


def _nonnegative(producer: onnx.NodeProto | None, constants: dict) -> bool:
    if producer is None:
        return False
    if producer.op_type == "Relu":
        return True
    low = constants.get(producer.input[1]) if producer.op_type == "Clip" and len(producer.input) > 1 else None
    return low is not None and float(low) >= 0


def fold_pad_into_maxpool(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Pad(constant 0, spatial only) -> MaxPool on a Relu/Clip(min >= 0) output becomes MaxPool with
    pads: a zero never wins a max over non-negative values, and a pool's pads are never picked."""
    graph = proto.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dropped = []
    for pad in graph.node:
        pool = readers.get(pad.output[0], [None])
        pads = constants.get(pad.input[1]) if pad.op_type == "Pad" and len(pad.input) > 1 else None
        if (pad.op_type != "Pad" or len(pool) != 1 or pool[0] is None or pool[0].op_type != "MaxPool"
                or pads is None or not _zero_constant_pad(pad, constants, pads)
                or not _nonnegative(producer.get(pad.input[0]), constants)):
            continue
        pool = pool[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or attrs.get("ceil_mode", 0):
            continue
        rank = len(pads) // 2
        old = list(attrs.get("pads", [0] * (2 * (rank - 2))))
        new = [int(a) + int(b) for a, b in zip(list(pads[2:rank]) + list(pads[rank + 2:]), old)]
        del pool.attribute[:]
        pool.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in {**attrs, "pads": new}.items())
        pool.input[0] = pad.input[0]
        dropped.append(pad)
    for pad in dropped:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for init in [i for pad in dropped for i in graph.initializer if i.name in pad.input[1:] and i.name not in used]:
        graph.initializer.remove(init)
    return proto


def _zero_constant_pad(pad: onnx.NodeProto, constants: dict, pads: np.ndarray) -> bool:
    """A constant-mode Pad with value 0 that leaves the batch and channel axes alone."""
    mode = next((onnx.helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
    value = constants.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    rank = len(pads) // 2
    return (mode in (b"constant", "constant") and value is not None and float(np.asarray(value).sum()) == 0
            and len(pad.input) < 4 and rank > 2 and not any(pads[[0, 1, rank, rank + 1]]))


def reader(calibration, dtypes: dict, limit: int = CALIBRATION_LIMIT):
    """Calibration samples in small batches, each input in the file's input type (token ids rounded, not
    truncated); a multi-input model's calibration is a dict keyed by its input names, as the file's inputs
    are. It has a length and ranges, so the quantizer merges the ranges batch by batch
    (`CalibStridedMinMax`) and never holds every intermediate tensor of every sample at once."""
    from onnxruntime.quantization import CalibrationDataReader

    feeds = calibration if inputs.is_multi(calibration) else {next(iter(dtypes)): calibration}
    samples = {name: _typed(np.asarray(feeds[name])[:limit], dtype) for name, dtype in dtypes.items()}
    count = min(len(v) for v in samples.values())
    per_sample = sum(int(np.prod(v.shape[1:])) for v in samples.values())
    size = max(1, min(8, CALIBRATION_ELEMENTS // max(1, per_sample)))
    batches = [{k: v[i : i + size] for k, v in samples.items()} for i in range(0, count, size)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.set_range(0, len(batches))

        def __len__(self):
            return len(batches)

        def set_range(self, start_index: int, end_index: int):
            self._iter = iter(batches[start_index:end_index])

        def get_next(self):
            return next(self._iter, None)

    return Reader()


def _typed(samples: np.ndarray, dtype) -> np.ndarray:
    return np.rint(samples).astype(dtype) if np.issubdtype(dtype, np.integer) else samples.astype(np.float32)


_CACHE: list[Path] = []


def calibration_cache(model_path: str | Path, calibration, method: str) -> Path:
    """Where the tensor ranges of this model, data and method are kept for the process's life: the
    schemes of one model that share a method calibrate once (onnxruntime's calibration_cache_path)."""
    if not _CACHE:
        _CACHE.append(Path(tempfile.mkdtemp(prefix="compressor-calib-")))
        atexit.register(shutil.rmtree, _CACHE[0], True)
    digest = hashlib.sha256(Path(model_path).read_bytes())
    for part in inputs.parts(calibration):
        digest.update(np.ascontiguousarray(np.asarray(part)[:CALIBRATION_LIMIT]).tobytes())
    digest.update(method.encode())
    return _CACHE[0] / f"{digest.hexdigest()[:32]}.json"


def quantize_qdq(float_path: str | Path, out: str | Path, calibration, *, input_dtypes: dict,
                 method: str = "minmax", per_channel: bool = True, reduce_range: bool = False,
                 keep_float: list[str] | None = None) -> Path:
    """QDQ int8 of a (pre-processed) float file: activations in `activation_type()`, int8 weights
    (per channel when asked), ranges by `method` (minmax, percentile at 99.999%, or entropy) on
    `calibration` (an array, or a dict by input name); `keep_float` nodes stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    folded = Path(out).with_name(Path(out).name + ".folded")
    try:
        onnx.save(fold_pad_into_maxpool(onnx.load(str(float_path))), str(folded))
        # the histogram calibrators print their progress; the tool's own progress lines say what runs
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(folded), str(out), reader(calibration, input_dtypes),
                            quant_format=QuantFormat.QDQ, activation_type=activation_type(),
                            weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=reduce_range,
                            calibrate_method=calibrate, op_types_to_quantize=op_types(), nodes_to_exclude=keep_float,
                            calibration_cache_path=str(calibration_cache(folded, calibration, method)),
                            extra_options={
                                # ranges merged batch by batch: bounded memory at 224 px, for every method
                                "CalibStridedMinMax": 1,
                                # a LayerNormalization's gamma is rank 1: its channels are axis 0, not the
                                # default axis 1 (which the quantizer logs as out of range)
                                "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": 0}})
    finally:
        folded.unlink(missing_ok=True)
    return Path(out)


def optimized_op_counts(path: str | Path) -> dict[str, int]:
    """Op type -> count in the graph onnxruntime runs (the session options of exporters/runtimes.py:
    every optimisation), which is where a QDQ pair either became an int8 kernel or stayed float."""
    import collections

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="compressor-optimized-") as scratch:
        opts.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    return dict(collections.Counter(node.op_type for node in graph.node))
