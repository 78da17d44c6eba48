"""`compressor run` end to end on the architectures people ship (keras.applications, weights=None,
32x32x3 digits, one-epoch fine-tunes): every file exports, verifies and is benchmarked, exit 0,
and the network really got narrower."""
import json

import numpy as np
import pytest
import yaml

from compressor.cli import main
from compressor.core._tf import keras
from compressor.data.sources import load_dataset
from exporters import targets
from tests.test_architectures import FAMILIES

RECIPE = {
    "targets": ["tflite", "tflite-int8", "onnxruntime", "onnxruntime-int8"],
    "max_accuracy_drop": 1.0,  # barely trained models: the budget is not what is under test here
    "stages": [{"name": "activation", "epochs": 1, "threshold": 0.5},
               {"name": "sparse_opt", "epochs": 1, "finetune_epochs": 1}],
    "bench": {"runs": 200, "warmup": 2, "threads": [1], "batch": [1]},
}
# The weight stage zeros Dense kernels only (conv zeros run dense: weight.conv_zeros is off), and
# the convnets' one Dense is the classifier, which it leaves alone: it runs where it has work.
WEIGHT = {"encoder": [{"name": "weight", "epochs": 1}]}
# int8 export and its verification on a real architecture: MobileNetV2, which also runs both float
# runtimes, as the encoder does. EfficientNetB0 and MobileNetV3Small run one runtime each: a TFLite
# conversion of either takes about 50 s (the converter traces every layer into a SavedModel), and
# every exporter still meets a squeeze-excite network. scripts/families.py runs all of them in both.
RUN = {"MobileNetV2": ["tflite", "tflite-int8", "onnxruntime", "onnxruntime-int8"],
       "EfficientNetB0": ["onnxruntime"], "MobileNetV3Small": ["tflite"],
       "encoder": ["tflite", "onnxruntime"]}


def _data(name):
    raw = load_dataset("mnist5k")
    if name == "encoder":
        shape = lambda x: x.reshape(len(x), 28, 28)  # noqa: E731 - rows as tokens
    else:
        shape = lambda x: np.repeat(np.pad(x.reshape(len(x), 28, 28), ((0, 0), (2, 2), (2, 2)))[..., None], 3, -1)  # noqa: E731
    return {"x_train": shape(raw.x_train[:320]), "y_train": raw.y_train[:320], "x_test": shape(raw.x_test[:128]),
            "y_test": raw.y_test[:128], "x_calib": shape(raw.x_calib[:64])}


@pytest.mark.parametrize("name", sorted(RUN))
def test_family_runs_end_to_end(name, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"  # the user's working folder: nothing may be left there
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    arrays = _data(name)
    np.savez(tmp_path / "data.npz", **arrays)
    keras.utils.set_random_seed(0)
    model = FAMILIES[name]()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(arrays["x_train"], arrays["y_train"], epochs=1, batch_size=32, verbose=0)
    model.save(tmp_path / "model.keras")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {**RECIPE, "targets": RUN[name], "stages": WEIGHT.get(name, []) + RECIPE["stages"]}))
    out = tmp_path / "out"
    code = main(["run", "--model", str(tmp_path / "model.keras"), "--data", str(tmp_path / "data.npz"),
                 "--recipe", str(tmp_path / "recipe.yaml"), "--out", str(out), "--quiet"])
    assert code == 0
    assert list(cwd.iterdir()) == []
    report = json.loads((out / "report.json").read_text())
    assert all(v["ok"] for v in report["verification"]), report["verification"]
    shipped = {(r["variant"], r["runtime"]) for r in report["results"]}
    assert shipped >= {("pruned", targets.target(t).runtime) for t in RUN[name]}
    if "tflite-int8" in RUN[name]:
        assert shipped >= {("pruned-int8", "tflite"), ("pruned-int8", "onnxruntime")}
    narrowed = [row for row in report["layers"] if row["units_after"] < row["units_before"]]
    assert narrowed, "no layer got narrower"
    kept = [row for row in report["layers"] if row["units_after"] == row["units_before"] and row["kept_because"]]
    assert all(isinstance(row["kept_because"], str) for row in kept)  # the report says why
