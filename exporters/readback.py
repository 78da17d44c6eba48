"""Read weights back from exported TFLite and ONNX files.

Verification must prove that the zeros made by pruning are *in the file*, so nothing here looks
at the Keras model: every tensor is decoded from the file's own bytes, including TFLite's
compressed sparse storage (traversal order, block map, CSR dimension metadata) and ONNX sparse
initializers.

TFLite files are parsed with LiteRT's flatbuffer schema (`ai_edge_litert.tools.flatbuffer_utils`,
the same schema as `tensorflow.lite.tools.flatbuffer_utils`) so that reading a file does not
need to import TensorFlow.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.core import CompressorError
from exporters import targets
from exporters.untrusted import check_model_file

__all__ = [
    "StoredTensor",
    "tflite_weights",
    "onnx_weights",
    "stored_weights",
    "count_weight_zeros",
    "is_weight",
]


@dataclass
class StoredTensor:
    """One constant tensor as the file stores it, decoded back to a dense array.

    `zeros` counts stored zeros in the quantized domain for quantized tensors (value equal to the
    zero point), because that is what dequantizes to exactly 0.0.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    size: int
    zeros: int
    storage: str  # "dense" | "sparse" (TFLite) | "sparse_initializer" (ONNX)
    block: tuple[int, ...] | None
    values: np.ndarray = field(repr=False)
    quantized: bool = False  # integer weights carrying a scale/zero point
    index: int = -1  # TFLite tensor index inside its subgraph (-1 for ONNX)
    subgraph: int = 0  # TFLite subgraph index
    zero_point: object = 0  # quantized tensors: int or array broadcastable to `values`

    def levels(self) -> np.ndarray:
        """Quantized tensors: the integer levels relative to the zero point (0 dequantizes to 0.0)."""
        return self.values.astype(np.int64) - np.asarray(self.zero_point, np.int64)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size if self.size else 0.0


def is_weight(t: StoredTensor) -> bool:
    """Floats and quantized integers are weights; plain int32/int64/bool constants are shapes/indices."""
    return t.dtype.startswith(("float", "bfloat")) or t.quantized


# --------------------------------------------------------------------------------------------
# TFLite
# --------------------------------------------------------------------------------------------

# TensorType enum value -> numpy dtype. INT4/UINT4 are nibble-packed and handled separately;
# STRING/RESOURCE/VARIANT/INT2 are never weights here and are skipped.
_TFL_NUMPY = {
    0: np.float32,
    1: np.float16,
    2: np.int32,
    3: np.uint8,
    4: np.int64,
    6: np.bool_,
    7: np.int16,
    8: np.complex64,
    9: np.int8,
    10: np.float64,
    11: np.complex128,
    12: np.uint64,
    15: np.uint32,
    16: np.uint16,
}
_TFL_INT4, _TFL_BF16, _TFL_UINT4 = 17, 18, 20
_TFL_NAMES = {
    **{k: np.dtype(v).name for k, v in _TFL_NUMPY.items()},
    _TFL_INT4: "int4",
    _TFL_BF16: "bfloat16",
    _TFL_UINT4: "uint4",
}


def _read_bytes(path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise CompressorError(f"{p}: file not found; check the path")
    if not p.is_file():
        raise CompressorError(f"{p}: not a file; pass {targets.extension_list(runnable=True)}")
    return p.read_bytes()


def read_tflite_model(path):
    """Parse a .tflite file into the flatbuffer object API (`ModelT`), or fail with CompressorError."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    check_model_file(path)  # size, vector lengths, declared tensor sizes (exporters.untrusted)
    data = _read_bytes(path)
    # Every TFLite flatbuffer carries the file identifier "TFL3" at bytes 4..8.
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise CompressorError(
            f"{path}: not a TFLite flatbuffer (no TFL3 identifier); re-export the model"
        )
    try:
        return fbu.read_model_from_bytearray(bytearray(data))
    except Exception as exc:  # the flatbuffer reader raises anything on truncated data
        raise CompressorError(
            f"{path}: corrupt TFLite file ({type(exc).__name__}: {exc}); re-export the model"
        ) from exc


def _int_vector(vec) -> np.ndarray:
    """Int32Vector/Uint16Vector/Uint8Vector (object API) -> int64 array."""
    if vec is None or vec.values is None:
        return np.zeros(0, np.int64)
    return np.asarray(vec.values, dtype=np.int64)


def _decode_buffer(raw: bytes, ttype: int) -> np.ndarray:
    """Flat array of the stored values of one buffer."""
    if ttype in _TFL_NUMPY:
        return np.frombuffer(raw, dtype=np.dtype(_TFL_NUMPY[ttype]).newbyteorder("<")).astype(
            _TFL_NUMPY[ttype], copy=False
        )
    if ttype == _TFL_BF16:
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    if ttype in (_TFL_INT4, _TFL_UINT4):
        # Two values per byte, low nibble first.
        b = np.frombuffer(raw, dtype=np.uint8)
        nib = np.stack([b & 0x0F, b >> 4], axis=1).reshape(-1).astype(np.int8)
        if ttype == _TFL_INT4:
            nib = np.where(nib > 7, nib - 16, nib).astype(np.int8)
        return nib
    raise ValueError(f"unsupported TFLite tensor type {ttype}")


def decode_tflite_sparse(values: np.ndarray, shape: tuple[int, ...], sparsity):
    """Expand TFLite sparse storage back to the dense array.

    Walks the expanded dimensions in traversal order exactly as TFLite's FormatConverter does:
    a DENSE level enumerates all `dense_size` children of each parent position, a SPARSE_CSR
    level enumerates `array_indices[array_segments[p]:array_segments[p+1]]`. The leaves, in that
    order, are the stored values. Block dimensions (traversal entries >= rank) refine the
    coordinate of the original dimension named in `block_map`.

    Returns (dense array, block size per original dimension or None).
    """
    rank = len(shape)
    trav = [int(x) for x in (sparsity.traversalOrder if sparsity.traversalOrder is not None else [])]
    bmap = [int(x) for x in (sparsity.blockMap if sparsity.blockMap is not None else [])]
    dims = list(sparsity.dimMetadata or [])
    levels = rank + len(bmap)
    if not trav:
        trav = list(range(levels))
    if len(trav) != levels or len(dims) != levels or sorted(trav) != list(range(levels)):
        raise ValueError(
            f"inconsistent sparsity parameters: rank {rank}, block_map {bmap}, "
            f"traversal {trav}, {len(dims)} dim metadata entries"
        )
    block_size = [int(dims[trav.index(rank + j)].denseSize) for j in range(len(bmap))]

    coords, pos = _traverse(dims)
    if len(pos) != values.size:
        raise ValueError(f"sparsity metadata describes {len(pos)} values, buffer holds {values.size}")

    orig = _original_coords(coords, shape, trav, bmap, block_size)
    dense = np.zeros(shape, dtype=values.dtype)
    if rank:
        dense[tuple(orig)] = values
    block = None
    if bmap:
        b = [1] * rank
        for j, d in enumerate(bmap):
            b[d] = block_size[j]
        block = tuple(b)
    return dense, block


def _traverse(dims) -> tuple[list[np.ndarray], np.ndarray]:
    """Every stored value's index at each level (in traversal order), and its position in the last level."""
    pos = np.zeros(1, dtype=np.int64)  # position of each partial path inside its level
    coords: list[np.ndarray] = []  # per level, the index taken by each partial path
    for dm in dims:
        if dm.format == 0:  # DENSE
            d = int(dm.denseSize)
            idx = np.tile(np.arange(d, dtype=np.int64), len(pos))
            coords = [np.repeat(c, d) for c in coords] + [idx]
            pos = np.repeat(pos, d) * d + idx
        else:  # SPARSE_CSR
            seg = _int_vector(dm.arraySegments)
            ind = _int_vector(dm.arrayIndices)
            if len(pos) and (pos.max() + 1 >= len(seg)):
                raise ValueError("array_segments shorter than the parent level")
            starts, ends = seg[pos], seg[pos + 1]
            counts = ends - starts
            if np.any(counts < 0) or (len(ends) and ends.max() > len(ind)):
                raise ValueError("array_segments point outside array_indices")
            parent = np.repeat(np.arange(len(pos)), counts)
            first = np.cumsum(counts) - counts
            child = np.repeat(starts, counts) + (np.arange(int(counts.sum())) - np.repeat(first, counts))
            coords = [c[parent] for c in coords] + [ind[child]]
            pos = child
    return coords, pos


def _original_coords(coords: list[np.ndarray], shape: tuple[int, ...], trav: list[int], bmap: list[int],
                     block_size: list[int]) -> list[np.ndarray]:
    """Per original dimension, every stored value's coordinate (block levels refine their dimension)."""
    rank = len(shape)
    orig: list[np.ndarray] = [None] * rank  # type: ignore[list-item]
    for level in range(rank):
        orig[trav[level]] = coords[level]
    for level in range(rank, len(trav)):
        j = trav[level] - rank
        d = bmap[j]
        orig[d] = orig[d] * block_size[j] + coords[level]
    for d in range(rank):
        if len(orig[d]) and (orig[d].min() < 0 or orig[d].max() >= shape[d]):
            raise ValueError("sparse indices fall outside the tensor shape")
    return orig


def _zero_point(quant, shape) -> tuple[np.ndarray | int, bool]:
    """Zero point broadcastable to `shape`, and whether the tensor is quantized at all."""
    if quant is None or quant.scale is None or len(quant.scale) == 0:
        return 0, False
    zp = np.asarray(quant.zeroPoint if quant.zeroPoint is not None else [0], dtype=np.int64)
    if zp.size <= 1:
        return int(zp.reshape(-1)[0]) if zp.size else 0, True
    axis = int(quant.quantizedDimension or 0)
    if axis < len(shape) and shape[axis] == zp.size:
        bshape = [1] * len(shape)
        bshape[axis] = zp.size
        return zp.reshape(bshape), True
    return int(zp[0]), True  # malformed per-axis params: best effort


def tflite_weights(path) -> list[StoredTensor]:
    """Every tensor of every subgraph that has data in the file, decoded to dense."""
    model = read_tflite_model(path)
    out: list[StoredTensor] = []
    for sg_i, sg in enumerate(model.subgraphs or []):
        for t_i, t in enumerate(sg.tensors or []):
            sparse = t.sparsity is not None and bool(t.sparsity.dimMetadata)
            has_buffer = t.buffer is not None and 0 < t.buffer < len(model.buffers)
            raw = model.buffers[t.buffer].data if has_buffer else None
            # A fully pruned tensor is stored sparse with *no* values: still a weight, all zeros.
            if not sparse and (raw is None or len(raw) == 0):
                continue
            raw = b"" if raw is None else raw
            if t.type not in _TFL_NAMES:
                continue
            name = t.name.decode("utf-8", "replace") if isinstance(t.name, bytes) else str(t.name)
            if sg_i:
                name = f"subgraph{sg_i}/{name}"
            shape = tuple(int(s) for s in (t.shape if t.shape is not None else []))
            try:
                flat = _decode_buffer(bytes(raw), t.type)
                if sparse:
                    dense, block = decode_tflite_sparse(flat, shape, t.sparsity)
                    storage = "sparse"
                else:
                    n = int(np.prod(shape)) if shape else 1
                    if flat.size < n:
                        raise ValueError(f"buffer holds {flat.size} values, shape needs {n}")
                    dense, block, storage = flat[:n].reshape(shape), None, "dense"
            except (ValueError, IndexError, TypeError) as exc:
                raise CompressorError(
                    f"{path}: tensor {name!r} cannot be decoded ({exc}); the file is corrupt, re-export it"
                ) from exc
            zp, quantized = _zero_point(t.quantization, shape)
            quantized = quantized and dense.dtype.kind in "iu"
            zeros = int(np.count_nonzero(dense == zp)) if quantized else int(np.count_nonzero(dense == 0))
            out.append(
                StoredTensor(
                    name=name,
                    shape=shape,
                    dtype=_TFL_NAMES[t.type],
                    size=int(dense.size),
                    zeros=zeros,
                    storage=storage,
                    block=block,
                    values=dense,
                    quantized=quantized,
                    index=t_i,
                    subgraph=sg_i,
                    zero_point=zp if quantized else 0,
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------

# Ops whose integer weight input has its zero point at a known input position, and the axis of
# a 1-D (per-channel) zero point relative to the weight. None = last axis (MatMul column).
_ONNX_WEIGHT_ZP = {
    "MatMulInteger": [(1, 3, None)],
    "ConvInteger": [(1, 3, 0)],
    "QLinearMatMul": [(3, 5, None)],
    "QLinearConv": [(3, 5, 0)],
    "DequantizeLinear": [(0, 2, "attr")],
}


def load_onnx(path):
    """Load an ONNX file with its external data, or fail with CompressorError."""
    import onnx

    p = Path(path)
    check_model_file(p)  # size, external data inside the folder, nesting (exporters.untrusted)
    _read_bytes(p)  # existence / is-file checks with the usual messages
    try:
        return onnx.load(os.fspath(p), load_external_data=True)
    except Exception as exc:
        raise CompressorError(
            f"{p}: corrupt or unreadable ONNX file ({type(exc).__name__}); re-export the model"
        ) from exc


def sparse_tensor_to_dense(sp) -> np.ndarray:
    """Decode an ONNX SparseTensorProto (COO, linear [NNZ] or coordinate [NNZ, rank] indices)."""
    from onnx import numpy_helper

    values = numpy_helper.to_array(sp.values).reshape(-1)
    shape = tuple(int(d) for d in sp.dims)
    dense = np.zeros(shape, dtype=values.dtype)
    if values.size == 0:
        return dense
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    if idx.ndim == 1:
        if idx.size != values.size or idx.min() < 0 or idx.max() >= dense.size:
            raise ValueError("linear indices do not match values or shape")
        dense.reshape(-1)[idx] = values
    elif idx.ndim == 2 and idx.shape == (values.size, len(shape)):
        dense[tuple(idx.T)] = values
    else:
        raise ValueError(f"indices of shape {idx.shape} do not fit {values.size} values of rank {len(shape)}")
    return dense


def _graphs(graph):
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _onnx_zero_points(graph, consts: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, object]]:
    """Map integer weight name -> (zero point array, axis) from the ops that consume it."""
    zps: dict[str, tuple[np.ndarray, object]] = {}
    for node in graph.node:
        for w_in, zp_in, axis in _ONNX_WEIGHT_ZP.get(node.op_type, []):
            if len(node.input) <= w_in or node.input[w_in] not in consts:
                continue
            zp = consts.get(node.input[zp_in]) if len(node.input) > zp_in else None
            if zp is None:
                zp = np.zeros((), np.int64)
            if axis == "attr":
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zps.setdefault(node.input[w_in], (np.asarray(zp), axis))
    zps.update(_gathered_zero_points(graph, consts, zps))
    return zps


def _gathered_zero_points(graph, consts, known) -> dict[str, tuple[np.ndarray, object]]:
    """An integer table read by Gather (onnxruntime's quantized Embedding) is dequantized after the
    lookup: its zero point is that of the DequantizeLinear reading the Gather's output (per channel
    only on the last axis, which the lookup keeps)."""
    dequant = {n.input[0]: n for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2}
    found = {}
    for node in graph.node:
        if node.op_type != "Gather" or not node.input or node.input[0] not in consts or node.input[0] in known:
            continue
        after = dequant.get(node.output[0])
        zp = consts.get(after.input[2]) if after is not None else None
        if zp is not None and (np.size(zp) <= 1 or np.shape(consts[node.input[0]])[-1] == np.size(zp)):
            found[node.input[0]] = (np.asarray(zp), None)
    return found


def _onnx_zero_point(arr: np.ndarray, zp_info):
    """The zero point broadcastable to `arr` (0 for float tensors or malformed parameters)."""
    if zp_info is None or arr.dtype.kind not in "iu":
        return 0
    zp, axis = zp_info
    zp = zp.astype(np.int64)
    if zp.size <= 1:
        return int(zp.reshape(-1)[0]) if zp.size else 0
    ax = arr.ndim - 1 if axis is None else int(axis) % max(arr.ndim, 1)
    if arr.ndim and arr.shape[ax] == zp.size:
        bshape = [1] * arr.ndim
        bshape[ax] = zp.size
        return zp.reshape(bshape)
    return 0


def _count_zeros_onnx(arr: np.ndarray, zp_info) -> int:
    if zp_info is None or arr.dtype.kind not in "iu":
        return int(np.count_nonzero(arr == 0))
    return int(np.count_nonzero(arr.astype(np.int64) == _onnx_zero_point(arr, zp_info)))


def onnx_weights(path) -> list[StoredTensor]:
    """Initializers, sparse initializers and Constant-node tensors of the graph and its subgraphs.

    Quantized int8/uint8 weights count as zero where they equal the zero point given to the op
    that consumes them (MatMulInteger, ConvInteger, QLinearMatMul/Conv, DequantizeLinear);
    without such a consumer, exact 0 is counted. onnxruntime's `quantize_dynamic` with QInt8
    weights is symmetric (zero point 0), so both agree there.
    """
    from onnx import numpy_helper

    model = load_onnx(path)
    raw: list[tuple[str, np.ndarray, str]] = []
    try:
        for g in _graphs(model.graph):
            for init in g.initializer:
                raw.append((init.name, numpy_helper.to_array(init), "dense"))
            for sp in g.sparse_initializer:
                raw.append((sp.values.name, sparse_tensor_to_dense(sp), "sparse_initializer"))
            for node in g.node:
                if node.op_type != "Constant":
                    continue
                name = node.output[0] if node.output else node.name
                for attr in node.attribute:
                    if attr.name == "value":
                        raw.append((name, numpy_helper.to_array(attr.t), "dense"))
                    elif attr.name == "sparse_value":
                        raw.append((name, sparse_tensor_to_dense(attr.sparse_tensor), "sparse_initializer"))
    except Exception as exc:
        raise CompressorError(
            f"{path}: a constant tensor cannot be decoded ({type(exc).__name__}: {exc}); "
            "the file is corrupt, re-export it"
        ) from exc

    consts = {name: arr for name, arr, _ in raw}
    zps: dict[str, tuple[np.ndarray, object]] = {}
    for g in _graphs(model.graph):
        zps.update(_onnx_zero_points(g, consts))

    out = []
    for name, arr, storage in raw:
        zp_info = zps.get(name)
        quantized = zp_info is not None or (arr.dtype in (np.int8, np.uint8) and arr.ndim >= 2)
        out.append(
            StoredTensor(
                name=name,
                shape=tuple(int(s) for s in arr.shape),
                dtype=arr.dtype.name,
                size=int(arr.size),
                zeros=_count_zeros_onnx(arr, zp_info),
                storage=storage,
                block=None,
                values=arr,
                quantized=bool(quantized),
                zero_point=_onnx_zero_point(arr, zp_info),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def stored_weights(path) -> list[StoredTensor]:
    """Weights of a runnable model file, read by its format's reader (see exporters/targets.py)."""
    return targets.format_for(path, runnable=True).read_weights(path)


def count_weight_zeros(path, min_rank: int = 2) -> tuple[int, int]:
    """(zeros, size) over weight tensors of rank >= min_rank, as stored in the file.

    Only floats and quantized integers count as weights, so int32/int64 shape and index
    constants never inflate the totals; the default min_rank=2 keeps kernels and matrices and
    leaves out biases.
    """
    zeros = size = 0
    for t in stored_weights(path):
        if len(t.shape) >= min_rank and is_weight(t):
            zeros += t.zeros
            size += t.size
    return zeros, size
