"""Quantization-aware fine-tuning as the int8 candidate of last resort before float activations.

One corrupted calibration sample (x1000) blows up every post-training int8 range, so the LiteRT
full-integer and the onnxruntime static QDQ files score near chance; the QAT fine-tune takes its
ranges from the training batches instead and ships within the budget, pruned zeros kept.
"""
import dataclasses

import numpy as np
import pytest

from compressor.config.task import resolve
from compressor.core._tf import keras
from compressor.run.progress import Reporter
from compressor.train import qat
from exporters import candidates, ship

L = keras.layers


@pytest.fixture(scope="module")
def outlier_run(digits, tmp_path_factory):
    from compressor.config.recipe import parse_recipe

    keras.utils.set_random_seed(0)
    model = keras.Sequential([L.Reshape((8, 8, 1), input_shape=(64,)), L.Conv2D(16, 3, activation="relu"),
                              L.Conv2D(16, 3, activation="relu"), L.GlobalAveragePooling2D(), L.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train, digits.y_train, epochs=8, verbose=0)
    conv = model.layers[2]
    w, b = conv.get_weights()
    w[np.abs(w) < np.median(np.abs(w))] = 0  # half of a kernel pruned: these zeros must reach the files
    conv.set_weights([w, b])
    calib = digits.x_calib[:64].copy()
    calib[0] *= 1000.0
    data = dataclasses.replace(digits, x_calib=calib)
    recipe = parse_recipe({"targets": ["tflite", "tflite-int8", "onnxruntime", "onnxruntime-int8"],
                           "stages": [{"name": "weight", "epochs": 1}], "max_accuracy_drop": 0.03,
                           "bench": {"runs": 200, "warmup": 5}})
    task = dataclasses.replace(resolve(recipe, model), data=data)
    calls = []

    def fine_tune(m):
        calls.append(m)
        return qat.fine_tune(m, data, task, recipe)

    out = tmp_path_factory.mktemp("qat")
    shipped = ship.export_all(model, model, recipe, out, Reporter(quiet=True), task, qat=fine_tune)
    rows = ship.verify_all(shipped, digits.x_test[:200], Reporter(quiet=True))
    return shipped, rows, calls, int((w == 0).sum())


def test_post_training_int8_that_misses_the_budget_ships_a_qat_file_within_it(outlier_run):
    shipped, rows, calls, _ = outlier_run
    assert len(calls) == 1  # one fine-tune serves both int8 targets
    for rec in shipped.int8:
        by_scheme = {c["scheme"]: c for c in rec["candidates"]}
        post = [c for c in rec["candidates"] if c["scheme"] in ("int8-dense", "qdq-per-channel", "qdq-per-tensor")]
        assert post and all(rec["reference_metric"] - c["metric"] > rec["budget"] for c in post), rec
        assert rec["chosen"] == "qat" and rec["within_budget"], rec
        dynamic = by_scheme.get("dynamic-range") or by_scheme["dynamic"]
        assert "within the budget" in dynamic["skipped"]  # a convnet: float activations cannot win
    notes = ship.int8_verdicts([], shipped.int8)
    assert len(notes) == 2 and all("quantization-aware fine-tune" in n for n in notes), notes


def test_qat_files_keep_every_pruned_zero(outlier_run):
    _, rows, _, pruned = outlier_run
    int8 = [r for r in rows if r["file"].startswith("pruned-int8")]
    assert len(int8) == 2 and all(r["ok"] for r in int8), int8
    assert all(r["quantization"].startswith("qat") and r["pruned_zeros"] >= pruned for r in int8)
    assert all(r["zeros_in_file"] >= pruned for r in int8)


def test_schemes_that_cannot_win_are_not_built(digits):
    """No kernel with zeros: the sparse-storage candidate would write its dense twin's file."""
    from exporters import targets

    model = keras.Sequential([L.Dense(8, input_shape=(64,)), L.Dense(10)])
    target = targets.target("tflite-int8")
    sparse = next(s for s in target.schemes if s.name == "int8-sparse")
    assert candidates.dense_twin(target, sparse).name == "int8-dense"
    assert not candidates.sparse_eligible(model) and not candidates.convolutional(model)
    conv = keras.Sequential([L.Reshape((8, 8, 1), input_shape=(64,)), L.Conv2D(16, 3), L.GlobalAveragePooling2D(),
                             L.Dense(10)])
    assert candidates.convolutional(conv)
