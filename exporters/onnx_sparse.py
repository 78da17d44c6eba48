"""Store pruned ONNX initializers as sparse tensors so the zeros shrink the file.

ONNX exporters write every initializer densely, so a 90%-sparse model is as large as the dense
one. `graph.sparse_initializer` (COO: the non-zero values plus their int64 linear indices) keeps
the exact same tensor; onnxruntime densifies it on load, so outputs are identical.

A float32 element costs 4 bytes dense and 4 + 8 bytes in COO (indices must be int64 by the ONNX
spec), so COO only pays below about one third non-zeros. A tensor is therefore moved only when it
has at least `min_sparsity` zeros *and* its sparse form is smaller than its dense form.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.core import CompressorError
from exporters.files import write_bytes_atomic

__all__ = ["to_sparse_initializers", "to_dense_initializers", "compact_onnx_file"]

_INDEX_BYTES = 8  # int64 linear index per stored value


def _float_types():
    from onnx import TensorProto

    # bfloat16 has no numpy dtype here; such tensors stay dense.
    return {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}


def _graph_inputs(graph) -> set[str]:
    return {i.name for i in graph.input}


def _sparse_proto(name: str, arr: np.ndarray):
    """COO SparseTensorProto with linear int64 indices and the initializer's own element type."""
    from onnx import helper, numpy_helper

    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(np.ascontiguousarray(flat[idx]), name=name)
    indices = numpy_helper.from_array(idx, name=f"{name}__indices")
    return helper.make_sparse_tensor(values, indices, list(arr.shape))


def to_sparse_initializers(model, min_sparsity: float = 0.3, min_size: int = 256):
    """Return a copy of `model` with sparse-enough float initializers moved to sparse_initializer.

    Skipped: non-float tensors, tensors with fewer than `min_size` elements or fewer than
    `min_sparsity` zeros, tensors whose COO form would be larger, and initializers that are also
    graph inputs (they may be overridden at run time, which sparse initializers cannot be).
    Subgraphs of If/Loop/Scan are left alone.
    """
    import onnx
    from onnx import numpy_helper

    if not 0.0 <= min_sparsity <= 1.0:
        raise CompressorError(f"min_sparsity={min_sparsity} is outside 0..1; pass a fraction such as 0.5")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inputs = _graph_inputs(g)
    floats = _float_types()
    keep, moved = [], []
    for init in g.initializer:
        if init.data_type not in floats or init.name in inputs:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init)
        size, nz = int(arr.size), int(np.count_nonzero(arr))
        if (
            size == 0
            or size < min_size
            or (size - nz) / size < min_sparsity
            or nz * (arr.dtype.itemsize + _INDEX_BYTES) >= size * arr.dtype.itemsize
        ):
            keep.append(init)
            continue
        moved.append(_sparse_proto(init.name, arr))
    if moved:
        kept = []
        for init in keep:  # copy out before clearing: the originals live in the repeated field
            c = onnx.TensorProto()
            c.CopyFrom(init)
            kept.append(c)
        del g.initializer[:]
        g.initializer.extend(kept)
        g.sparse_initializer.extend(moved)
    return out


def to_dense_initializers(model):
    """Return a copy of `model` with every sparse initializer written back as a dense one.

    onnxruntime.quantization does not understand sparse initializers ("Invalid model with unknown
    initializers"), so quantize the dense form, then compact again if wanted.
    """
    import onnx
    from onnx import numpy_helper

    from exporters.readback import sparse_tensor_to_dense

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    dense = [numpy_helper.from_array(sparse_tensor_to_dense(sp), name=sp.values.name) for sp in g.sparse_initializer]
    del g.sparse_initializer[:]
    g.initializer.extend(dense)
    return out


def _atomic_save(model, dst: Path) -> None:
    """Write next to the destination, then rename: a crash never leaves a half-written model."""
    write_bytes_atomic(dst, model.SerializeToString())


def compact_onnx_file(src, dst=None, min_sparsity: float = 0.3, min_size: int = 256, check: bool = True) -> dict:
    """Rewrite `src` with sparse initializers into `dst` (default: in place).

    Returns {"tensors_moved", "bytes_before", "bytes_after"}. With `check`, the result must pass
    `onnx.checker.check_model` before it replaces anything. Models over 2 GB (external data)
    are not supported: protobuf cannot serialise them in one piece.
    """
    import onnx

    from exporters.readback import load_onnx

    src = Path(src)
    dst = Path(dst) if dst is not None else src
    model = load_onnx(src)
    before = src.stat().st_size
    compact = to_sparse_initializers(model, min_sparsity=min_sparsity, min_size=min_size)
    if check:
        try:
            onnx.checker.check_model(compact)
        except Exception as exc:
            raise CompressorError(
                f"{src}: sparse ONNX model fails onnx.checker ({exc}); keep the dense file"
            ) from exc
    _atomic_save(compact, dst)
    return {
        "tensors_moved": len(compact.graph.sparse_initializer) - len(model.graph.sparse_initializer),
        "bytes_before": before,
        "bytes_after": dst.stat().st_size,
    }
