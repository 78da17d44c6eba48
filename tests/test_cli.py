"""The command line on a tiny model: the output folder contract, report.json, and one-line errors."""
import json

import numpy as np
import pytest
import yaml

from compressor.cli import main
from tests.conftest import save_npz

EXPECTED_FILES = {"report.json", "report.md", "dense.tflite", "dense.onnx", "pruned.keras", "pruned.tflite",
                  "pruned.onnx", "pruned-int8.tflite", "pruned-int8.onnx", "latency.png", "accuracy_vs_size.png",
                  "layers.png"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_mlp, digits):
    folder = tmp_path_factory.mktemp("inputs")
    small_mlp.save(folder / "m.keras")
    recipe = {"targets": ["tflite", "tflite-int8", "onnxruntime", "onnxruntime-int8"], "max_accuracy_drop": 0.05,
              "stages": [{"name": "weight", "sparsity": 0.8, "epochs": 2}], "bench": {"runs": 200, "warmup": 5}}
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "m.keras", save_npz(folder / "d.npz", digits), folder / "r.yaml"


def test_run_writes_the_contracted_folder(inputs, tmp_path, capsys):
    model, data, recipe = inputs
    out = tmp_path / "out"
    code = main(["run", "--model", str(model), "--data", str(data), "--recipe", str(recipe), "--out", str(out),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [".compressor-files.json"]  # no temp leftovers; the list of what the run wrote
    listed = set(json.loads((out / ".compressor-files.json").read_text())["files"])
    assert listed == {p.name for p in out.iterdir()} - {".compressor-files.json"}
    report = json.loads((out / "report.json").read_text())
    for key in ("tool_version", "machine", "model", "recipe", "stages", "results", "verification"):
        assert key in report
    assert report["model"]["input_shape"] == [None, 64]
    assert {(r["variant"], r["runtime"]) for r in report["results"]} >= {
        ("dense", "tflite"), ("dense", "onnxruntime"), ("pruned", "tflite"), ("pruned", "onnxruntime")}
    row = next(r for r in report["results"] if r["file"] == "pruned.tflite")
    assert row["latency_ms"]["runs"] == 200 and row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
    served = row["latency_ms_served"]  # the call with copy-in and copy-out, fewer runs in the same turns
    assert 0 < served["runs"] < 200 and served["p50"] <= served["p99"]
    assert row["nonzero_params"] < row["params"] and row["batch"] == 1 and row["threads"] == 1
    assert all(v["ok"] and v["zeros_in_file"] == v["zeros_expected"] for v in report["verification"])
    assert report["recipe"]["stages"][0]["block"] == "auto"  # resolved recipe, defaults filled in
    assert "| pruned | tflite |" in (out / "report.md").read_text()
    classifier = next(row for row in report["layers"] if row["layer"] == "classifier")
    assert "softmax" in classifier["kept_because"]  # the report says why a layer kept its width
    # int8 files: accuracy measured like the float ones, and the tflite one runs in the default interpreter
    int8 = {r["runtime"]: r for r in report["results"] if r["variant"] == "pruned-int8"}
    assert set(int8) == {"tflite", "onnxruntime"} and all(0.5 < r["accuracy"] <= 1 for r in int8.values())
    assert int8["tflite"]["resolver"] == "default"
    # what `inspect` reads from each file is what verification read back
    from exporters.inspect import inspect_file

    for row in report["verification"]:
        assert inspect_file(out / row["file"])["totals"]["zeros"] == row["zeros_in_file"], row["file"]


def test_existing_output_folder_is_refused_without_force(inputs, tmp_path, capsys):
    model, data, recipe = inputs
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["run", "--model", str(model), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: output folder") and "--force" in err[-1]
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (["--model", "missing.keras"], "not found"),
    (["--data", "missing.npz"], "not found"),
    (["--recipe", "missing.yaml"], "not found"),
])
def test_missing_inputs_give_one_line_errors(inputs, tmp_path, capsys, args, message):
    model, data, recipe = inputs
    base = {"--model": str(model), "--data": str(data), "--recipe": str(recipe)}
    base[args[0]] = str(tmp_path / args[1])
    argv = ["run", "--out", str(tmp_path / "o")] + [x for kv in base.items() for x in kv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert "Traceback" not in capsys.readouterr().err


def test_recipe_example_is_a_valid_recipe(capsys):
    from compressor.config.recipe import parse_recipe

    assert main(["recipe", "--example"]) == 0
    text = capsys.readouterr().out
    assert parse_recipe(yaml.safe_load(text)) == parse_recipe(None)


def test_inspect_cli_reads_zeros_from_file(inputs, tmp_path, capsys, small_mlp):
    from exporters.onnx_export import export_float

    path = export_float(small_mlp, tmp_path / "m.onnx")
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["size"] == sum(np.prod(w.shape) for w in small_mlp.weights if len(w.shape) == 2)


def test_force_never_deletes_files_it_did_not_write(inputs, tmp_path, capsys):
    model, data, recipe = inputs
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "report.json").write_text("{}")
    code = main(["run", "--model", str(model), "--data", str(data), "--out", str(out), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "did not write (notes.txt)" in err[-1]
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.json").exists()


def test_failed_run_leaves_no_empty_output_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", "--model", str(tmp_path / "missing.keras"), "--data", "digits", "--out", str(out)]) == 1
    assert not out.exists()


def test_speedup_goal_on_the_command_line_adds_the_search_and_its_frontier(tmp_path, capsys, monkeypatch):
    """`--speedup 2 --runtime onnxruntime`: a search stage is appended with that goal; report.json gains the
    frontier and the latency model's predicted-vs-measured rows, and frontier.png is written."""
    from compressor.core._tf import keras

    monkeypatch.setenv("COMPRESSOR_LATENCY_CACHE", str(tmp_path / "latency.json"))
    keras.utils.set_random_seed(0)  # wide enough that width, not per-call overhead, sets the latency
    wide = keras.Sequential([keras.layers.Input((784,)), keras.layers.Dense(1024, activation="relu"),
                             keras.layers.Dense(10, activation="softmax")])
    wide.compile("adam", "sparse_categorical_crossentropy")
    from compressor.data.sources import load_dataset

    mnist = load_dataset("mnist5k")
    wide.fit(mnist.x_train, mnist.y_train, epochs=1, batch_size=64, verbose=0)
    model, data = tmp_path / "wide.keras", "mnist5k"
    wide.save(model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"targets": ["tflite", "onnxruntime"], "max_accuracy_drop": 0.05,
                                      "stages": [{"name": "search", "epochs": 1, "points": [2.0], "bisect": 0}],
                                      "bench": {"runs": 200, "warmup": 5, "batch": [1]}}))
    out = tmp_path / "out"
    code = main(["run", "--model", str(model), "--data", str(data), "--recipe", str(recipe), "--out", str(out),
                 "--speedup", "2", "--runtime", "onnxruntime", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    search = report["recipe"]["stages"][-1]
    assert search["name"] == "search" and search["goal"] == {"runtime": "onnxruntime", "speedup": 2.0,
                                                              "latency_ms": None, "batch": 1}
    assert report["frontier"] and all("measured_ms" in row for row in report["frontier"])
    assert {row["runtime"] for row in report["latency_model"]} == {"onnxruntime", "tflite"}
    assert (out / "frontier.png").stat().st_size > 0 and "## Frontier" in (out / "report.md").read_text()
    assert main(["run", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o2"),
                 "--speedup", "0.5"]) == 1
    assert "speedup" in capsys.readouterr().err


def test_an_error_line_stays_short_and_keeps_its_cause_and_fix():
    from compressor.cli.main import ERROR_CHARS, one_line

    message = "model layer '" + "x" * 5000 + "' is refused\n(it runs code); pass --trust-model-code for your own file"
    line = one_line(message)
    assert len(line) <= ERROR_CHARS and "\n" not in line
    assert line.startswith("model layer '…xxx") and line.endswith("pass --trust-model-code for your own file")
    assert one_line("short; fix it") == "short; fix it"
    deep = "/" + "/".join(["folder"] * 40)
    line = one_line(f"no space left on the disk of '{deep}/res' while writing '{deep}/res/report.json'; free some")
    assert len(line) <= ERROR_CHARS and line.endswith("folder/res/report.json'; free some")
