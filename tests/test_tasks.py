"""Any task's metric: a regression model under an MAE budget and a two-output model run end to end,
every exported file scored with the same metric in LiteRT and onnxruntime; multi-label AUC and a
user's own metric function score like Keras; recipe mistakes are one line."""
import json

import numpy as np
import pytest
import yaml

from compressor.cli import main
from compressor.config.recipe import parse_recipe
from compressor.config.task import resolve
from compressor.core._tf import keras
from compressor.core.errors import CompressorError
from compressor.data.sources import load_dataset

L = keras.layers


def _regression_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8)).astype(np.float32)
    amount = (x @ rng.normal(size=8) + 0.05 * rng.normal(size=n)).astype(np.float32)
    kind = np.clip((x[:, 0] * 3).astype(np.int64), 0, 2)
    return x, amount, kind


def _run(tmp_path, capsys, model, arrays, recipe) -> dict:
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", **arrays)
    base = {"targets": ["tflite", "onnxruntime"], "bench": {"runs": 200, "warmup": 5, "batch": [1]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**base, **recipe}))
    code = main(["run", "--model", str(tmp_path / "m.keras"), "--data", str(tmp_path / "d.npz"),
                 "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    return json.loads((tmp_path / "out" / "report.json").read_text())


def test_regression_under_an_mae_budget(tmp_path, capsys):
    x, y, _ = _regression_data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([L.Dense(32, activation="relu", input_shape=(8,), name="hidden"),
                              L.Dense(1, name="value")])
    model.compile(keras.optimizers.Adam(0.01), "mae")
    model.fit(x[:300], y[:300], epochs=20, verbose=0)
    keras_mae = float(np.mean(np.abs(model.predict(x[300:], verbose=0)[:, 0] - y[300:])))
    report = _run(tmp_path, capsys, model,
                  {"x_train": x[:300], "y_train": y[:300], "x_test": x[300:], "y_test": y[300:]},
                  {"metric": "mae", "max_metric_drop": 0.05,
                   "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 2}]})
    assert report["metric"] == {"name": "mae", "direction": "lower", "budget": 0.05, "output": "value",
                                "per_output": {"value": "mae"}}
    assert report["baseline"]["accuracy"] is None
    assert report["baseline"]["metric"]["value"] == pytest.approx(keras_mae, rel=1e-4)
    stage = report["stages"][0]
    assert stage["accuracy_after"] is None and stage["metric_after"] - keras_mae <= 0.05 + 1e-9
    rows = {(r["variant"], r["runtime"]): r for r in report["results"]}
    assert set(rows) == {(v, rt) for v in ("dense", "pruned") for rt in ("tflite", "onnxruntime")}
    for (variant, runtime), row in rows.items():
        assert row["accuracy"] is None and row["metric"]["name"] == "mae" and row["metric"]["samples"] == 100
        reference = keras_mae if variant == "dense" else stage["metric_after"]
        assert row["metric"]["value"] == pytest.approx(reference, abs=1e-4), (variant, runtime)
    for c in report["comparisons"]:  # no McNemar for a regression: the drop in MAE against the budget
        assert c["paired_test"] is None and c["accuracy_drop"] is None and c["within_budget"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "budget: 0.05 mae (lower is better)" in md and "| mae drop |" in md


def test_two_output_model_is_scored_per_output_in_both_runtimes(tmp_path, capsys):
    """The outputs' names sort the other way round ('amount' < 'kind'): LiteRT lists them by name, so
    a file read in its own order would swap them."""
    x, amount, kind = _regression_data(seed=1)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="x")
    h = L.Dense(32, activation="relu", name="hidden")(inp)
    model = keras.Model(inp, [L.Dense(3, activation="softmax", name="kind")(h), L.Dense(1, name="amount")(h)])
    model.compile(keras.optimizers.Adam(0.01), ["sparse_categorical_crossentropy", "mae"])
    model.fit(x[:300], [kind[:300], amount[:300]], epochs=20, verbose=0)
    probs, values = model.predict(x[300:], verbose=0)
    expected = {"kind": float(np.mean(probs.argmax(1) == kind[300:])),
                "amount": float(np.mean(np.abs(values[:, 0] - amount[300:])))}
    arrays = {"x_train": x[:300], "y_train_0": kind[:300], "y_train_1": amount[:300],
              "x_test": x[300:], "y_test_0": kind[300:], "y_test_1": amount[300:]}
    report = _run(tmp_path, capsys, model, arrays, {
        "loss": ["sparse_categorical_crossentropy", "mae"], "metric": {"name": ["accuracy", "mae"], "output": "kind"},
        "max_metric_drop": 0.1, "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 2},
                                           {"name": "activation", "epochs": 1}]})
    assert report["metric"]["per_output"] == {"kind": "accuracy", "amount": "mae"}
    assert report["baseline"]["accuracy"] == pytest.approx(expected["kind"])
    for row in report["results"]:
        per = {p["output"]: (p["metric"], p["value"]) for p in row["metric"]["per_output"]}
        assert set(per) == {"kind", "amount"} and per["kind"][0] == "accuracy" and per["amount"][0] == "mae"
        if row["variant"] == "dense":
            assert per["kind"][1] == pytest.approx(expected["kind"], abs=1e-6), row["runtime"]
            assert per["amount"][1] == pytest.approx(expected["amount"], abs=1e-4), row["runtime"]
    pruned = [r for r in report["results"] if r["variant"] == "pruned"]
    assert {r["runtime"] for r in pruned} == {"tflite", "onnxruntime"}
    a, b = ({p["output"]: p["value"] for p in r["metric"]["per_output"]} for r in pruned)
    assert a == pytest.approx(b, abs=1e-4)  # the same pruned model in both runtimes
    assert all(v["ok"] for v in report["verification"])
    assert all(c["paired_test"] is None for c in report["comparisons"])  # McNemar: single-output only
    assert "kind accuracy" in (tmp_path / "out" / "report.md").read_text()


def test_multi_label_auc_and_a_users_metric_function_score_like_keras(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((64, 6)).astype(np.float32)
    y = (x[:, :4] > 0.5).astype(np.float32)  # 4 independent labels per sample
    model = keras.Sequential([L.Dense(4, activation="sigmoid", input_shape=(6,), name="tags")])
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    recipe = parse_recipe({"metric": "auc", "max_metric_drop": 0.02})
    data = load_dataset(tmp_path / "d.npz", recipe.data, class_labels=False)
    task = resolve(recipe, model)
    assert (task.losses, task.direction) == (["binary_crossentropy"], "higher")
    data.bind((6,), task)
    task.data = data
    reference = keras.metrics.AUC()
    reference.update_state(y, model.predict(x, verbose=0))
    assert task.keras(model, "test").value == pytest.approx(float(reference.result()), abs=1e-6)
    assert task.keras(model, "test").correct is None  # no paired test for multi-label

    custom = parse_recipe({"loss": "binary_crossentropy", "metric": {"name": "tests.test_tasks:worst_error",
                                                                      "direction": "lower"}, "max_metric_drop": 0.1})
    task = resolve(custom, model)
    task.data = data
    pred = model.predict(x, verbose=0)
    assert task.keras(model, "test").value == pytest.approx(float(np.mean(np.max(np.abs(pred - y), axis=1))), abs=1e-5)


def worst_error(y_true, y_pred):
    """A user's metric: per-sample largest absolute error (averaged over samples by the tool)."""
    from compressor.core._tf import tf

    return tf.reduce_max(tf.abs(y_pred - y_true), axis=-1)


@pytest.mark.parametrize("raw,message", [
    ({"metric": "mae"}, "needs a budget in its own units: set max_metric_drop"),
    ({"metric": "tests.test_tasks:worst_error", "max_metric_drop": 0.1}, "say whether higher or lower is better"),
    ({"metric": "nope", "max_metric_drop": 0.1}, "not a Keras metric"),
    ({"metric": {"name": "mae", "output": "missing"}, "max_metric_drop": 0.1}, "is not an output of the model"),
    ({"loss": ["mae", "mse"], "metric": "mae", "max_metric_drop": 0.1}, "lists 2 entries but the model has 1 outputs"),
])
def test_recipe_task_mistakes_are_one_line(raw, message):
    model = keras.Sequential([L.Dense(1, input_shape=(3,), name="value")])
    with pytest.raises(CompressorError, match=message):
        resolve(parse_recipe(raw), model)


def test_regression_labels_are_checked_against_the_output(tmp_path):
    model = keras.Sequential([L.Dense(2, input_shape=(3,), name="value")])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.random((10, 3)), y_train=rng.random((10, 3)),
             x_test=rng.random((5, 3)), y_test=rng.random((5, 3)))
    recipe = parse_recipe({"metric": "mae", "max_metric_drop": 0.1})
    data = load_dataset(tmp_path / "d.npz", recipe.data, class_labels=False)
    with pytest.raises(CompressorError, match="y_train has 3 value\\(s\\) per sample but output 'value' has 2"):
        data.bind((3,), resolve(recipe, model))


@pytest.mark.parametrize("raw,budget", [({"max_accuracy_drop": 0.03}, 0.03),
                                        ({"max_accuracy_drop": 0.03, "max_metric_drop": 0.02}, 0.02),
                                        ({"metric": "mae", "max_metric_drop": 0.5, "max_accuracy_drop": 0.03}, 0.5)])
def test_the_old_accuracy_budget_still_counts_and_max_metric_drop_wins(raw, budget):
    model = keras.Sequential([L.Dense(3, activation="softmax", input_shape=(4,), name="classes")])
    task = resolve(parse_recipe(raw), model)
    assert task.budget == budget and task.direction == ("lower" if "metric" in raw else "higher")
    assert task.is_accuracy == ("metric" not in raw)
