"""Streamed --data: an image folder, TFRecord files and tf.data functions run through `compressor run`,
scored on exactly the samples they name; bad data ends in one line, also when met mid-stream."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from compressor.cli import main
from compressor.config.recipe import parse_recipe
from compressor.core._tf import keras, tf
from compressor.data.sources import check_against_model, load_dataset
from tests import data_source
from tests.data_source import CLASSES, SIDE, images

FEATURES = {"image": {"dtype": "string", "image": True}, "label": {"dtype": "int64"}}


def _png_folder(root, x, y):
    for i, (img, label) in enumerate(zip(x, y)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img[..., 0] * 255).astype(np.uint8), mode="L").save(root / f"c{label}" / f"{i}.png")


def _tfrecord(path, x, y):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for img, label in zip(x, y):
            png = tf.io.encode_png(np.round(img * 255).astype(np.uint8)).numpy()
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))})).SerializeToString())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small trained conv net, and the same 150 images as a train/test image folder, a flat class
    folder and one TFRecord file (no test file: every 5th record is held out)."""
    folder = tmp_path_factory.mktemp("streams")
    x, y = images(150, seed=3)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Conv2D(4, 3, activation="relu", input_shape=(SIDE, SIDE, 1), name="conv"),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(CLASSES, activation="softmax", name="classifier")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=4, verbose=0)
    model.save(folder / "m.keras")
    _png_folder(folder / "split" / "train", x[:120], y[:120])
    _png_folder(folder / "split" / "test", x[120:], y[120:])
    _png_folder(folder / "flat", x, y)
    _tfrecord(folder / "data.tfrecord", x, y)
    recipe = {"targets": ["tflite", "onnxruntime"], "max_accuracy_drop": 0.5,
              "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
              "bench": {"runs": 200, "warmup": 5, "batch": [1]}, "data": {"tfrecord": {"features": FEATURES}}}
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    return folder, model, x, y


def _accuracy(model, x, y) -> float:
    return float(np.mean(model.predict(x, verbose=0).argmax(1) == y))


@pytest.mark.parametrize("kind", ["image_folder", "tfrecord", "dataset_function"])
def test_streamed_data_runs_end_to_end_on_the_samples_it_names(inputs, tmp_path, capsys, kind):
    folder, model, x, y = inputs
    data, test, train, val = {
        "image_folder": (folder / "split", slice(120, None), 120, False),
        "tfrecord": (folder / "data.tfrecord", slice(None, None, 5), 120, False),
        "dataset_function": ("tests.data_source:streams", slice(120, None), 90, True),
    }[kind]
    out = tmp_path / "out"
    code = main(["run", "--model", str(folder / "m.keras"), "--data", str(data), "--recipe", str(folder / "r.yaml"),
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    x_test, y_test = x[test], y[test]  # tests.data_source:streams holds the same 150 images
    assert report["data"] == {"name": str(data), "train": train, "test": len(y_test), "streamed": True,
                              "budget_split": "x_val" if val else "x_test"}
    assert report["baseline"]["accuracy"] == pytest.approx(_accuracy(model, x_test, y_test), abs=1e-6)
    dense = {r["runtime"]: r for r in report["results"] if r["variant"] == "dense"}
    assert set(dense) == {"tflite", "onnxruntime"}
    for row in dense.values():  # the files are scored on the same stream as Keras
        assert row["accuracy"] == pytest.approx(report["baseline"]["accuracy"], abs=1e-6)
        assert row["metric"]["samples"] == len(y_test) and row["metric"]["name"] == "accuracy"
    assert all(v["ok"] for v in report["verification"])
    assert all(c["paired_test"] is not None for c in report["comparisons"])  # McNemar: single-output classification


def test_a_flat_image_folder_is_split_with_a_fixed_seed_and_calibration_reads_only_its_share(inputs):
    folder, *_ = inputs
    ds = load_dataset(folder / "flat")
    check_against_model(ds, (SIDE, SIDE, 1), CLASSES)
    assert ds.sizes() == {"train": 120, "test": 30}
    assert ds.calibration().shape == (120, SIDE, SIDE, 1) and 0 <= ds.calibration().min() <= ds.calibration().max() <= 1
    batches = list(ds.batches("test", batch_size=8))
    assert [len(b[0]) for b in batches] == [8, 8, 8, 6] and batches[0][1].dtype == np.int64


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("data,tfrecord,message", [
    ("tests.data_source:streams_bad_labels", None, "label 7 is out of range for a model with 3 outputs"),
    ("tests.data_source:streams_nan_late", None, "a training batch contains NaN/inf values; clean or impute"),
    ("tests.data_source:streams_text_labels", None, "the train labels are string tensors; map them to numbers"),
    ("tests.data_source:streams_huge_labels", None, "a train label is out of range for class labels"),
    ("tests.data_source:streams_wrong_shape", None,
     r"samples have shape \(10, 12, 1\) but the model expects \(12, 12, 1\)"),
    ("data.tfrecord", {"y": "lbl", "features": {**FEATURES, "lbl": {"dtype": "int64"}}},
     "feature 'lbl' named in the recipe's data.tfrecord is not in the records \\(they hold: image, label\\)"),
    ("data.tfrecord", {"features": {"image": FEATURES["image"], "label": {"dtype": "float32"}}},
     "feature 'label' is stored as int64_list but the recipe says dtype float32"),
])
def test_bad_streamed_data_is_one_line(inputs, tmp_path, capsys, data, tfrecord, message):
    folder, *_ = inputs
    recipe = yaml.safe_load((folder / "r.yaml").read_text())
    if tfrecord is not None:
        recipe["data"]["tfrecord"] = tfrecord
        data = str(folder / data)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    err = _one_line_error(capsys, ["run", "--model", str(folder / "m.keras"), "--data", data,
                                   "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_bad_record_met_while_evaluating_is_named(inputs, tmp_path):
    """Past the first batches: the evaluation stream checks every batch it reads."""
    x, y = images(1000, seed=4)
    y[950] = 9  # test record 190 (every 5th record is test): past the 2 x 64 checked up front
    _tfrecord(tmp_path / "late.tfrecord", x, y)
    ds = load_dataset(tmp_path / "late.tfrecord", parse_recipe({"data": {"tfrecord": {"features": FEATURES}}}).data)
    check_against_model(ds, (SIDE, SIDE, 1), CLASSES)  # the first batches are clean
    from compressor.core.errors import CompressorError

    with pytest.raises(CompressorError, match="label 9 is out of range for a model with 3 outputs"):
        list(ds.batches("test", batch_size=16))


def test_calibration_reads_a_shuffle_buffer_of_the_training_stream_not_all_of_it():
    settings = parse_recipe({"data": {"calibration_samples": 32, "shuffle_buffer": 64}}).data
    ds = load_dataset("tests.data_source:counted", settings)
    check_against_model(ds, (SIDE, SIDE, 1), CLASSES)
    data_source.READ["samples"] = 0
    calib = ds.calibration()
    assert calib.shape == (32, SIDE, SIDE, 1)
    assert 32 <= data_source.READ["samples"] <= 64 + 32 + 16  # buffer + batch (+ read-ahead), of 5,000
    assert ds.calibration() is calib  # sampled once per binding


def _cli_run(argv: list[str], terminal: bool) -> tuple[int, str]:
    """`python -m compressor.cli run ...` with the progress on: stderr a file, or a pseudo-terminal
    (rich then draws live bars). Returns the exit code and everything written to stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    command = [sys.executable, "-m", "compressor.cli", "run", *argv]
    if not terminal:
        done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, check=False)
        return done.returncode, done.stderr
    import pty

    controller, child = pty.openpty()
    proc = subprocess.Popen(command, env={**env, "TERM": "xterm"}, cwd=root, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("kind,terminal", [("image_folder", True), ("tfrecord", False), ("dataset_function", False)])
def test_streamed_data_runs_with_the_progress_on(inputs, tmp_path, kind, terminal):
    """The fine-tune's progress bar once read `len(data.x_train)`, which a stream does not have: every
    streamed run crashed at its first fine-tune unless --quiet (the way the other tests run it)."""
    folder, *_ = inputs
    data = {"image_folder": folder / "split", "tfrecord": folder / "data.tfrecord",
            "dataset_function": "tests.data_source:streams"}[kind]
    recipe = {"targets": ["tflite"], "max_accuracy_drop": 0.5,
              "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
              "bench": {"runs": 200, "warmup": 1, "batch": [1]},
              "data": {"tfrecord": {"features": FEATURES}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, err = _cli_run(["--model", str(folder / "m.keras"), "--data", str(data), "--recipe", str(tmp_path / "r.yaml"),
                          "--out", str(tmp_path / "out")], terminal)
    assert code == 0, err[-3000:]
    assert "unexpected" not in err and "epoch 1/1" in err
    assert (tmp_path / "out" / "report.json").is_file()


def test_an_empty_calibration_split_falls_back_to_training_samples_with_a_warning(inputs, tmp_path, capsys):
    """An empty calibration dataset stopped the int8 export; the training stream stands in, with a warning."""
    folder, *_ = inputs
    recipe = yaml.safe_load((folder / "r.yaml").read_text())
    recipe["targets"] = ["onnxruntime-int8"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["run", "--model", str(folder / "m.keras"), "--data", "tests.data_source:streams_empty_calibration",
                 "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning: data 'tests.data_source:streams_empty_calibration': the calibration split is empty" in err
    assert (tmp_path / "out" / "pruned-int8.onnx").is_file()
