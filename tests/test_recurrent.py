"""Recurrent models ship: an LSTM and a Bidirectional GRU classifier (digits rows as 8 steps of 8
features) go through `compressor run` to all four targets, every file verified; the Dense layers
after them prune. The search times only the runtimes of the recipe's targets."""
import json

import numpy as np
import pytest
import yaml

from compressor.cli import main
from compressor.core._tf import keras
from compressor.data.sources import load_dataset

ALL_TARGETS = ["tflite", "tflite-int8", "onnxruntime", "onnxruntime-int8"]


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    """Digits 8x8 images as sequences: 8 time steps of 8 features."""
    digits = load_dataset("digits")
    rows = {k: getattr(digits, k).reshape(-1, 8, 8).astype(np.float32)[:600] for k in ("x_train", "x_test")}
    labels = {k: getattr(digits, k)[:600] for k in ("y_train", "y_test")}
    path = tmp_path_factory.mktemp("seq") / "seq.npz"
    np.savez(path, **rows, **labels)
    return path, rows["x_train"], labels["y_train"]


def _model(kind: str, x, y, steps=8):
    keras.utils.set_random_seed(0)
    inp = keras.Input((steps, 8))
    if kind == "lstm":
        h = keras.layers.LSTM(12, name="lstm")(inp)
    else:
        h = keras.layers.Bidirectional(keras.layers.GRU(8), name="bigru")(inp)
    h = keras.layers.Dense(32, activation="relu", name="hidden")(h)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="head")(h), name=kind)
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    return model


def _recipe(tmp_path, **overrides):
    raw = {"targets": ALL_TARGETS, "max_accuracy_drop": 0.1, "round_units": 8,
           "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
           "bench": {"runs": 200, "warmup": 5, "batch": [1]}}
    raw.update(overrides)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("kind", ["lstm", "bigru"])
def test_recurrent_classifier_ships_to_every_target(tmp_path, sequences, kind, capsys):
    data, x, y = sequences
    _model(kind, x, y).save(tmp_path / f"{kind}.keras")
    code = main(["run", "--model", str(tmp_path / f"{kind}.keras"), "--data", str(data), "--quiet",
                 "--recipe", _recipe(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    checks = {v["file"]: v for v in report["verification"]}
    assert set(checks) == {"dense.tflite", "pruned.tflite", "pruned-int8.tflite", "dense.onnx", "pruned.onnx",
                           "pruned-int8.onnx"}
    assert all(v["ok"] for v in checks.values()), checks
    # the Dense layers around the recurrent layer were pruned, and the files hold those zeros
    assert checks["pruned.tflite"]["zeros_expected"] > 0
    assert checks["pruned.tflite"]["zeros_in_file"] >= checks["pruned.tflite"]["zeros_expected"]
    assert checks["pruned.onnx"]["zeros_in_file"] >= checks["pruned.onnx"]["zeros_expected"] > 0
    # LiteRT holds the recurrent layer unrolled, so the file keeps a dynamic batch (a fused sequence
    # op would pin it to the batch it was converted at: its state tensors cannot be resized)
    from exporters.runtimes import TFLiteRunner

    runner = TFLiteRunner(tmp_path / "o" / "pruned.tflite")
    assert "WHILE" not in runner.op_names()
    np.testing.assert_allclose(runner.predict(x[:64], batch=1), runner.predict(x[:64], batch=64), atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn", "bidirectional"])
def test_a_producer_before_a_recurrent_layer_prunes_exactly(kind):
    """A per-step Dense feeding a recurrent layer loses units as rows of each direction's input
    kernel: the result computes what the model computes with those units disconnected."""
    from compressor.graph.surgery import remove_units

    keras.utils.set_random_seed(0)
    layer = {"lstm": keras.layers.LSTM(12), "gru": keras.layers.GRU(12), "simple_rnn": keras.layers.SimpleRNN(12),
             "bidirectional": keras.layers.Bidirectional(keras.layers.GRU(6))}[kind]
    inp = keras.Input((8, 8))
    h = layer(keras.layers.Dense(16, activation="relu", name="pre")(inp))
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(h))
    gone = [0, 3, 7]
    disconnected = keras.models.clone_model(model)
    disconnected.set_weights(model.get_weights())
    kernel, bias = disconnected.get_layer("pre").get_weights()
    kernel[:, gone], bias[gone] = 0.0, 0.0
    disconnected.get_layer("pre").set_weights([kernel, bias])

    smaller, result = remove_units(model, {"pre": gone})
    assert result.units_after["pre"] == 13
    x = np.random.default_rng(0).random((16, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(smaller.predict(x, verbose=0), disconnected.predict(x, verbose=0), atol=1e-5)


def test_dynamic_int8_onnx_lstm_verifies(tmp_path, sequences):
    """onnxruntime's dynamic int8 writes a DynamicQuantizeLSTM whose kernels hold ONNX's gate order
    (input, output, forget, cell): verification lays them over Keras' (input, forget, cell, output)
    and finds exactly the zeros the weight stage left in the LSTM's kernels."""
    import onnx

    from exporters.onnx_export import export_for_target
    from exporters.runtimes import OnnxRunner
    from exporters.verify import verify_file

    _, x, y = sequences
    model = _model("lstm", x[:100], y[:100])
    lstm = model.get_layer("lstm")
    kernel, recurrent, bias = lstm.get_weights()
    kernel[:, ::3] = 0.0  # pruned zeros spread over all four gate blocks
    lstm.set_weights([kernel, recurrent, bias])
    path = export_for_target(model, tmp_path / "m.onnx", calibration=x[:32], mode="dynamic")
    runner = OnnxRunner(path)
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(path).graph.node}
    row = verify_file(path, runner, model, model.predict(x[:64], verbose=0), x[:64], quantized="dynamic")
    assert row["ok"], row
    assert row["zeros_in_file"] >= int(np.sum(kernel == 0))


def test_gru_bias_of_two_axes_is_not_counted_as_a_kernel(tmp_path):
    """GRU(reset_after=True) holds a (2, 3 units) bias; its zeros (all of them, untrained) are no
    pruned kernel zeros, so an ONNX file of an untrained Bidirectional GRU verifies."""
    from exporters.onnx_export import export_for_target
    from exporters.runtimes import OnnxRunner
    from exporters.verify import verify_file

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8))
    model = keras.Model(inp, keras.layers.Dense(10)(keras.layers.Bidirectional(keras.layers.GRU(8))(inp)))
    x = np.random.default_rng(0).random((16, 8, 8)).astype(np.float32)
    path = export_for_target(model, tmp_path / "m.onnx", sparse=False)
    row = verify_file(path, OnnxRunner(path), model, model.predict(x, verbose=0), x)
    assert row["ok"] and row["zeros_expected"] == 0, row


def test_unknown_sequence_length_is_named_for_tflite(tmp_path):
    from compressor.core import CompressorError
    from exporters import tflite_export

    inp = keras.Input((None, 8))
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(keras.layers.LSTM(8, name="rec")(inp)))

    with pytest.raises(CompressorError, match="'rec' reads sequences of unknown length.*fixed length"):
        tflite_export.export_float(model, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


def test_search_times_only_the_targets_runtimes(tmp_path, sequences, capsys):
    """onnxruntime targets only: no LiteRT table or whole-model LiteRT timing (a model LiteRT cannot
    convert used to stop the search); a goal-less search follows the targets' runtime whatever
    `goal.runtime` says."""
    data, x, y = sequences
    _model("lstm", x, y).save(tmp_path / "lstm.keras")
    search = {"name": "search", "epochs": 1, "recover_epochs": 0, "points": [2.0], "bisect": 0,
              "goal": {"runtime": "tflite"}}
    code = main(["run", "--model", str(tmp_path / "lstm.keras"), "--data", str(data), "--quiet",
                 "--recipe", _recipe(tmp_path, targets=["onnxruntime"], stages=[search]), "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    details = report["stages"][0]["details"]
    assert set(details["calibration"]) == {"onnxruntime"}
    assert {c["runtime"] for c in details["latency_model"]} == {"onnxruntime"}
