"""The fusion pipeline: stage order, accuracy budget back-off, block alignment, per-stage report."""
import numpy as np

from compressor.config.recipe import parse_recipe
from compressor.core._tf import keras
from compressor.run.context import Run
from compressor.run.pipeline import run_stages
from compressor.run.progress import Reporter
from compressor.stages import align
from compressor.stages.base import StageContext
from compressor.train.training import accuracy


def _stages(model, digits, raw):
    recipe = parse_recipe(raw)
    run = Run.build(model, digits, recipe, Reporter(quiet=True))
    assert run.budget_baseline == accuracy(model, digits.x_test, digits.y_test)  # digits: no validation split
    return run_stages(run), run.budget_baseline, recipe


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
    assert len(record["tried"]) >= 2
    assert [t["amount"] for t in record["tried"]] == [1.0, 0.75, 0.5, 0.25][:len(record["tried"])]
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
    outcome = align.apply(model, align.AlignConfig(block_height=16, epochs=0), StageContext(recipe, digits))
    assert outcome.model.get_layer("a").units == 32 and outcome.details["removed"] == 5
    assert align.misaligned_dense(outcome.model, 16) == []
    assert model.get_layer("a").units == 37  # the input model is untouched


def _task(direction="higher", budget=0.01, metric="accuracy"):
    from compressor.config.task import Task

    return Task(["out"], ["sparse_categorical_crossentropy"], [metric], 0, direction, budget, [10], ["softmax"])


def _records(*values):
    return [{"name": f"stage{i}", "metric_after": v} for i, v in enumerate(values)]


def test_an_undertrained_dense_model_is_named_when_the_search_gives_the_stages_gain_back():
    """MobileNetV3Large at 3 epochs on 2,000 digits: dense 0.102, the stages' fine-tunes 0.939, and the
    search shipped 0.181 (within a 1-point budget of 0.102). The run must say why."""
    from compressor.run.report import undertrained_baseline

    [line] = undertrained_baseline(_task(), 0.102, _records(0.102, 0.915, 0.939, 0.181))
    assert "undertrained" in line and "0.1020 to 0.9390 (after stage2)" in line
    assert "down to 0.0920" in line and "shipped: 0.1810" in line
    assert undertrained_baseline(_task(), 0.95, _records(0.948, 0.955, 0.944)) == []  # a trained model: silent
    [mae] = undertrained_baseline(_task("lower", 0.05, "mae"), 0.5, _records(0.45, 0.2))  # lower is better
    assert "mae from 0.5000 to 0.2000" in mae and "up to 0.5500" in mae
    assert undertrained_baseline(_task("lower", 0.05, "mae"), 0.5, _records(0.3, 0.48)) == []  # 4 budgets


def test_a_run_on_an_untrained_model_says_so_in_the_summary_and_the_report(tmp_path, capsys):
    import json

    import yaml

    from compressor.cli import main

    keras.utils.set_random_seed(0)
    untrained = keras.Sequential([keras.layers.Input((784,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(10, activation="softmax")])
    untrained.compile("adam", "sparse_categorical_crossentropy")
    untrained.save(tmp_path / "m.keras")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "targets": ["onnxruntime"], "stages": [{"name": "activation", "epochs": 1}],
        "bench": {"runs": 200, "warmup": 5, "batch": [1]}}))
    code = main(["run", "--model", str(tmp_path / "m.keras"), "--data", "mnist5k", "--recipe",
                 str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    assert code == 0
    [line] = json.loads((tmp_path / "out" / "report.json").read_text())["baseline_notes"]
    assert "undertrained" in line
    assert f"note: {line[:40]}" in " ".join(capsys.readouterr().out.split())
    assert line in (tmp_path / "out" / "report.md").read_text()
