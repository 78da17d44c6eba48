"""The fusion pipeline: stage order, accuracy budget back-off, block alignment, per-stage report."""
import numpy as np

from compressor._tf import keras
from compressor.pipeline import run_stages
from compressor.progress import Reporter
from compressor.recipe import parse_recipe
from compressor.stages import align
from compressor.stages.base import StageContext
from compressor.training import accuracy


def _stages(model, digits, raw):
    recipe = parse_recipe(raw)
    base = accuracy(model, digits.x_test, digits.y_test)
    return run_stages(model, recipe, digits, Reporter(quiet=True), base), base, recipe


def test_fusion_stages_run_in_order_and_stay_within_budget(small_mlp, digits):
    raw = {"targets": ["tflite-int8"], "max_accuracy_drop": 0.03, "stages": [
        {"name": "weight", "sparsity": 0.8, "epochs": 3}, {"name": "activation", "threshold": 0.2, "epochs": 1},
        {"name": "cluster", "epochs": 1}, {"name": "sparse_opt", "epochs": 2, "finetune_epochs": 1}]}
    (model, records), base, _ = _stages(small_mlp, digits, raw)
    assert [r["name"] for r in records][:4] == ["weight", "activation", "cluster", "sparse_opt"]
    for r in records:
        assert {"params_before", "params_after", "accuracy_after", "seconds", "amount", "notes"} <= set(r)
        assert r["accuracy_after"] >= base - 0.03
    hidden = model.get_layer("hidden")
    assert hidden.units < 64 and hidden.units % 8 == 0  # narrowed, and rounded to a fast width
    # the weight stage's (16, 1) zero blocks survived removal and every fine-tuning
    kernel = model.get_layer("hidden").kernel.numpy()
    zero = kernel.reshape(4, 16, kernel.shape[1]) == 0
    assert np.all(zero.all(axis=1) == zero.any(axis=1)) and zero.mean() > 0.3
    assert accuracy(model, digits.x_test, digits.y_test) >= base - 0.03


def test_a_stage_that_crosses_the_budget_is_backed_off_and_reported(small_mlp, digits):
    raw = {"targets": ["onnxruntime"], "max_accuracy_drop": 0.0, "stages": [
        {"name": "activation", "threshold": 1.0, "max_fraction": 0.95, "epochs": 0, "compensate": False}]}
    (model, records), base, _ = _stages(small_mlp, digits, raw)
    record = records[0]
    assert record["tried"][0]["amount"] == 1.0 and record["tried"][0]["drop"] > 0
    assert len(record["tried"]) >= 2 and [t["amount"] for t in record["tried"]] == [1.0, 0.75, 0.5, 0.25][:len(record["tried"])]
    assert record["amount"] < 1.0
    assert any("backed off" in n or "skipped" in n for n in record["notes"])
    assert accuracy(model, digits.x_test, digits.y_test) >= base


def test_align_makes_block_pruned_dense_inputs_a_multiple_of_the_block(digits):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(37, activation="relu", input_shape=(64,), name="a"),
                              keras.layers.Dense(32, activation="relu", name="b"),
                              keras.layers.Dense(10, activation="softmax", name="out")])
    w = model.get_layer("b").get_weights()
    w[0][:16] = 0  # block-pruned rows
    model.get_layer("b").set_weights(w)
    assert align.misaligned_dense(model, 16) == ["b"]
    recipe = parse_recipe({"targets": ["tflite-int8"]})
    outcome = align.apply(model, StageContext(recipe, digits), block_height=16, epochs=0)
    assert outcome.model.get_layer("a").units == 32 and outcome.details["removed"] == 5
    assert align.misaligned_dense(outcome.model, 16) == []
    assert model.get_layer("a").units == 37  # the input model is untouched
