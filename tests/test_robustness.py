"""A user's own model, data and typos: Keras 3 files, unsupported layers, bad input, reruns, Ctrl-C."""
import hashlib
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from compressor.cli import main

FAST = {"targets": ["tflite", "onnxruntime"], "max_accuracy_drop": 0.1,
        "stages": [{"name": "weight", "sparsity": 0.8, "epochs": 2}], "bench": {"runs": 200, "warmup": 5}}


def _recipe(tmp_path, **overrides):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**FAST, **overrides}))
    return str(path)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.random((240, 8, 8, 1)).astype(np.float32)
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(np.int64)
    path = tmp_path_factory.mktemp("img") / "img.npz"
    np.savez(path, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    return path


def test_keras3_cnn_with_bn_and_residual_add_goes_through_run(tmp_path, image_data, capsys):
    import keras as keras3

    inp = keras3.Input((8, 8, 1))
    a = keras3.layers.Conv2D(8, 3, padding="same")(inp)
    a = keras3.layers.BatchNormalization()(a)
    a = keras3.layers.ReLU()(a)
    b = keras3.layers.Conv2D(8, 3, padding="same", activation="relu")(a)
    x = keras3.layers.Add()([a, b])
    x = keras3.layers.GlobalAveragePooling2D()(x)
    x = keras3.layers.Dense(16, activation="relu")(x)
    out = keras3.layers.Dense(2, activation="softmax")(x)
    model = keras3.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy")
    data = np.load(image_data)
    model.fit(data["x_train"], data["y_train"], epochs=2, verbose=0)
    path = tmp_path / "k3.keras"
    model.save(path)
    digest = _sha(path)
    out_dir = tmp_path / "out"
    fusion = [{"name": "weight", "sparsity": 0.8, "epochs": 2}, {"name": "activation", "epochs": 1},
              {"name": "sparse_opt", "epochs": 1, "finetune_epochs": 1}]
    code = main(["run", "--model", str(path), "--data", str(image_data), "--recipe",
                 _recipe(tmp_path, stages=fusion, max_accuracy_drop=0.2), "--out", str(out_dir), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out_dir / "report.json").read_text())
    assert "Keras 3" in report["model"]["load_notes"][0]
    assert report["verification"] and all(v["ok"] for v in report["verification"])
    assert [s["name"] for s in report["stages"]][:3] == ["weight", "activation", "sparse_opt"]
    assert _sha(path) == digest


def test_lstm_model_is_compressed_around_the_lstm_with_a_warning(tmp_path, capsys):
    from compressor.core._tf import keras

    rng = np.random.default_rng(0)
    x = rng.random((120, 6, 4)).astype(np.float32)
    y = (x[:, :, 0].mean(axis=1) > 0.5).astype(np.int64)
    np.savez(tmp_path / "seq.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    model = keras.Sequential([keras.layers.LSTM(8, input_shape=(6, 4), name="rnn"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x[:100], y[:100], epochs=20, verbose=0)
    model.save(tmp_path / "lstm.keras")
    code = main(["run", "--model", str(tmp_path / "lstm.keras"), "--data", str(tmp_path / "seq.npz"),
                 "--recipe", _recipe(tmp_path, targets=["onnxruntime"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "rnn" in err and "LSTM" in err and "left unpruned" in err


@pytest.mark.parametrize("content,message", [
    (b"PK\x03\x04 truncated", "model"),
    (np.random.default_rng(7).bytes(256), "model"),  # fixed bytes: parallel workers collect the same tests
], ids=["truncated-zip", "random-bytes"])
def test_corrupt_model_file(tmp_path, capsys, content, message):
    path = tmp_path / "bad.keras"
    path.write_bytes(content)
    assert main(["run", "--model", str(path), "--data", "digits", "--out", str(tmp_path / "o")]) == 1
    assert message in _one_error_line(capsys)


@pytest.mark.parametrize("recipe,field", [
    ({"stages": [{"name": "weight", "sparsity": 1.5}]}, "stages.0.weight.sparsity"),
    ({"stages": [{"name": "prune_everything"}]}, "unknown stage"),
    ({"stages": [{"name": "weight", "epochs": -2}]}, "epochs"),
    ({"targets": ["tpu"]}, "targets"),
    ({"max_accuracy_drop": "a lot"}, "max_accuracy_drop"),
    ({"stagse": []}, "stagse"),
])
def test_invalid_recipe_names_field_value_and_allowed(tmp_path, capsys, small_mlp, recipe, field):
    small_mlp.save(tmp_path / "m.keras")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["run", "--model", str(tmp_path / "m.keras"), "--data", "digits", "--recipe",
                 str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")])
    line = _one_error_line(capsys)
    assert code == 1 and field in line
    assert not (tmp_path / "o").exists()  # validated before any work


def test_wrong_data_shape_and_labels(tmp_path, capsys, small_mlp):
    small_mlp.save(tmp_path / "m.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "shape.npz", x_train=rng.random((10, 5)), y_train=np.zeros(10, int),
             x_test=rng.random((4, 5)), y_test=np.zeros(4, int))
    np.savez(tmp_path / "labels.npz", x_train=rng.random((10, 64)), y_train=np.full(10, 12),
             x_test=rng.random((4, 64)), y_test=np.zeros(4, int))
    for name, message in (("shape.npz", "model expects (64,)"), ("labels.npz", "label 12 is out of range")):
        code = main(["run", "--model", str(tmp_path / "m.keras"), "--data", str(tmp_path / name),
                     "--out", str(tmp_path / f"o-{name}")])
        assert code == 1 and message in _one_error_line(capsys)


def test_same_seed_gives_identical_masks_and_files(tmp_path, small_mlp, capsys):
    small_mlp.save(tmp_path / "m.keras")
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["run", "--model", str(tmp_path / "m.keras"), "--data", "digits", "--recipe", _recipe(tmp_path),
                     "--out", str(out), "--seed", "7", "--quiet"]) == 0
        outs.append(out)
    for name in ("pruned.tflite", "pruned.onnx"):
        assert _sha(outs[0] / name) == _sha(outs[1] / name), name


def _ctrl_c_deliverable():
    """A job started in the background by a non-interactive shell (as CI runs us) inherits SIGINT ignored,
    and Python then keeps ignoring it: give the child the default disposition, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_run_leaves_no_partial_artifact(tmp_path, small_mlp):
    small_mlp.save(tmp_path / "m.keras")
    out = tmp_path / "o"
    recipe = _recipe(tmp_path, stages=[{"name": "weight", "sparsity": 0.8, "epochs": 200}])
    proc = subprocess.Popen([sys.executable, "-m", "compressor.cli", "run", "--model", str(tmp_path / "m.keras"),
                             "--data", "digits", "--recipe", recipe, "--out", str(out), "--quiet"],
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_deliverable)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".o.partial-*")):  # the result is built aside
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in err
    leftovers = ([p.name for p in out.iterdir() if ".partial" in p.name or p.name.startswith(".")]
                 if out.exists() else [])
    assert leftovers == [] and list(tmp_path.glob(".o.*")) == []
    assert not (out / "report.json").exists()


# ---- scripts/fuzz.py, hostile kinds: one file of each, every promise of the kind asserted -------------

@pytest.fixture(scope="module")
def fuzz_script(tmp_path_factory):
    """The fuzz script as a module, with its seed files built once in a kept work folder."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("fuzz_hostile", root / "scripts" / "fuzz.py")
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fuzz  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(fuzz)
    work = tmp_path_factory.mktemp("fuzz")
    fuzz.build_seeds(work)
    return fuzz, work


@pytest.mark.parametrize("kind", ["links", "savedmodel", "h5-external", "mount", "full-disk", "symlink-out",
                                  "bomb", "onnx-loop", "odd-npz"])
def test_seeded_fuzz_slice_of_each_hostile_kind_keeps_its_promise(kind, fuzz_script, capsys):
    fuzz, work = fuzz_script
    code = fuzz.main(["--kinds", kind, "--hostile", "1", "--seed", "0", "--jobs", "2", "--timeout", "240",
                      "--workdir", str(work)])
    out = capsys.readouterr().out
    if f"SKIPPED: {kind}" in out:
        pytest.skip(out.strip().splitlines()[0])
    summary = next(line for line in out.splitlines() if line.startswith("fuzz summary"))
    cases = int(summary.split("cases ")[1].split(",")[0])
    assert code == 0 and cases >= 1, out[-3000:]
    assert (f"passes {cases}, crashes 0, hangs 0, tracebacks 0, other failures 0, broken promises 0"
            in summary), out[-3000:]
