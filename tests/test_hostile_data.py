"""Hostile and unlucky data, models and training: each ends in one `error:` line naming the cause and
the fix (never `unexpected ...`), or in a correct result with a warning where the tool can go on."""
import numpy as np
import pytest
import yaml
from PIL import Image

from compressor.cli import main
from compressor.core._tf import keras

FEATURES, CLASSES, SAMPLES = 4, 3, 60


def _arrays(**overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((SAMPLES, FEATURES)).astype(np.float32),
              "y_train": rng.integers(0, CLASSES, SAMPLES), "x_test": rng.random((20, FEATURES)).astype(np.float32),
              "y_test": rng.integers(0, CLASSES, 20)}
    return {**arrays, **overrides}


def _mlp(path, hidden: int = 8, inputs: int = FEATURES):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(hidden, activation="relu", input_shape=(inputs,), name="hidden"),
                              keras.layers.Dense(CLASSES, activation="softmax", name="classifier")])
    model.save(path)
    return path


@pytest.fixture
def files(tmp_path):
    """A tiny MLP file and a one-stage, one-epoch recipe with one target (float LiteRT)."""
    recipe = {"targets": ["tflite"], "max_accuracy_drop": 1.0,
              "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
              "bench": {"runs": 200, "warmup": 1, "batch": [1]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return _mlp(tmp_path / "m.keras"), tmp_path / "r.yaml"


def _run(capsys, model, data, recipe, out) -> tuple[int, str]:
    code = main(["run", "--model", str(model), "--data", str(data), "--recipe", str(recipe), "--out", str(out),
                 "--quiet"])
    return code, capsys.readouterr().err


def _one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "unexpected" not in lines[0] and "Traceback" not in err and "{{" not in err, err
    return lines[0]


@pytest.mark.parametrize("overrides,message", [
    ({"x_train": np.array(3.0)}, "x_train is a single value (a 0-d array)"),
    ({"x_train": np.array([["a", "b", "c", "d"]] * SAMPLES)}, "x_train holds strings"),
    ({"x_train": np.ones((SAMPLES, FEATURES), complex)}, "x_train holds complex numbers"),
    ({"y_train": np.array(["cat", "dog", "emu"] * (SAMPLES // 3))}, "y_train holds strings"),
    ({"y_train": np.full(SAMPLES, 1e30)}, "y_train has label 1e+30, out of range"),
    ({"y_train": np.full(SAMPLES, 2**64 - 5, dtype=np.uint64)}, "y_train has label 1.845e+19, out of range"),
])
def test_odd_npz_arrays_are_one_line(files, tmp_path, capsys, overrides, message):
    """Used to end in `unexpected IndexError/ValueError/TypeError`, or (labels 1e30 and near 2**64,
    wrapped to negative by the int64 cast) in "has negative labels"."""
    model, recipe = files
    np.savez(tmp_path / "d.npz", **_arrays(**overrides))
    line = _one_error_line(*_run(capsys, model, tmp_path / "d.npz", recipe, tmp_path / "out"))
    assert message in line and "negative" not in line
    assert not (tmp_path / "out").exists()


def test_an_empty_calibration_split_falls_back_to_training_samples_with_a_warning(files, tmp_path, capsys):
    """An empty x_calib with an int8 target ended in `unexpected ValueError: No data is collected.`"""
    model, _ = files
    recipe = {"targets": ["onnxruntime-int8"], "max_accuracy_drop": 1.0,
              "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
              "bench": {"runs": 200, "warmup": 1, "batch": [1]}}
    (tmp_path / "int8.yaml").write_text(yaml.safe_dump(recipe))
    np.savez(tmp_path / "d.npz", **_arrays(x_calib=np.zeros((0, FEATURES), np.float32)))
    code = main(["run", "--model", str(model), "--data", str(tmp_path / "d.npz"),
                 "--recipe", str(tmp_path / "int8.yaml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning: data" in err and "x_calib is empty; calibrating int8 on the first 500 training samples" in err
    assert (tmp_path / "out" / "pruned-int8.onnx").is_file()


@pytest.mark.parametrize("content,reason", [(b"", "an empty file"),
                                            (b"\x89PNG\r\n\x1a\n" + b"junk" * 20, "Invalid PNG")])
def test_a_broken_image_in_an_image_folder_is_named(tmp_path, capsys, content, reason):
    """One line naming the file, not TensorFlow's `{{function_node __wrapped__IteratorGetNext...}}` blob."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "images" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / "images" / f"c{c}" / f"{i}.png")
    bad = tmp_path / "images" / "c1" / "7.png"
    bad.write_bytes(content)
    keras.utils.set_random_seed(0)
    keras.Sequential([keras.layers.Conv2D(2, 3, input_shape=(8, 8, 1), name="conv"), keras.layers.Flatten(),
                      keras.layers.Dense(2, activation="softmax", name="classifier")]).save(tmp_path / "cnn.keras")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"targets": ["tflite"], "max_accuracy_drop": 1.0,
                                                     "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}]}))
    line = _one_error_line(*_run(capsys, tmp_path / "cnn.keras", tmp_path / "images", tmp_path / "r.yaml",
                                 tmp_path / "out"))
    assert f"cannot decode image '{bad}'" in line and reason in line and "remove or re-encode" in line


WIDE = 16  # the model rows' feature count (a Dense input of 4 hits a tfmot block-shape limit unrelated here)


def _model_rows(kind: str, path):
    keras.utils.set_random_seed(0)
    if kind == "multi_input":
        a, b = keras.Input((WIDE,), name="left"), keras.Input((WIDE,), name="right")
        hidden = keras.layers.Dense(8, activation="relu", name="hidden")(keras.layers.Concatenate()([a, b]))
        model = keras.Model([a, b], keras.layers.Dense(CLASSES, activation="softmax", name="classifier")(hidden))
    elif kind == "no_kernel":
        model = keras.Sequential([keras.layers.Activation("softmax", input_shape=(CLASSES,), name="probabilities")])
    elif kind == "zero_units":
        model = keras.Sequential([keras.layers.Dense(0, input_shape=(WIDE,), name="empty"),
                                  keras.layers.Dense(CLASSES, activation="softmax", name="classifier")])
    else:  # nan_weights
        model = keras.Sequential([keras.layers.Dense(8, input_shape=(WIDE,), name="hidden"),
                                  keras.layers.Dense(CLASSES, activation="softmax", name="classifier")])
        kernel, bias = model.get_layer("hidden").get_weights()
        kernel[0, 0], kernel[1, 1] = np.nan, np.inf
        model.get_layer("hidden").set_weights([kernel, bias])
    model.save(path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("multi_input", "has 1 input array(s) but the model has 2 input(s) (left, right); give one per input"),
    ("no_kernel", "the model has no layer with a kernel (Dense, Conv, ...) to prune (its layers: Activation)"),
    ("zero_units", "model layer 'empty' has a weight of shape (16, 0) (0 units)"),
    ("nan_weights", "model layer 'hidden' holds 2 NaN/Inf value(s) in its weight 'kernel'"),
])
def test_models_the_pipeline_cannot_take_are_refused_in_one_line(files, tmp_path, capsys, kind, message):
    """Were `unexpected TypeError/ValueError`; NaN weights were blamed on the recipe ("raise weight.epochs")."""
    _, recipe = files
    features = CLASSES if kind == "no_kernel" else WIDE
    np.savez(tmp_path / "d.npz", **_arrays(x_train=np.random.default_rng(1).random((SAMPLES, features)),
                                           x_test=np.random.default_rng(2).random((20, features))))
    line = _one_error_line(*_run(capsys, _model_rows(kind, tmp_path / "m.keras"), tmp_path / "d.npz", recipe,
                                 tmp_path / "out"))
    assert message in line and "weight.epochs" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.keras", "r.yaml"]  # nothing left behind


def test_a_diverging_fine_tune_names_the_non_finite_loss_stage_and_epoch(files, tmp_path, capsys):
    """Finite inputs around 1e30 make the fine-tune's weights NaN; the run ended with "weight stage
    reached only {'hidden': 0.0} of the 50% target; raise weight.epochs", never naming the cause."""
    _, recipe = files
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", **_arrays(x_train=rng.random((SAMPLES, WIDE)) * 1e30,
                                           x_test=rng.random((20, WIDE)) * 1e30))
    _mlp(tmp_path / "m.keras", inputs=WIDE)
    line = _one_error_line(*_run(capsys, tmp_path / "m.keras", tmp_path / "d.npz", recipe, tmp_path / "out"))
    assert line.startswith("error: weight: fine-tune with masks: ") and "in epoch 1/1" in line
    assert "the fine-tune diverged (NaN/Inf)" in line and "scale the inputs" in line and "weight.epochs" not in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
