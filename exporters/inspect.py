"""`compressor inspect FILE`: per-tensor sparsity as stored in a .tflite, .onnx or .keras file.

Users want to know two things about a pruned file: are the zeros really in it, and will the
runtime exploit them. The first comes from `exporters.readback` (decoded from the file itself).
The second only TFLite can answer from the graph: a sparse weight fed straight into
FULLY_CONNECTED runs the sparse kernel, one behind a DENSIFY op runs dense, and the XNNPACK
delegate may take (or refuse, or crash on) the op.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from compressor.core import CompressorError, quiet_stderr
from exporters import readback, targets

__all__ = ["inspect_file", "format_inspect", "tflite_rows", "onnx_rows", "keras_rows"]

TOTALS_MIN_RANK = 2  # same rule as readback.count_weight_zeros: kernels/matrices, not biases

# Keras (in, out) block shapes that some target's sparse kernel executes, tallest first.
_KERNEL_BLOCKS = tuple(sorted({t.dense_block for t in targets.TARGETS.values() if t.dense_block != (1, 1)},
                              reverse=True))


def _row(t, sparse_kernel=None, note="") -> dict:
    return {
        "name": t.name,
        "shape": list(t.shape),
        "dtype": t.dtype,
        "size": t.size,
        "zeros": t.zeros,
        "sparsity": round(t.zeros / t.size, 6) if t.size else 0.0,
        "storage": t.storage,
        "block": list(t.block) if t.block else None,
        "sparse_kernel": sparse_kernel,
        "note": note,
    }


def _op_name(model, op) -> str:
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    return fbu.opcode_to_name(model, op.opcodeIndex) or f"op{op.opcodeIndex}"


def _xnnpack_inputs(path) -> tuple[set[int] | None, str]:
    """Tensor indices (subgraph 0) fed to XNNPACK delegate nodes, or None with the reason.

    Uses the default resolver, i.e. what a user gets with `Interpreter(model_path=...)`. A model
    the delegate cannot prepare (int8 with random sparsity) must not crash inspect: report it.
    """
    from ai_edge_litert.interpreter import Interpreter

    try:
        with quiet_stderr():  # LiteRT announces its XNNPACK delegate on fd 2
            interp = Interpreter(model_path=str(path), num_threads=1)
            interp.allocate_tensors()
        ops = interp._get_ops_details()
    except Exception as exc:  # the delegate failure surfaces as RuntimeError/ValueError
        msg = " ".join(str(exc).split())[:160]
        return None, (
            f"XNNPACK delegate fails on this model ({msg}); run it with "
            "OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES"
        )
    taken: set[int] = set()
    for d in ops:
        if d.get("op_name") == "DELEGATE":
            taken.update(int(i) for i in d.get("inputs", []) if i >= 0)
    return taken, ""


def tflite_rows(path, load_keras=None) -> tuple[list[dict], list[str]]:
    model = readback.read_tflite_model(path)
    tensors = [t for t in readback.tflite_weights(path) if readback.is_weight(t)]
    consumers: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for sg_i, sg in enumerate(model.subgraphs or []):
        for op in sg.operators or []:
            name = _op_name(model, op)
            for pos, t_i in enumerate(op.inputs if op.inputs is not None else []):
                if t_i >= 0:
                    consumers.setdefault((sg_i, int(t_i)), []).append((name, pos))
    delegated, delegate_note = _xnnpack_inputs(path)
    notes = [delegate_note] if delegate_note else []

    rows = []
    for t in tensors:
        ops = consumers.get((t.subgraph, t.index), [])
        op_names = sorted({n for n, _ in ops})
        parts: list[str] = []
        kernel = None
        if len(t.shape) >= 2:
            if t.storage == "sparse":
                blk = "x".join(map(str, t.block)) + " blocks" if t.block else "no blocks"
                if "DENSIFY" in op_names:
                    kernel = False
                    parts.append("DENSIFY in front: runs dense")
                elif ops and all(n == "FULLY_CONNECTED" and p == 1 for n, p in ops):
                    kernel = True
                    parts.append(f"sparse FULLY_CONNECTED kernel ({blk}, out x in)")
                else:
                    parts.append(f"sparse storage read by {', '.join(op_names) or 'no op'}: kernel support unknown")
            else:
                kernel = False
                if t.zeros and t.zeros / t.size >= 0.3 and "FULLY_CONNECTED" in op_names:
                    parts.append("stored dense: zeros kept but not compressed (convert with EXPERIMENTAL_SPARSITY)")
                else:
                    parts.append("stored dense")
            if t.subgraph == 0 and delegated is not None:
                parts.append("XNNPACK delegate takes it" if t.index in delegated else "builtin kernel (not delegated)")
        rows.append(_row(t, kernel, "; ".join(parts)))
    return rows, notes


def onnx_rows(path, load_keras=None) -> tuple[list[dict], list[str]]:
    rows = []
    for t in readback.onnx_weights(path):
        if not readback.is_weight(t):
            continue
        note = ""
        if t.storage == "sparse_initializer":
            note = "COO sparse initializer: onnxruntime densifies on load"
        elif len(t.shape) >= 2 and t.size and t.zeros / t.size >= 0.3 and not t.quantized:
            note = "zeros stored densely (compact with exporters.onnx_sparse)"
        if t.quantized:
            note = "; ".join(filter(None, [note, "zeros counted as value == zero point"]))
        rows.append(_row(t, None, note))
    return rows, []


def _keras_block(kernel: np.ndarray) -> tuple[int, ...] | None:
    """The TFLite-kernel block shape (Keras (in, out) layout) the zeros of a 2-D kernel form, if any."""
    if kernel.ndim != 2 or not np.any(kernel == 0):
        return None
    zero = kernel == 0
    for bi, bo in _KERNEL_BLOCKS:
        if kernel.shape[0] % bi or kernel.shape[1] % bo:
            continue
        blocks = zero.reshape(kernel.shape[0] // bi, bi, kernel.shape[1] // bo, bo)
        any_zero, all_zero = blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))
        if np.array_equal(any_zero, all_zero):
            return (bi, bo)
    return None


def keras_rows(path, load_keras=None) -> tuple[list[dict], list[str]]:
    """Rows of a Keras model file. `load_keras(path) -> model` is the caller's safe loader
    (compressor's model_io checks the stored config before deserialising): this package never
    deserialises a Keras file itself, so it can never run code stored in one."""
    if load_keras is None:
        raise CompressorError(f"{path}: inspect a Keras model with `compressor inspect`, which loads it safely")
    model = load_keras(path)
    rows = []
    for w in model.weights:
        arr = np.asarray(w.numpy())
        if arr.dtype.kind != "f":
            continue
        block = _keras_block(arr) if arr.ndim == 2 and (arr == 0).mean() >= 0.3 else None
        note = f"zeros form {block[0]}x{block[1]} (in x out) blocks: TFLite sparse kernel pattern" if block else ""
        t = readback.StoredTensor(
            name=w.name,
            shape=tuple(int(s) for s in arr.shape),
            dtype=arr.dtype.name,
            size=int(arr.size),
            zeros=int(np.count_nonzero(arr == 0)),
            storage="dense",
            block=block,
            values=arr,
        )
        rows.append(_row(t, None, note))
    return rows, []


def inspect_file(path, load_keras=None) -> dict:
    """Per-tensor sizes, zeros and storage of a .tflite, .onnx or .keras file, read from the file.

    `totals` cover weight tensors of rank >= 2 (the count verification uses); every float or
    quantized weight gets a row. Keras files need `load_keras(path) -> model`, a safe loader.
    """
    p = Path(path)
    if not p.exists():
        raise CompressorError(f"{p}: file not found; check the path")
    if not p.is_file():
        raise CompressorError(f"{p}: not a file; pass {targets.extension_list()}")
    fmt = targets.format_for(p)
    rows, notes = fmt.inspect_rows(p, load_keras)
    data = p.read_bytes()
    counted = [r for r in rows if len(r["shape"]) >= TOTALS_MIN_RANK]
    size = sum(r["size"] for r in counted)
    zeros = sum(r["zeros"] for r in counted)
    return {
        "file": str(p),
        "format": fmt.name,
        "size_bytes": len(data),
        "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "tensors": rows,
        "totals": {
            "size": size,
            "zeros": zeros,
            "sparsity": round(zeros / size, 6) if size else 0.0,
            "min_rank": TOTALS_MIN_RANK,
        },
        "notes": notes,
    }


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def format_inspect(report: dict) -> str:
    """Plain aligned text table: readable in a terminal and in CI logs without colour codes."""
    header = ["tensor", "shape", "dtype", "size", "zeros", "sparsity", "storage", "block", "kernel", "note"]
    body = []
    for r in report["tensors"]:
        kernel = {True: "sparse", False: "dense", None: "-"}[r.get("sparse_kernel")]
        body.append(
            [
                _short(r["name"], 44),
                "x".join(map(str, r["shape"])) or "scalar",
                r["dtype"],
                str(r["size"]),
                str(r["zeros"]),
                f"{100 * r['sparsity']:.1f}%",
                r["storage"],
                "x".join(map(str, r["block"])) if r.get("block") else "-",
                kernel,
                r.get("note", ""),
            ]
        )
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header) - 1)]
    right = {3, 4, 5}

    def line(cells):
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out + [cells[-1]]).rstrip()

    tot = report["totals"]
    lines = [
        f"{report['file']}  ({report['format']}, {report['size_bytes']:,} bytes, gzip {report['gzip_bytes']:,} bytes)",
        line(header),
        line(["-" * w for w in widths] + ["----"]),
        *(line(b) for b in body),
        "",
        f"weights of rank >= {tot.get('min_rank', TOTALS_MIN_RANK)}: {tot['zeros']:,} zeros of {tot['size']:,}"
        f" ({100 * tot['sparsity']:.1f}% sparse)",
    ]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
