"""int8 files: verification holds for BatchNorm-folded convs at the rounding edge and still catches a
lost or gained pruned weight; the int8 scheme is chosen by measurement and a slow int8 file is named."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.core import keras_kernels
from compressor.core._tf import keras
from exporters import onnx_export, ship, tflite_export
from exporters.readback import tflite_weights
from exporters.runtimes import open_runner_safely
from exporters.verify import align_to_kernel, int8_zero_check, pair_kernels, verify_file

L = keras.layers


def _edge_conv_bn_model(seed: int = 0) -> keras.Model:
    """Conv-BN-ReLU6 blocks (folded by both converters) whose kept weights partly sit exactly at
    half a quantization step of their channel, the edge where rounding to zero is decided."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)))
    x = L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(x))
    model = keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(x)))
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.2, 3, n), rng.normal(0, .1, n), rng.normal(0, .1, n),
                               rng.uniform(0.05, 4, n)])
        elif layer.weights:
            weights = layer.get_weights()
            k = weights[0].reshape(-1, weights[0].shape[-1])
            k[np.abs(k) < np.quantile(np.abs(k), 0.5)] = 0  # pruned
            step = np.abs(k).max(axis=0) / np.float32(127)
            edge = (rng.random(k.shape) < 0.25) & (k != 0)
            nudge = rng.choice(np.float32([1 - 1e-6, 1, 1 + 1e-6]), k.shape)
            k[edge] = (np.sign(k) * step / 2 * nudge)[edge]
            layer.set_weights([k.reshape(weights[0].shape)] + weights[1:])
    return model


@pytest.fixture(scope="module")
def edge_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge")
    model = _edge_conv_bn_model()
    calib = np.random.default_rng(1).random((40, 8, 8, 3), dtype=np.float32)
    plain = onnx_export.export_float(model, folder / "m.onnx")
    files = {"tflite": tflite_export.export_int8(model, folder / "m8.tflite", calib, sparse=False),
             "static": onnx_export.export_int8(plain, folder / "s8.onnx", calib, mode="static"),
             "dynamic": onnx_export.export_int8(plain, folder / "d8.onnx", calib, mode="dynamic")}
    return model, calib, files


def _verify(path, model, x):
    runner, _, _ = open_runner_safely(path)
    return verify_file(path, runner, model, model.predict(x, verbose=0), x, quantized="int8")


def test_bn_folded_conv_at_the_rounding_edge_verifies_in_every_scheme(edge_files):
    model, x, files = edge_files
    for scheme, path in files.items():
        row = _verify(path, model, x)
        assert row["ok"], (scheme, row)
        # the edge weights really produced rounding zeros beyond the pruned ones
        assert row["zeros_in_file"] == row["zeros_expected"] > row["pruned_zeros"], (scheme, row)


def _tamper_onnx(path, out, change):
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.int8 and arr.ndim == 4 and arr.shape[0] == 16 and arr.shape[1] == 3:  # the stem conv
            arr = arr.copy()
            change(arr)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(out))
    return out


def test_a_lost_pruned_zero_is_still_caught(edge_files, tmp_path):
    model, x, files = edge_files

    def regrow(arr):
        idx = np.flatnonzero(arr == 0)[:3]
        arr.reshape(-1)[idx] = 5  # three zeros come back (pruned ones, or rounding ones next to them)

    row = _verify(_tamper_onnx(files["static"], tmp_path / "lost.onnx", regrow), model, x)
    assert not row["ok"] and re.search(r"[1-3] pruned zero\(s\) lost", row["problem"]), row


def test_a_gained_zero_that_does_not_round_is_caught(edge_files, tmp_path):
    model, x, files = edge_files

    def prune_more(arr):
        flat = arr.reshape(-1)
        flat[np.argsort(-np.abs(flat.astype(int)))[:2]] = 0  # two of the largest weights zeroed

    row = _verify(_tamper_onnx(files["static"], tmp_path / "gained.onnx", prune_more), model, x)
    assert not row["ok"] and "2 weight(s) zeroed that do not round to zero" in row["problem"]


def test_int8_scheme_is_chosen_by_measurement_and_recorded(tmp_path, fast_recipe, digits):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([L.Reshape((8, 8, 1), input_shape=(64,)), L.Conv2D(8, 3, activation="relu"),
                              L.Flatten(), L.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train, digits.y_train, epochs=3, verbose=0)
    from compressor.run.pipeline import compress
    from compressor.run.progress import Reporter

    recipe = fast_recipe(targets=["tflite", "tflite-int8", "onnxruntime", "onnxruntime-int8"])
    report = compress(model, digits, recipe, tmp_path, reporter=Reporter(quiet=True))
    records = {r["target"]: r for r in report["int8"]}
    assert set(records) == {"tflite-int8", "onnxruntime-int8"}
    for rec in records.values():
        measured = [c for c in rec["candidates"] if c["p50_ms"] is not None]
        skipped = [c for c in rec["candidates"] if c["skipped"]]
        assert rec["chosen"] in {c["scheme"] for c in measured} and len(rec["candidates"]) == len(measured + skipped)
        assert all(c["accuracy"] is not None for c in measured) and rec["float_p50_ms"] > 0
        assert "faster_than_float" in rec
    assert {c["scheme"] for c in records["onnxruntime-int8"]["candidates"]} == {
        "qdq-per-channel", "qdq-per-tensor", "qdq-per-channel-percentile", "qat", "dynamic"}
    assert {c["scheme"] for c in records["tflite-int8"]["candidates"]} == {"int8-sparse", "int8-dense", "qat",
                                                                          "dynamic-range"}
    assert all(v["ok"] for v in report["verification"])
    assert "## int8 schemes" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob(".candidate-*"))  # losing candidates are removed


def _row(variant, runtime, p50, file):
    return {"variant": variant, "runtime": runtime, "batch": 1, "threads": 1, "file": file,
            "latency_ms": {"p50": p50}}


def test_an_int8_file_that_loses_is_named_in_one_line():
    results = [_row("pruned", "onnxruntime", 0.10, "pruned.onnx"),
               _row("pruned-int8", "onnxruntime", 0.12, "pruned-int8.onnx"),
               _row("pruned", "tflite", 0.10, "pruned.tflite"),
               _row("pruned-int8", "tflite", 0.05, "pruned-int8.tflite")]
    records = [{"runtime": "onnxruntime", "chosen": "dynamic"}, {"runtime": "tflite", "chosen": "int8-dense"}]
    lines = ship.int8_verdicts(results, records)
    assert len(lines) == 1 and lines[0].startswith("pruned-int8.onnx is not faster than pruned.onnx")
    assert records[0]["faster_than_float"] is False and records[1]["faster_than_float"] is True


_OVER = {"target": "tflite-int8", "runtime": "tflite", "file": "pruned-int8.tflite", "chosen": "int8-dense",
         "metric": "accuracy", "chosen_metric": 0.133, "reference_metric": 0.847, "budget": 0.01,
         "within_budget": False}


def test_no_int8_scheme_within_budget_is_said_in_one_line_with_the_fix():
    [line] = ship.int8_verdicts([], [dict(_OVER), dict(_OVER, runtime="onnxruntime", within_budget=True)])
    assert line.startswith("no tflite int8 scheme held the accuracy budget: the best, int8-dense, scored 0.1330")
    assert "raise max_accuracy_drop or leave tflite-int8 out of the recipe's targets" in line


def test_a_failed_int8_file_outside_the_budget_names_the_budget_as_its_cause(monkeypatch, tmp_path):
    from exporters.benchmark import Artifact

    def verify(path, *args, accuracy_held=False, **kw):  # a faithful file whose scheme lost the model's accuracy
        ok = accuracy_held
        return {"file": Path(path).name, "prediction_agreement": 0.133, "ok": ok,
                **({} if ok else {"problem": "int8 predictions agree with Keras on only 13.3% of samples"})}

    monkeypatch.setattr(ship, "verify_file", verify)
    monkeypatch.setattr(ship, "open_runner_safely", lambda path: (None, "default", None))
    model = type("M", (), {"predict": lambda self, x, **kw: x})()
    for held in (False, True):
        shipped = ship.Shipped([Artifact("pruned-int8", "tflite", tmp_path / "pruned-int8.tflite")], [model], ["int8"],
                               int8=[dict(_OVER, within_budget=held)])
        [row] = ship.verify_all(shipped, np.zeros((2, 3)), type("R", (), {"step": print, "warn": print})())
        assert row["ok"] is held
        if not held:
            assert row["problem"].startswith(
                "int8 predictions agree with Keras on only 13.3% of samples; no tflite int8 scheme")


def test_the_pick_keeps_the_fastest_within_budget():
    pool = [{"scheme": "a", "accuracy": 0.90, "p50_ms": 1.00}, {"scheme": "b", "accuracy": 0.95, "p50_ms": 0.50},
            {"scheme": "c", "accuracy": 0.80, "p50_ms": 0.10}]
    assert ship._pick(pool, 0.01, 0.95)["scheme"] == "b"          # c is faster but outside the budget
    assert ship._pick(pool, 0.2, 0.95)["scheme"] == "c"
    assert ship._pick(pool, 0.0, 0.99)["scheme"] == "b"           # none within: the most accurate
    tied = [{"scheme": "a", "accuracy": 0.9, "p50_ms": 0.101}, {"scheme": "b", "accuracy": 0.9, "p50_ms": 0.100}]
    assert ship._pick(tied, 0.1, 0.9)["scheme"] == "a"            # within noise: the registry's order


def test_report_md_and_summary_show_the_verdict(capsys):
    from compressor.cli.main import _summary
    from compressor.run.progress import Reporter

    line = "pruned-int8.onnx is not faster than pruned.onnx at batch 1"
    report = {"int8": [{"target": "onnxruntime-int8", "chosen": "dynamic", "float_file": "pruned.onnx",
                        "reference_accuracy": 0.9, "float_p50_ms": 0.1,
                        "candidates": [{"scheme": "dynamic", "accuracy": 0.9, "p50_ms": 0.12}]}],
              "int8_notes": [line], "verification": [], "results": []}
    from exporters.report import _int8_section

    assert any(line in text for text in _int8_section(report))
    _summary(report, Reporter(quiet=False))
    assert line in capsys.readouterr().out


def test_reduce_range_only_on_x86_without_vnni(monkeypatch):
    import platform

    from exporters import cpu

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for flags, expected in (({"avx2", "fma"}, True), ({"avx2", "avx512_vnni"}, False), ({"avx_vnni"}, False),
                            (set(), False)):
        monkeypatch.setattr(cpu, "cpu_flags", lambda f=flags: f)
        assert onnx_export.reduce_range_needed() is expected, flags
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"asimd"})
    assert onnx_export.reduce_range_needed() is False


def _inverted_residual_model(seed: int = 0) -> keras.Model:
    """MobileNetV2's shape in small: each block's 1x1 expand (16->32) and projection (32->16) convs
    have the same number of weights in transposed shapes, and BatchNorm scales every output channel
    differently, so only a per-channel match tells the two stored tensors apart."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inp = keras.Input((8, 8, 16))
    x = inp
    for _ in range(3):
        y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(32, 1, use_bias=False)(x)))
        y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(y)))
        x = L.Add()([x, L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(y))])
    model = keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(x)))
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.05, 3, n) * rng.choice([-1, 1], n), rng.normal(0, .1, n),
                               rng.normal(0, .1, n), rng.uniform(0.05, 4, n)])
    return model


def _int8_files(model, folder, calib):
    plain = onnx_export.export_float(model, folder / "m.onnx")
    return {"tflite": tflite_export.export_int8(model, folder / "m8.tflite", calib, sparse=False),
            "static": onnx_export.export_int8(plain, folder / "s8.onnx", calib, mode="static"),
            "dynamic": onnx_export.export_int8(plain, folder / "d8.onnx", calib, mode="dynamic")}


def test_inverted_residual_blocks_pair_and_verify_in_every_scheme(tmp_path):
    model = _inverted_residual_model()
    calib = np.random.default_rng(2).random((40, 8, 8, 16), dtype=np.float32)
    for scheme, path in _int8_files(model, tmp_path, calib).items():
        kernels = keras_kernels(model)
        pairs = pair_kernels(path, kernels)
        for kernel, stored in pairs:  # each kernel laid over its own tensor, not a same-sized neighbour
            assert stored is not None and align_to_kernel(stored.levels() if stored.quantized else stored.values,
                                                          kernel)[1] > 0.9, (scheme, stored and stored.name)
        row = _verify(path, model, calib)
        assert row["ok"], (scheme, row)


def test_a_channel_stored_as_levels_zero_and_one_is_not_misjudged():
    """A per-tensor scale leaves a column of small weights at levels {0, +-1}; no fitted scale is exact
    for it, but the stored levels are exactly what the file's scale makes of the weights."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, (64, 4)).astype(np.float32)
    kernel[rng.random(kernel.shape) < 0.5] = 0
    step = np.abs(kernel).max() / 127
    kernel[:, 3] = 0
    kernel[:20, 3] = 0.55 * step * rng.choice([-1, 1], 20)  # round up to level 1: a fitted scale comes out
    kernel[20, 3] = 0.45 * step                             # ~1.8x too large and calls this rounding zero gained
    levels = np.round(kernel / step).astype(np.int8)

    class Stored:
        quantized = True

        def levels(self):
            return levels.T.astype(np.int64)  # stored transposed, as FULLY_CONNECTED keeps it
    check = int8_zero_check(kernel, Stored())
    assert check["lost"] == check["gained"] == 0 and check["expected"] == int((levels == 0).sum()), check
    levels[np.argmax(np.abs(kernel[:, 0])), 0] = 0  # the largest weight of a normal column zeroed
    assert int8_zero_check(kernel, Stored())["gained"] == 1
    levels[np.flatnonzero(kernel[:, 1] == 0)[0], 1] = 3  # a pruned weight regrown
    assert int8_zero_check(kernel, Stored())["lost"] == 1


def test_a_pruned_weight_regrown_in_a_tflite_file_fails(edge_files, tmp_path):
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model, x, files = edge_files
    fb = fbu.read_model(str(files["tflite"]))
    stored = {t.index: t for t in tflite_weights(files["tflite"]) if t.quantized and len(t.shape) == 4}
    index, tensor = next((i, t) for i, t in stored.items() if t.shape[0] == 16 and t.shape[-1] == 3)
    data = np.frombuffer(bytes(fb.buffers[fb.subgraphs[0].tensors[index].buffer].data), np.int8).copy()
    zero = np.flatnonzero(data == 0)[:4]
    data[zero] = 9  # pruned zeros (and perhaps a rounding zero next to them) stored non-zero again
    fb.buffers[fb.subgraphs[0].tensors[index].buffer].data = data.astype(np.uint8)
    fbu.write_model(fb, str(tmp_path / "lost.tflite"))
    row = _verify(tmp_path / "lost.tflite", model, x)
    assert not row["ok"] and re.search(r"[1-4] pruned zero\(s\) lost", row["problem"]), row


def test_a_scheme_the_delegate_rejects_sparse_is_written_dense_and_still_chosen_from(tmp_path, fast_recipe, digits,
                                                                                   monkeypatch):
    """A pruned conv's dynamic-range file with sparse storage is rejected by the default XNNPACK
    delegate (found on DenseNet121, whose full-integer int8 lost the accuracy that only dynamic-range
    kept). The registry's fallback says: write it with dense int8 storage. It then runs in the default
    interpreter, keeps every pruned zero, and is timed and chosen from like the others."""
    from compressor.config.task import resolve
    from compressor.run.progress import Reporter
    from exporters import targets

    keras.utils.set_random_seed(0)
    model = keras.Sequential([L.Reshape((8, 8, 1), input_shape=(64,)), L.Conv2D(16, 3, activation="relu"),
                              L.Conv2D(16, 3), L.GlobalAveragePooling2D(), L.Dense(10)])
    for layer in model.layers[1:3]:
        w, b = layer.get_weights()
        w[np.abs(w) < np.quantile(np.abs(w), 0.8)] = 0
        layer.set_weights([w, b])
    recipe = fast_recipe(targets=["tflite", "tflite-int8"], max_accuracy_drop=1.0)
    task = resolve(recipe, model)
    task.data = digits
    target = targets.target("tflite-int8")
    # full-integer holds this budget, so on a convnet dynamic-range would not be built: build it anyway
    monkeypatch.setattr("exporters.candidates.convolutional", lambda model: False)
    tflite_export.export_float(model, tmp_path / "pruned.tflite")
    notes = []
    artifact, record, _ = ship.choose_int8(target, model, recipe, tmp_path, Reporter(quiet=True), notes, task)
    dynamic = next(c for c in record["candidates"] if c["scheme"] == "dynamic-range")
    assert dynamic["storage"] == "dense int8 storage" and dynamic["resolver"] == "default"
    assert dynamic["skipped"] is None and dynamic["p50_ms"] > 0
    assert not any("dynamic-range not used" in n for n in notes)
    path = tmp_path / "dynamic.tflite"
    target.export(model, path, scheme=next(s for s in target.schemes if s.name == "dynamic-range"), sparse=False)
    runner, resolver, _ = open_runner_safely(path)
    x = digits.x_test[:20]
    row = verify_file(path, runner, model, model.predict(x, verbose=0), x, quantized="dynamic-range")
    assert resolver == "default" and row["zeros_in_file"] == row["zeros_expected"] > 0
