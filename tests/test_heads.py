"""The heads and inputs users bring: a 1-unit sigmoid classifier on 0/1 labels of shape (N,) or
(N, 1) with an adapted Normalization on raw tabular features (its int8 files quantize after the
Normalization and score above the majority class; verification thresholds the one unit), a
two-output model under the search's default criterion, and a two-input model end to end."""
import json

import numpy as np
import pytest
import yaml

from compressor.cli import main
from compressor.core._tf import keras
from exporters.verify import _agreement

L = keras.layers
FOUR = ["tflite", "tflite-int8", "onnxruntime", "onnxruntime-int8"]


def _run(tmp_path, capsys, model, arrays, recipe) -> dict:
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", **arrays)
    base = {"targets": FOUR, "bench": {"runs": 200, "warmup": 5, "batch": [1]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**base, **recipe}))
    code = main(["run", "--model", str(tmp_path / "m.keras"), "--data", str(tmp_path / "d.npz"),
                 "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    return json.loads((tmp_path / "out" / "report.json").read_text())


STAGES = [{"name": "weight", "sparsity": 0.5, "epochs": 1},
          {"name": "search", "epochs": 1, "recover_epochs": 0, "points": [2.0], "bisect": 0}]


def _tabular(n=500, seed=0):
    """Raw features on very different scales (up to ~4,000), a 0/1 label from the small ones."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32) * np.array([1, 10, 100, 1000, 1, 1], np.float32)
    x[:, 3] = np.abs(x[:, 3]) + 1000
    return x, (x[:, 0] + x[:, 1] / 10 - x[:, 4] > 0.3).astype(np.int64)


def _binary_model(x, y):
    keras.utils.set_random_seed(0)
    norm = L.Normalization(input_shape=(6,), name="norm")
    norm.adapt(x)
    model = keras.Sequential([norm, L.Dense(32, activation="relu", name="h1"),
                              L.Dense(32, activation="relu", name="h2"), L.Dense(1, activation="sigmoid", name="out")])
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    model.fit(x, y, epochs=15, verbose=0)
    return model


def test_binary_head_on_normalized_raw_features_runs_end_to_end(tmp_path, capsys, stand_in_runtime):
    """Labels (N, 1) for training and (N,) for testing, the default loss (auto): binary crossentropy,
    accuracy by threshold 0.5 in the stages, the search and every file; the int8 files score above
    the majority class (per-tensor int8 of the raw inputs before the Normalization scored exactly it)."""
    x, y = _tabular()
    model = _binary_model(x[:400], y[:400])
    report = _run(tmp_path, capsys, model,
                  {"x_train": x[:400], "y_train": y[:400, None], "x_test": x[400:], "y_test": y[400:]},
                  {"stages": STAGES[1:]})
    majority = max(y[400:].mean(), 1 - y[400:].mean())
    assert report["baseline"]["accuracy"] > majority + 0.1
    rows = {(r["variant"], r["runtime"]): r for r in report["results"]}
    for runtime in ("tflite", "onnxruntime"):
        assert rows[("pruned-int8", runtime)]["accuracy"] > majority + 0.1, runtime
        assert rows[("pruned", runtime)]["accuracy_ci95"]  # paired statistics apply to a binary classifier
    assert all(v["ok"] for v in report["verification"]), report["verification"]
    assert report["stages"][0]["name"] == "search" and "speed_notes" in report
    from exporters.runtimes import open_runner

    ops = open_runner(tmp_path / "out" / "pruned-int8.tflite").op_names()
    assert ops[:2] == ["SUB", "MUL"], ops  # whichever scheme won, the Normalization reads the float input


def test_full_integer_int8_quantizes_after_an_input_normalization(tmp_path):
    """Both runtimes' full-integer (static) int8 keep the Normalization float: LiteRT's file starts
    SUB, MUL, then QUANTIZE; onnxruntime's first QuantizeLinear reads the Normalization's output."""
    import onnx

    from exporters import onnx_export, tflite_export
    from exporters.runtimes import open_runner

    x, y = _tabular()
    model = _binary_model(x[:400], y[:400])
    majority = max(y[400:].mean(), 1 - y[400:].mean())
    tflite_export.export_int8(model, tmp_path / "m.tflite", x[:400])
    onnx_export.export_for_target(model, tmp_path / "m.onnx", calibration=x[:400], mode="static")
    assert open_runner(tmp_path / "m.tflite").op_names()[:3] == ["SUB", "MUL", "QUANTIZE"]
    first = onnx.load(str(tmp_path / "m.onnx")).graph.node
    assert not any("input" in n.input for n in first if n.op_type == "QuantizeLinear")
    for name in ("m.tflite", "m.onnx"):
        pred = open_runner(tmp_path / name).predict(x[400:]).reshape(-1)
        assert np.mean((pred > 0.5) == y[400:]) > majority + 0.1, name


def test_verification_of_a_one_unit_output_thresholds_it():
    """A file that always says the majority class agreed 100% with argmax over one unit."""
    keras_out = np.array([[0.9], [0.2], [0.8], [0.1]], np.float32)
    constant = np.full((4, 1), 0.6, np.float32)
    assert _agreement(constant, keras_out) == 1.0  # argmax over a single unit: blind
    assert _agreement(constant, keras_out, threshold=0.5) == 0.5
    assert _agreement(keras_out + 0.01, keras_out, threshold=0.5) == 1.0


def test_binary_labels_outside_0_1_are_one_line(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([L.Dense(4, activation="relu", input_shape=(3,)), L.Dense(1, activation="sigmoid")])
    model.save(tmp_path / "m.keras")
    x = np.zeros((8, 3), np.float32)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(8), x_test=x, y_test=np.zeros(8, np.int64))
    code = main(["run", "--model", str(tmp_path / "m.keras"), "--data", str(tmp_path / "d.npz"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "labels must be 0 or 1" in err, err


def test_two_output_model_under_the_search_default_criterion(tmp_path, capsys, stand_in_runtime):
    """The README's two-output recipe with the search's default taylor criterion: each output's loss
    (sparse crossentropy, mae on (N,) labels against a (N, 1) output) summed into one gradient."""
    rng = np.random.default_rng(1)
    x = rng.random((400, 8)).astype(np.float32)
    amount = (x @ rng.normal(size=8)).astype(np.float32)
    kind = np.clip((x[:, 0] * 3).astype(np.int64), 0, 2)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="x")
    h = L.Dense(32, activation="relu", name="hidden")(inp)
    model = keras.Model(inp, [L.Dense(3, activation="softmax", name="kind")(h), L.Dense(1, name="amount")(h)])
    model.compile(keras.optimizers.Adam(0.01), ["sparse_categorical_crossentropy", "mae"])
    model.fit(x[:300], [kind[:300], amount[:300]], epochs=15, verbose=0)
    report = _run(tmp_path, capsys, model,
                  {"x_train": x[:300], "y_train_0": kind[:300], "y_train_1": amount[:300],
                   "x_test": x[300:], "y_test_0": kind[300:], "y_test_1": amount[300:]},
                  {"loss": ["sparse_categorical_crossentropy", "mae"],
                   "metric": {"name": ["accuracy", "mae"], "output": "kind"}, "max_metric_drop": 0.05,
                   "targets": ["onnxruntime"], "stages": [STAGES[1]]})
    assert report["stages"][0]["name"] == "search" and report["frontier"]
    assert all(v["ok"] for v in report["verification"])


def _two_inputs(n=500):
    rng = np.random.default_rng(2)
    a, b = rng.random((n, 8)).astype(np.float32), rng.random((n, 5)).astype(np.float32)
    y = np.clip(((a[:, 0] + b[:, 0]) * 2).astype(np.int64), 0, 3)
    keras.utils.set_random_seed(0)
    ia, ib = keras.Input((8,), name="a"), keras.Input((5,), name="b")
    h = L.Concatenate()([L.Dense(32, activation="relu", name="da")(ia), L.Dense(32, activation="relu", name="db")(ib)])
    h = L.Dense(32, activation="relu", name="h")(h)
    model = keras.Model([ia, ib], L.Dense(4, activation="softmax", name="out")(h))
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit([a[:400], b[:400]], y[:400], epochs=15, verbose=0)
    return model, a, b, y


def test_two_input_model_runs_end_to_end(tmp_path, capsys, stand_in_runtime):
    """x_train_0, x_train_1 in the model's input order; every file takes both inputs by name, is
    verified against Keras and timed with both set."""
    model, a, b, y = _two_inputs()
    report = _run(tmp_path, capsys, model,
                  {"x_train_0": a[:400], "x_train_1": b[:400], "y_train": y[:400],
                   "x_test_0": a[400:], "x_test_1": b[400:], "y_test": y[400:]},
                  {"max_accuracy_drop": 0.05, "stages": STAGES})
    assert report["model"]["input_shape"] == [[None, 8], [None, 5]]
    assert len(report["verification"]) == 6 and all(v["ok"] for v in report["verification"])
    assert {r["variant"] for r in report["results"]} == {"dense", "pruned", "pruned-int8"}
    keras_acc = float(np.mean(model.predict([a[400:], b[400:]], verbose=0).argmax(1) == y[400:]))
    dense = [r for r in report["results"] if r["variant"] == "dense"]
    assert all(r["accuracy"] == pytest.approx(keras_acc, abs=1e-6) for r in dense)


def test_two_input_data_that_does_not_match_is_one_line(tmp_path, capsys):
    model, a, b, y = _two_inputs(n=40)
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x_train=a, y_train=y, x_test=a, y_test=y)
    code = main(["run", "--model", str(tmp_path / "m.keras"), "--data", str(tmp_path / "d.npz"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "x_train_0, x_train_1" in err, err


def test_a_function_gives_two_inputs_by_name_and_a_stream_is_refused_in_one_line():
    """Keyed by input name in any order: held in the model's order, sliced and counted together."""
    from compressor.config.task import default_task
    from compressor.core import CompressorError
    from compressor.data.sources import check_against_model, load_dataset

    ds = load_dataset("tests.data_source:two_inputs")
    check_against_model(ds, {"a": (8,), "b": (5,)}, task=default_task(4))
    x, y = ds.sample("test", 4)
    assert list(x) == ["a", "b"] and x["a"].shape == (4, 8) and x["b"].shape == (4, 5) and len(y) == 4
    assert ds.sizes() == {"train": 30, "test": 10} and ds.steps_per_epoch(8) == 4
    assert [len(xb["a"]) for xb, _ in ds.batches("train", 16)] == [16, 14]
    with pytest.raises(CompressorError, match="keyed \\['a', 'b'\\] but the model's inputs are \\['a', 'c'\\]"):
        check_against_model(load_dataset("tests.data_source:two_inputs"), {"a": (8,), "c": (5,)},
                            task=default_task(4))
    stream = load_dataset("tests.data_source:streams")
    with pytest.raises(CompressorError, match="streamed data feeds one input but the model has 2"):
        stream.bind({"a": (8,), "b": (5,)}, default_task(4))
