"""`inspect_file` agrees with the read-back, tells sparse kernels from DENSIFY, never crashes."""
from __future__ import annotations

import numpy as np
import pytest

from compressor.api import inspect as api_inspect
from compressor.core.errors import CompressorError
from exporters import readback
from exporters.inspect import format_inspect, inspect_file
from tests.test_readback import HID, IN, keras_kernel_zeros, make_model, to_onnx, to_tflite


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("inspect")


def _rows_match_readback(report, path):
    stored = {t.name: t for t in readback.stored_weights(path)}
    assert report["tensors"]
    for row in report["tensors"]:
        t = stored[row["name"]]
        assert (row["zeros"], row["size"], tuple(row["shape"]), row["storage"]) == (
            t.zeros,
            t.size,
            t.shape,
            t.storage,
        )
    assert (report["totals"]["zeros"], report["totals"]["size"]) == readback.count_weight_zeros(path)


def _kernel_row(report, shape):
    return next(r for r in report["tensors"] if tuple(r["shape"]) == shape)


def test_tflite_block_sparse_runs_sparse_kernel(tmp):
    m = make_model("block4")
    path = to_tflite(m, tmp / "block4.tflite")
    report = inspect_file(path)
    assert report["format"] == "tflite"
    assert report["size_bytes"] == path.stat().st_size and 0 < report["gzip_bytes"]
    _rows_match_readback(report, path)
    row = _kernel_row(report, (HID, IN))
    assert row["sparse_kernel"] is True and row["block"] == [1, 4]
    assert "sparse FULLY_CONNECTED" in row["note"]
    assert report["totals"]["zeros"] == keras_kernel_zeros(m)
    text = format_inspect(report)
    assert "sparse FULLY_CONNECTED" in text and "1x4" in text and "block4.tflite" in text
    assert "tensor" in text.splitlines()[1] and "zeros" in text.splitlines()[1]


def test_tflite_random_sparse_reports_densify(tmp):
    path = to_tflite(make_model("random", seed=1), tmp / "random.tflite")
    report = inspect_file(path)
    _rows_match_readback(report, path)
    row = _kernel_row(report, (HID, IN))
    assert row["sparse_kernel"] is False
    assert "DENSIFY in front: runs dense" in row["note"]


def test_tflite_int8_random_sparse_delegate_failure_is_a_note(tmp):
    """DESIGN fact 4: the default XNNPACK delegate fails on this model; inspect must not."""
    path = to_tflite(make_model("random", seed=2), tmp / "random-int8.tflite", int8=True)
    report = inspect_file(path)
    _rows_match_readback(report, path)
    assert _kernel_row(report, (HID, IN))["sparse_kernel"] is False
    text = format_inspect(report)
    if report["notes"]:  # if a future LiteRT delegates it, there is simply nothing to report
        assert "BUILTIN_WITHOUT_DEFAULT_DELEGATES" in report["notes"][0]
        assert "note: XNNPACK" in text


def test_onnx_rows_match_readback(tmp):
    from exporters.onnx_sparse import compact_onnx_file

    m = make_model("random", sparsity=0.9, seed=3)
    dense = to_onnx(m, tmp / "m.onnx")
    compact = tmp / "m-sparse.onnx"
    compact_onnx_file(dense, compact)
    for path in (dense, compact):
        report = inspect_file(path)
        assert report["format"] == "onnx"
        _rows_match_readback(report, path)
        assert report["totals"]["zeros"] == keras_kernel_zeros(m)
        assert all(r["sparse_kernel"] is None for r in report["tensors"])
    assert _kernel_row(inspect_file(compact), (IN, HID))["storage"] == "sparse_initializer"
    assert "sparse_initializer" in format_inspect(inspect_file(compact))


def test_keras_file(tmp):
    m = make_model("block4", seed=4)
    path = tmp / "pruned.keras"
    m.save(path)
    with pytest.raises(CompressorError, match="compressor inspect"):
        inspect_file(path)  # exporters never deserialise a Keras file on their own
    report = api_inspect(path)
    assert report["format"] == "keras"
    row = _kernel_row(report, (IN, HID))
    assert row["zeros"] == np.count_nonzero(m.layers[0].get_weights()[0] == 0)
    assert row["block"] == [4, 1] and row["storage"] == "dense"
    assert report["totals"]["zeros"] == keras_kernel_zeros(m)
    assert "pruned.keras" in format_inspect(report)


@pytest.mark.parametrize("name", ["x.tflite", "x.onnx", "x.keras"])
def test_missing_file(tmp, name):
    with pytest.raises(CompressorError, match="not found"):
        inspect_file(tmp / "missing" / name)


@pytest.mark.parametrize("name", ["bad.tflite", "bad.onnx", "bad.keras"])
def test_corrupt_file(tmp, name):
    path = tmp / name
    path.write_bytes(b"\x00\x01\x02 definitely not a model \xff\xfe" * 3)
    with pytest.raises(CompressorError):
        inspect_file(path)


def test_unknown_extension(tmp):
    path = tmp / "model.pt"
    path.write_bytes(b"x")
    with pytest.raises(CompressorError, match="unknown file type"):
        inspect_file(path)


def test_onnx_loop_that_runs_2_to_the_62_times_is_refused(tmp):
    """Checked before the runtime opens it; the same Loop with a computed count is left to bench's time limit."""
    from tests.test_bench_cli import loop_model

    with pytest.raises(CompressorError, match=r"Loop 'forever' runs 4,611,686,018,427,387,904 times"):
        inspect_file(loop_model(tmp / "forever.onnx"))
    assert inspect_file(loop_model(tmp / "short.onnx", trips=1000))["tensors"] is not None
    assert inspect_file(loop_model(tmp / "computed.onnx", constant=False))["tensors"] is not None
