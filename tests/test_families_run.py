"""`compressor run` end to end on the architectures people ship (keras.applications, weights=None,
32x32x3 digits, one-epoch fine-tunes): every file exports, verifies and is benchmarked, exit 0,
and the network really got narrower."""
import json

import numpy as np
import pytest
import yaml

from compressor.cli import main
from compressor.core._tf import keras
from exporters import targets
from tests.test_architectures import FAMILIES

RECIPE = {
    "max_accuracy_drop": 1.0,  # untrained models: the budget is not what is under test here
    "bench": {"runs": 200, "warmup": 2, "threads": [1], "batch": [1]},
}
# One target each: a TFLite conversion of a convnet takes about a minute (the converter traces every
# layer into a SavedModel), so each family meets one runtime, and between them every runtime, int8
# and squeeze-excite in both runtimes are met on a real architecture: MobileNetV2 ships int8 through
# the pipeline's scheme choice, EfficientNetB0 (squeeze-excite, swish) onnxruntime, MobileNetV3Small
# (squeeze-excite, hard-swish) LiteRT, the encoder LiteRT's static-shape transformer forms. The int8
# schemes on MobileNetV2-shaped blocks and the encoder in both runtimes are tests/test_int8.py's and
# tests/test_export_verify.py's; scripts/families.py runs every family in both runtimes.
# MobileNet (v1, alpha 0.25) onnxruntime. Xception, InceptionV3 and NASNet (about 20 M parameters at
# their smallest inputs, or 771 layers) are tests/test_architectures.py's couplings and exact removal,
# and scripts/families.py's end-to-end runs, as ResNet50V2 and DenseNet121 are.
RUN = {"MobileNetV2": ["onnxruntime-int8"], "EfficientNetB0": ["onnxruntime"], "MobileNetV3Small": ["tflite"],
       "encoder": ["tflite"], "MobileNet": ["onnxruntime"]}
# One structured stage with a one-epoch fine-tune (BatchNorm re-estimation included) narrows the
# network; cluster and sparse_opt (tests/test_stages_structured.py) would add a training graph each.
# The weight stage leaves conv kernels (weight.conv_zeros), token-sequence Dense kernels
# (weight.sequence_zeros) and the classifier dense by default: on the encoder it says so per layer
# without training; on the convnets it would have nothing to look at.
STAGES = {name: [{"name": "activation", "epochs": 1, "threshold": 0.5}] for name in RUN}
STAGES["encoder"].insert(0, {"name": "weight", "epochs": 1})


def _shape(x, name):
    """28x28 digits as 28 row tokens (encoder), else padded to 32x32 and repeated to 3 channels."""
    rows = x.reshape(len(x), 28, 28)
    return rows if name == "encoder" else np.repeat(np.pad(rows, ((0, 0), (2, 2), (2, 2)))[..., None], 3, -1)


def _data(raw, name):
    return {"x_train": _shape(raw.x_train[:320], name), "y_train": raw.y_train[:320],
            "x_test": _shape(raw.x_test[:128], name), "y_test": raw.y_test[:128],
            "x_calib": _shape(raw.x_calib[:64], name)}


@pytest.mark.parametrize("name", sorted(RUN))
def test_family_runs_end_to_end(name, tmp_path, monkeypatch, mnist5k):
    cwd = tmp_path / "cwd"  # the user's working folder: nothing may be left there
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    arrays = _data(mnist5k, name)
    np.savez(tmp_path / "data.npz", **arrays)
    keras.utils.set_random_seed(0)
    FAMILIES[name]().save(tmp_path / "model.keras")  # untrained: the stages' fine-tunes are the training
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "targets": RUN[name], "stages": STAGES[name]}))
    out = tmp_path / "out"
    code = main(["run", "--model", str(tmp_path / "model.keras"), "--data", str(tmp_path / "data.npz"),
                 "--recipe", str(tmp_path / "recipe.yaml"), "--out", str(out), "--quiet"])
    assert code == 0
    assert list(cwd.iterdir()) == []
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]][:len(STAGES[name])] == [s["name"] for s in STAGES[name]]
    assert all(v["ok"] for v in report["verification"]), report["verification"]
    shipped = {(r["variant"], r["runtime"]) for r in report["results"]}
    expected = {("pruned", targets.target(t).runtime) for t in RUN[name]}
    expected |= {("pruned-int8", targets.target(t).runtime) for t in RUN[name] if targets.target(t).int8}
    assert shipped >= expected
    narrowed = [row for row in report["layers"] if row["units_after"] < row["units_before"]]
    assert narrowed, "no layer got narrower"
    kept = [row for row in report["layers"] if row["units_after"] == row["units_before"] and row["kept_because"]]
    assert all(isinstance(row["kept_because"], str) for row in kept)  # the report says why
