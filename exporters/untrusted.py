"""Checks for .onnx and .tflite files from elsewhere, run before any parser or runtime opens them.

A file handed over by a colleague or a model zoo can be damaged or hostile: an ONNX tensor whose
external data points at `../../home/user/.ssh/id_rsa`, a file of tens of gigabytes, a graph nested
hundreds of levels deep, a flatbuffer whose corrupt vector length or tensor shape asks for
terabytes. Each of these must end in one `error:` line, not in a read outside the model's folder,
a stack overflow or an exhausted machine. Limits (documented in the README):

- MAX_FILE_BYTES: the file plus its ONNX external data, 2 GiB (the largest size either format
  can address without external data); the environment variable COMPRESSOR_MAX_MODEL_BYTES
  raises or lowers it.
- MAX_TENSOR_ELEMENTS: one tensor as declared (shape, or a sparse tensor's dense size), 2**29.
- MAX_GRAPH_DEPTH: ONNX subgraphs (If/Loop/Scan bodies) nested inside each other, 16.
- MAX_LOOP_TRIPS: an ONNX Loop whose trip count is a constant above 2**20 and whose body never
  turns its condition false (it runs exactly that many times), refused before it is run. Loops
  computed at run time are stopped by `compressor bench`'s time limit (exporters.watchdog).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from compressor.core import CompressorError
from exporters import targets

MAX_FILE_BYTES = 2 << 30
MAX_TENSOR_ELEMENTS = 1 << 29
MAX_GRAPH_DEPTH = 16
MAX_LOOP_TRIPS = 1 << 20
_LIMIT_ENV = "COMPRESSOR_MAX_MODEL_BYTES"


def max_file_bytes() -> int:
    """The size limit, from the environment when set there (a plain number of bytes)."""
    raw = os.environ.get(_LIMIT_ENV, "").strip()
    if not raw:
        return MAX_FILE_BYTES
    if not raw.isdigit():
        raise CompressorError(f"{_LIMIT_ENV}={raw!r} is not a number of bytes; set it to e.g. 4294967296 or unset it")
    return int(raw)


def check_model_file(path) -> None:
    """Refuse a .tflite/.onnx file that is too big, points outside its folder or is built to exhaust us.

    Files with other extensions, and missing files, are left to the caller's own messages.
    """
    p = Path(path)
    fmt = targets.known_format(p)
    if not p.is_file() or fmt is None or fmt.untrusted is None:
        return
    limit = max_file_bytes()
    size = p.stat().st_size
    if size > limit:
        raise CompressorError(_too_big(p, size, limit))
    fmt.check_untrusted(p, size, limit)


def _too_big(p: Path, size: int, limit: int) -> str:
    return (f"{p}: {size:,} bytes exceeds the {limit:,}-byte limit for model files; if you trust this file, "
            f"raise the limit with {_LIMIT_ENV}=<bytes>")


def _check_elements(p: Path, dims, what: str) -> None:
    count = math.prod(max(int(d), 0) for d in dims) if len(dims) else 1
    if count > MAX_TENSOR_ELEMENTS:
        raise CompressorError(f"{p}: {what} declares {count:,} elements (more than {MAX_TENSOR_ELEMENTS:,}); the file "
                              "is corrupt or built to exhaust memory: re-export the model")


# --------------------------------------------------------------------------- ONNX


def check_onnx(p: Path, size: int, limit: int) -> None:
    """Parse without external data, then check every tensor's data location, declared size and nesting."""
    import onnx

    try:
        model = onnx.load(os.fspath(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable (protobuf's own depth limit included): nothing can
        return  # point outside the folder, and the caller's loader reports the damage in its own words
    folder = p.resolve().parent
    total = size
    for tensor, where in _onnx_tensors(p, model):
        _check_elements(p, tensor.dims, f"tensor '{tensor.name or where}'")
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        total += _external_size(p, folder, tensor.name or where, info)
        if total > limit:
            raise CompressorError(_too_big(p, total, limit) + " (counting its external data)")


def _onnx_tensors(p: Path, model):
    """Every TensorProto in the model (graphs, subgraphs, functions, sparse parts), without recursion."""
    graphs = [(model.graph, 0)]
    nodes = [(n, 1) for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph, depth = graphs.pop()
            if depth > MAX_GRAPH_DEPTH:
                raise CompressorError(f"{p}: ONNX subgraphs are nested more than {MAX_GRAPH_DEPTH} levels deep; the "
                                      "file is corrupt or built to exhaust the parser: re-export the model")
            _check_loops(p, graph)
            yield from ((t, graph.name) for t in graph.initializer)
            for sp in graph.sparse_initializer:
                yield sp.values, graph.name
                yield sp.indices, graph.name
                _check_elements(p, sp.dims, f"sparse tensor '{sp.values.name}'")
            nodes.extend((n, depth + 1) for n in graph.node)
            continue
        node, depth = nodes.pop()
        for attr in node.attribute:
            tensors = ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            yield from ((t, node.name or node.op_type) for t in tensors)
            graphs.extend((g, depth) for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))


def _constants(graph) -> dict:
    """Values of the graph's constant initializers and Constant nodes that are small enough to read."""
    from onnx import numpy_helper

    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if value is not None:
                tensors[node.output[0]] = value
    values = {}
    for name, t in tensors.items():
        if len(t.dims) <= 1 and sum(t.dims) <= 1 and t.data_location != 1:  # a scalar or a 1-element vector
            try:
                values[name] = numpy_helper.to_array(t).reshape(-1)
            except Exception:  # noqa: BLE001, S112 - damaged: onnxruntime reports it in its own words
                continue
    return values


def _check_loops(p: Path, graph) -> None:
    """Refuse a Loop that runs a constant number of times above MAX_LOOP_TRIPS with a condition that
    never turns false (the body passes its condition input through, or the output is a constant true)."""
    values = None
    for node in graph.node:
        if node.op_type != "Loop" or not node.input or not node.input[0]:
            continue
        values = _constants(graph) if values is None else values
        trips = values.get(node.input[0])
        if trips is None or trips.size != 1 or trips.dtype.kind not in "iu" or int(trips[0]) <= MAX_LOOP_TRIPS:
            continue
        start = values.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        body = next((a.g for a in node.attribute if a.name == "body" and a.HasField("g")), None)
        if (start is not None and not bool(start.reshape(-1)[:1].all())) or body is None or not _always_true(body):
            continue
        raise CompressorError(f"{p}: Loop '{node.name or node.output[0]}' runs {int(trips[0]):,} times (more than "
                              f"{MAX_LOOP_TRIPS:,}) and nothing stops it earlier; the file is built to hang the "
                              "runtime: re-export the model")


def _always_true(body) -> bool:
    """Whether the Loop body's condition output is its condition input passed through, or constant true."""
    if len(body.input) < 2 or not body.output:
        return False
    cond_in, cond_out = body.input[1].name, body.output[0].name
    seen = {cond_in}
    for node in body.node:
        if node.op_type == "Identity" and node.input and node.input[0] in seen:
            seen.update(node.output)
    const = _constants(body).get(cond_out)
    return cond_out in seen or (const is not None and const.size == 1 and bool(const[0]))


def _external_size(p: Path, folder: Path, name: str, info: dict) -> int:
    """An external-data file must lie inside the model's folder; returns the bytes it contributes."""
    location = info.get("location", "")
    target = (folder / location).resolve()
    if not location or os.path.isabs(location) or not target.is_relative_to(folder):
        raise CompressorError(f"{p}: tensor '{name}' keeps its data in '{location}', outside the model's folder; "
                              "refused for safety: keep external data files next to the .onnx file")
    try:
        length = int(info.get("length") or 0) or max(target.stat().st_size - int(info.get("offset") or 0), 0)
    except (OSError, ValueError):
        return 0  # missing or malformed: onnx's own loader reports it
    return length


# --------------------------------------------------------------------------- TFLite


def check_tflite(p: Path, size: int = 0, limit: int = 0) -> None:
    """Walk the flatbuffer's tables without unpacking them: every vector must fit in the file and no
    tensor may declare more than MAX_TENSOR_ELEMENTS (its shape or its sparse dense sizes)."""
    from ai_edge_litert import schema_py_generated as schema

    buf = p.read_bytes()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        return  # not a TFLite flatbuffer: the reader's own message says so
    try:
        model = schema.Model.GetRootAs(buf, 0)
        _fits(buf, model.SubgraphsLength(), 4, p)
        _fits(buf, model.BuffersLength(), 4, p)
        for i in range(model.BuffersLength()):
            b = model.Buffers(i)
            _fits(buf, b.DataLength(), 1, p)
            if b.Offset() > 1 and b.Offset() + b.Size() > len(buf):
                raise CompressorError(f"{p}: buffer {i} points past the end of the file; the file is truncated or "
                                      "corrupt: re-export the model")
        for i in range(model.SubgraphsLength()):
            sg = model.Subgraphs(i)
            _fits(buf, sg.TensorsLength(), 4, p)
            _fits(buf, sg.OperatorsLength(), 4, p)
            for j in range(sg.TensorsLength()):
                _check_tflite_tensor(p, buf, sg.Tensors(j), f"subgraph {i} tensor {j}")
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - struct.error, IndexError, ... on a damaged flatbuffer
        raise CompressorError(f"{p}: corrupt TFLite file ({type(exc).__name__}); re-export the model") from None


def _check_tflite_tensor(p: Path, buf: bytes, tensor, where: str) -> None:
    _fits(buf, tensor.ShapeLength(), 4, p)
    _check_elements(p, [tensor.Shape(k) for k in range(tensor.ShapeLength())], where)
    sparsity = tensor.Sparsity()
    if sparsity is None:
        return
    _fits(buf, sparsity.DimMetadataLength(), 4, p)
    dense = [sparsity.DimMetadata(k).DenseSize() for k in range(sparsity.DimMetadataLength())
             if sparsity.DimMetadata(k).Format() == 0]
    _check_elements(p, dense, f"{where} (sparse storage)")


def _fits(buf: bytes, length: int, item_bytes: int, p: Path) -> None:
    if length * item_bytes > len(buf):
        raise CompressorError(f"{p}: a vector claims {length:,} entries, more than the {len(buf):,}-byte file can "
                              "hold; the file is corrupt: re-export the model")
