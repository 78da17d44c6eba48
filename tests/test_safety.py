"""Files from elsewhere never run code; a failed or killed run never costs the previous result."""
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from compressor.cli import main
from compressor.core.errors import CompressorError

ROOT = Path(__file__).resolve().parents[1]
FAST = {"targets": ["tflite"], "max_accuracy_drop": 0.2, "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
        "bench": {"runs": 200, "warmup": 1, "batch": [1], "threads": [1]}}
# Long enough that a kill at any of the random points below lands before the end, spread over
# training, export, verification and benchmarking.
SLOW = {"targets": ["tflite", "onnxruntime"], "max_accuracy_drop": 0.2,
        "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 25}], "bench": {"runs": 4000, "warmup": 5}}
USER_MODULE = '''
import pathlib
from tf_keras import layers
pathlib.Path({marker!r}).write_text("imported")

class Twice(layers.Layer):
    def call(self, x):
        return 2 * x
'''


def _errors(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(out: Path, tag: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{tag}*"))


# --------------------------------------------------------------------------- stored code


@pytest.fixture(scope="module")
def lambda_files(tmp_path_factory):
    """The same tf-keras model with a Lambda that writes a marker file, in every format."""
    from compressor.core._tf import keras

    folder = tmp_path_factory.mktemp("lambda")
    marker = folder / "PAYLOAD_RAN"
    scope = {}
    exec(f"def payload(x):\n    __import__('pathlib').Path({str(marker)!r}).write_text('ran')\n    return x\n", scope)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Lambda(scope["payload"], name="evil"),
                              keras.layers.Dense(10, activation="softmax")])
    paths = [folder / "lam.h5", folder / "lam.keras", folder / "lam_savedmodel"]
    for path in paths:
        model.save(path)
    marker.unlink()  # building the model called the Lambda once
    return paths, marker


def test_lambda_is_refused_by_run_inspect_bench_and_api_without_running(lambda_files, tmp_path, capsys):
    from compressor.api import compress

    paths, marker = lambda_files
    for path in paths:
        commands = [["run", "--model", str(path), "--data", "digits", "--out", str(tmp_path / "o")],
                    ["bench", "--model", str(path)]]
        if path.is_file():
            commands.append(["inspect", str(path)])
        for argv in commands:
            assert main(argv) == 1
            errors, _ = _errors(capsys)
            assert len(errors) == 1, argv
            if argv[0] != "bench":  # bench reads only .tflite/.onnx and refuses the extension
                assert "layer 'evil' (Lambda)" in errors[0] and "--trust-model-code" in errors[0]
        with pytest.raises(CompressorError, match="'evil' \\(Lambda\\)"):
            compress(str(path), "digits", tmp_path / "api")
    assert not marker.exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "api").exists()


def test_trust_model_code_lets_the_lambda_run_with_a_warning(lambda_files, capsys):
    paths, marker = lambda_files
    try:
        assert main(["inspect", str(paths[0]), "--trust-model-code"]) == 0
        err = capsys.readouterr().err
        assert "warning: --trust-model-code" in err
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's own layer module, importable by name; importing it writes a marker."""
    marker = tmp_path / "MODULE_IMPORTED"
    (tmp_path / "userlayers_safety.py").write_text(USER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    import userlayers_safety

    yield userlayers_safety, marker
    sys.modules.pop("userlayers_safety", None)


def test_unregistered_custom_class_is_refused_and_its_module_never_imported(user_module, tmp_path, capsys):
    from compressor.api import compress
    from compressor.core._tf import keras

    module, marker = user_module
    model = keras.Sequential([keras.Input((64,)), module.Twice(name="twice"), keras.layers.Dense(10)])
    for name in ("c.keras", "c.h5"):
        model.save(tmp_path / name)
    sys.modules.pop("userlayers_safety")  # as in a fresh process: only Keras could import it now
    marker.unlink()
    for name in ("c.keras", "c.h5"):
        for argv in (["inspect", str(tmp_path / name)],
                     ["run", "--model", str(tmp_path / name), "--data", "digits", "--out", str(tmp_path / "o")]):
            assert main(argv) == 1
            errors, _ = _errors(capsys)
            assert len(errors) == 1 and "'twice'" in errors[0] and "--custom-objects" in errors[0], errors
        with pytest.raises(CompressorError, match="custom class 'Twice'"):
            compress(str(tmp_path / name), "digits", tmp_path / "api")
    assert not marker.exists()

    assert main(["inspect", str(tmp_path / "c.keras"), "--custom-objects", "userlayers_safety", "--json"]) == 0
    assert marker.exists() and '"format": "keras"' in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "c.h5"), "--custom-objects", "no_such_module_xyz"]) == 1
    errors, _ = _errors(capsys)
    assert len(errors) == 1 and "cannot import it" in errors[0]


def test_config_naming_a_foreign_module_is_refused_before_import(user_module, tmp_path, capsys):
    """A .keras config.json may name any module for an initializer; Keras would import it."""
    import json
    import zipfile

    from compressor.core._tf import keras

    _, marker = user_module
    sys.modules.pop("userlayers_safety")
    marker.unlink()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")]).save(tmp_path / "ok.keras")
    with zipfile.ZipFile(tmp_path / "ok.keras") as src, zipfile.ZipFile(tmp_path / "bad.keras", "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][1]["config"]["kernel_initializer"] = {
                    "module": "userlayers_safety", "class_name": "Twice", "config": {}, "registered_name": None}
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    assert main(["inspect", str(tmp_path / "bad.keras")]) == 1
    errors, _ = _errors(capsys)
    assert len(errors) == 1 and "module 'userlayers_safety'" in errors[0] and "'d'" in errors[0]
    assert not marker.exists()


# --------------------------------------------------------------------------- the previous result


@pytest.fixture(scope="module")
def previous(tmp_path_factory, small_mlp):
    """A finished result (folder + hash of every file) and the inputs that made it."""
    folder = tmp_path_factory.mktemp("previous")
    small_mlp.save(folder / "m.keras")
    (folder / "fast.yaml").write_text(yaml.safe_dump(FAST))
    (folder / "slow.yaml").write_text(yaml.safe_dump(SLOW))
    out = folder / "result"
    assert main(["run", "--model", str(folder / "m.keras"), "--data", "digits", "--recipe", str(folder / "fast.yaml"),
                 "--out", str(out), "--quiet"]) == 0
    return folder, out, _hashes(out)


def _start_slow_run(folder: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "compressor.cli", "run", "--model", str(folder / "m.keras"), "--data", "digits",
           "--recipe", str(folder / "slow.yaml"), "--out", str(out), "--force", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while not _siblings(out, "partial-") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert _siblings(out, "partial-"), proc.stderr.read() if proc.poll() is not None else "no partial folder"
    return proc


@pytest.mark.parametrize("sig,delay", [(signal.SIGTERM, random.Random(11).uniform(0.5, 8)),
                                       (signal.SIGKILL, random.Random(12).uniform(0.5, 8))], ids=["SIGTERM", "SIGKILL"])
def test_killed_force_run_leaves_the_previous_result_byte_identical(previous, tmp_path, capsys, sig, delay):
    folder, prev, prev_hashes = previous
    out = tmp_path / "result"
    shutil.copytree(prev, out)
    proc = _start_slow_run(folder, out)
    if sig == signal.SIGTERM:  # meanwhile a second run on the same folder is refused, naming the first
        assert main(["run", "--model", str(folder / "m.keras"), "--data", "digits", "--recipe",
                     str(folder / "fast.yaml"), "--out", str(out), "--force"]) == 1
        errors, _ = _errors(capsys)
        assert len(errors) == 1 and f"another compressor run (pid {proc.pid})" in errors[0]
    time.sleep(delay)
    assert proc.poll() is None, "the run ended before the kill: make SLOW slower"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert _hashes(out) == prev_hashes
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err
        assert _siblings(out, "partial-") == [] and _siblings(out, "lock") == []
        return
    assert proc.returncode == -signal.SIGKILL and _siblings(out, "partial-")  # nothing could clean up
    assert main(["run", "--model", str(folder / "m.keras"), "--data", "digits", "--recipe",
                 str(folder / "fast.yaml"), "--out", str(out), "--force", "--quiet"]) == 0
    assert _siblings(out, "partial-") == [] and _siblings(out, "lock") == [] and _siblings(out, "old-") == []
    assert set(_hashes(out)) == set(prev_hashes)


def test_a_run_killed_between_the_two_renames_is_put_back_by_the_next(tmp_path):
    from compressor.run.outdir import OutputFolder

    out = tmp_path / "result"
    old = tmp_path / ".result.old-999999999"  # the previous result, moved aside by a run that then died
    old.mkdir()
    (old / "report.json").write_text("{}")
    (tmp_path / ".result.partial-999999999").mkdir()
    folder = OutputFolder(out, force=True)
    with folder as work:
        assert (out / "report.json").read_text() == "{}"  # restored before anything else happens
        (work / "report.json").write_text('{"new": 1}')
        folder.commit()
    assert (out / "report.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_failure_inside_the_run_keeps_the_previous_result(tmp_path):
    from compressor.run.outdir import OutputFolder

    out = tmp_path / "result"
    out.mkdir()
    (out / "report.json").write_text("old")
    with pytest.raises(RuntimeError), OutputFolder(out, force=True) as work:
        (work / "report.json").write_text("new")
        raise RuntimeError("crash in the middle")
    assert (out / "report.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


# --------------------------------------------------------------------------- .onnx / .tflite from elsewhere


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_mlp):
    from exporters import onnx_export, tflite_export

    folder = tmp_path_factory.mktemp("exported")
    tflite_export.export_float(small_mlp, folder / "m.tflite", sparse=False)
    onnx_export.export_float(small_mlp, folder / "m.onnx", compact=False)
    return folder


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_onnx_external_data_outside_the_folder_is_refused(exported, tmp_path, capsys, location):
    import onnx

    model = onnx.load(exported / "m.onnx")
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "outside.bin").write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    (tmp_path / "model").mkdir()
    onnx.save(model, tmp_path / "model" / "m.onnx")
    for argv in (["inspect", str(tmp_path / "model" / "m.onnx")],
                 ["bench", "--model", str(tmp_path / "model" / "m.onnx")]):
        assert main(argv) == 1
        errors, _ = _errors(capsys)
        assert len(errors) == 1 and "outside the model's folder" in errors[0] and location in errors[0]


def test_onnx_subgraphs_nested_too_deep_are_refused(tmp_path, capsys):
    from onnx import TensorProto, helper

    def nested(level):
        out = helper.make_tensor_value_info(f"y{level}", TensorProto.FLOAT, [1])
        const = helper.make_node("Constant", [], [f"y{level}"],
                                 value=helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0]))
        body = [const] if level == 0 else [
            helper.make_node("If", ["cond"], [f"y{level}"], then_branch=nested(level - 1),
                             else_branch=nested(level - 1) if level < 2 else nested(0))]
        return helper.make_graph(body, f"g{level}", [], [out])

    graph = nested(20)
    graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    path = tmp_path / "deep.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert main(["inspect", str(path)]) == 1
    errors, _ = _errors(capsys)
    assert len(errors) == 1 and "nested more than 16 levels" in errors[0]


def test_oversized_files_are_refused_with_the_limit(exported, capsys, monkeypatch):
    from exporters import untrusted

    monkeypatch.setattr(untrusted, "MAX_FILE_BYTES", 1000)
    for name in ("m.tflite", "m.onnx"):
        for argv in (["inspect", str(exported / name)], ["bench", "--model", str(exported / name)]):
            assert main(argv) == 1
            errors, _ = _errors(capsys)
            assert len(errors) == 1 and "exceeds the 1,000-byte limit" in errors[0]
            assert "COMPRESSOR_MAX_MODEL_BYTES" in errors[0]
    monkeypatch.setenv("COMPRESSOR_MAX_MODEL_BYTES", str(10 ** 9))
    assert main(["inspect", str(exported / "m.tflite")]) == 0


def test_tflite_declaring_a_giant_tensor_is_refused(exported, tmp_path, capsys):
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model(str(exported / "m.tflite"))
    weight = next(t for t in model.subgraphs[0].tensors if len(t.shape) == 2 and t.buffer > 0)
    weight.shape = np.array([1 << 20, 1 << 20], dtype=np.int32)
    fbu.write_model(model, str(tmp_path / "giant.tflite"))
    assert main(["inspect", str(tmp_path / "giant.tflite")]) == 1
    errors, _ = _errors(capsys)
    assert len(errors) == 1 and "declares 1,099,511,627,776 elements" in errors[0]


# --------------------------------------------------------------------------- the fuzz script


def test_seeded_fuzz_slice_ends_every_case_in_one_line_or_a_result(capsys):
    """One damaged file of each kind through inspect and bench; seeds are built in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_script", ROOT / "scripts" / "fuzz.py")
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fuzz  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(fuzz)
    code = fuzz.main(["--files", "6", "--seed", "3", "--commands", "inspect,bench", "--jobs", "2", "--timeout", "120"])
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if line.startswith("fuzz summary")]
    assert code == 0 and summary, out[-2000:]
    assert "cases 9, passes 9, crashes 0, hangs 0, tracebacks 0, other failures 0" in summary[0]


def test_compiled_models_with_metrics_and_a_custom_loss_still_load(tmp_path):
    """compile=False never builds the loss or metrics, so they are not refused."""
    from compressor.core._tf import keras
    from compressor.load.model_io import load_model

    def my_loss(y_true, y_pred):
        return keras.backend.mean(y_pred)

    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", my_loss, ["accuracy"])
    model.fit(np.random.default_rng(0).random((8, 5)), np.zeros(8), epochs=1, verbose=0)
    for name in ("m.keras", "m.h5", "m_savedmodel"):
        model.save(tmp_path / name)
        assert load_model(tmp_path / name).model.output_shape == (None, 2)
