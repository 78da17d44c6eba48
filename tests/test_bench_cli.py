"""`compressor bench` end to end on tiny exported files, plus the benchmark suite's model builders."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compressor.cli import main
from tests.conftest import save_npz

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--runs", "30", "--warmup", "3", "--quiet"]


@pytest.fixture(scope="module")
def files(small_mlp, digits, tmp_path_factory):
    """The conftest 64-64-10 MLP as .tflite and .onnx, and the digits data as an .npz."""
    from exporters import onnx_export, tflite_export

    folder = tmp_path_factory.mktemp("bench")
    return {
        "tflite": tflite_export.export_float(small_mlp, folder / "tiny.tflite", sparse=False),
        "onnx": onnx_export.export_float(small_mlp, folder / "tiny.onnx"),
        "npz": save_npz(folder / "digits.npz", digits),
        "folder": folder,
    }


def _run(capsys, *argv):
    code = main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _single_error(code, err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_table_for_tflite_with_random_inputs(files, capsys):
    code, out, _ = _run(capsys, "--model", files["tflite"], *FAST)
    assert code == 0
    for word in ("tiny.tflite", "p50 ms", "p99 ms", "served p50 ms", "throughput", "gzip bytes", "random"):
        assert word in out
    assert "accuracy" not in out  # no --data: no accuracy claimed


def test_json_for_onnx_with_data(files, capsys, small_mlp, digits):
    code, out, _ = _run(capsys, "--model", files["onnx"], "--data", files["npz"], "--json", "--batch", "4", *FAST)
    assert code == 0
    result = json.loads(out)
    f = result["files"][0]
    assert f["runtime"] == "onnxruntime"
    assert {"p50", "p90", "p99", "mean", "runs", "warmup"} <= set(f["latency_ms"])
    assert f["latency_ms"]["runs"] == 30 and f["latency_ms"]["p50"] <= f["latency_ms"]["p99"]
    assert 0 < f["latency_ms_served"]["runs"] < 30  # fewer served calls (copy-in + call + copy-out), same turns
    keras_acc = float(np.mean(small_mlp.predict(digits.x_test, verbose=0).argmax(1) == digits.y_test))
    assert f["accuracy"] == pytest.approx(keras_acc, abs=0.01)
    low, high = f["accuracy_ci95"]
    assert low < f["accuracy"] < high and f["test_samples"] == len(digits.y_test)
    assert f["gzip_bytes"] < f["size_bytes"]
    assert result["settings"]["batch"] == 4 and result["machine"]["cores"] >= 1
    assert "compare" not in result


def test_data_is_reshaped_to_the_input_and_a_wrong_size_fails(files, digits, capsys, tmp_path):
    as_images = tmp_path / "images.npz"
    np.savez(as_images, x_train=digits.x_train.reshape(-1, 8, 8), y_train=digits.y_train,
             x_test=digits.x_test.reshape(-1, 8, 8), y_test=digits.y_test)
    code, out, _ = _run(capsys, "--model", files["tflite"], "--data", as_images, "--json", *FAST)
    assert code == 0 and json.loads(out)["files"][0]["accuracy"] > 0.8

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x_train=digits.x_train[:, :60], y_train=digits.y_train,
             x_test=digits.x_test[:, :60], y_test=digits.y_test)
    code, _, err = _run(capsys, "--model", files["tflite"], "--data", wrong, *FAST)
    assert "(60,)" in _single_error(code, err)


def test_compare_two_copies_ratio_near_one(files, capsys):
    copy = files["folder"] / "copy.tflite"
    shutil.copy(files["tflite"], copy)
    code, out, _ = _run(capsys, "--model", files["tflite"], "--compare", copy, "--data", files["npz"], "--json",
                        "--runs", "1500", "--warmup", "100", "--quiet")
    assert code == 0
    result = json.loads(out)
    ratio = result["compare"]["latency_ratio"]
    assert ratio["rounds"] == 1500
    assert abs(ratio["median"] - 1.0) < 0.10, ratio
    assert ratio["ci95_low"] <= ratio["median"] <= ratio["ci95_high"]
    paired = result["compare"]["mcnemar"]
    assert paired["a_only"] == paired["b_only"] == 0 and paired["p_value"] == 1.0
    assert result["settings"]["interleaved"] is True


def test_compare_across_runtimes_renders_ratio_and_paired_test(files, capsys):
    code, out, _ = _run(capsys, "--model", files["tflite"], "--compare", files["onnx"], "--data", files["npz"], *FAST)
    assert code == 0
    assert "tiny.tflite" in out and "tiny.onnx" in out
    assert "latency ratio tiny.tflite / tiny.onnx" in out and "McNemar" in out


@pytest.mark.parametrize("problem", ["missing", "extension", "corrupt", "runs", "compare-missing"])
def test_bad_inputs_fail_in_one_line(problem, files, capsys, tmp_path):
    args = ["--model", files["tflite"], "--quiet"]
    if problem == "missing":
        args[1] = tmp_path / "nope.tflite"
    elif problem == "extension":
        other = tmp_path / "model.pb"
        other.write_bytes(b"x")
        args[1] = other
    elif problem == "corrupt":
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not a model" * 100)
        args[1] = bad
    elif problem == "runs":
        args += ["--runs", "0"]
    else:
        args += ["--compare", tmp_path / "nope.onnx"]
    code, out, err = _run(capsys, *args)
    line = _single_error(code, err)
    assert out == ""
    expected = {"missing": "not found", "extension": "unknown extension", "corrupt": "cannot load",
                "runs": "--runs", "compare-missing": "--compare"}[problem]
    assert expected in line


# ---- files built to hang or exhaust the runtime ---------------------------------------------------

def loop_model(path: Path, trips: int = 2**62, constant: bool = True) -> Path:
    """An ONNX Loop that adds 1 to its input `trips` times and never stops early; with constant=False
    the trip count is computed by a Mul at run time, so no static check can see it."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Add", ["v_in", "one"], ["v_out"])], "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("v_in", T.FLOAT, [1, 4])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("v_out", T.FLOAT, [1, 4])],
        [h.make_tensor("one", T.FLOAT, [1], [1.0])])
    inits, nodes = [h.make_tensor("cond", T.BOOL, [], [True])], []
    if constant:
        inits.append(h.make_tensor("M", T.INT64, [], [trips]))
    else:
        inits += [h.make_tensor("a", T.INT64, [], [2**31]), h.make_tensor("b", T.INT64, [], [trips // 2**31])]
        nodes.append(h.make_node("Mul", ["a", "b"], ["M"]))
    nodes.append(h.make_node("Loop", ["M", "cond", "x"], ["y"], body=body, name="forever"))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _cli(*argv, **kwargs) -> subprocess.Popen:
    """`compressor` in a subprocess (a hang must fail the test, not block it)."""
    return subprocess.Popen([sys.executable, "-m", "compressor.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)


def _answer(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        proc.kill()  # a hang fails the test and leaves nothing running
        proc.wait()


def test_loop_with_constant_huge_trip_count_is_refused_before_it_runs(tmp_path):
    proc = _cli("bench", "--model", loop_model(tmp_path / "forever.onnx"), "--quiet")
    out, err = _answer(proc, 60)
    line = _single_error(proc.returncode, err)
    assert "forever.onnx" in line and "4,611,686,018,427,387,904 times" in line and out == ""


def test_loop_computed_at_run_time_is_stopped_at_the_time_limit(tmp_path):
    path = loop_model(tmp_path / "computed.onnx", constant=False)
    start = time.monotonic()
    proc = _cli("bench", "--model", path, "--quiet", "--time-limit", "2")
    out, err = _answer(proc, 90)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "computed.onnx" in lines[0] and "more than 2 s" in lines[0] and "--time-limit" in lines[0]
    assert "Traceback" not in err and out == "" and time.monotonic() - start < 60


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the runtime's process through /proc")
def test_sigterm_ends_bench_within_a_second_while_the_runtime_runs(tmp_path):
    proc = _cli("bench", "--model", loop_model(tmp_path / "computed.onnx", constant=False), "--quiet")
    deadline = time.monotonic() + 60
    while not _children(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # the runtime is inside the Loop now
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = _answer(proc, 10)
    assert proc.returncode == 143 and time.monotonic() - sent < 2.0, (proc.returncode, err)
    assert err.strip().splitlines() == ["error: terminated (SIGTERM)"]


@pytest.mark.parametrize("flag, value, bound", [("--threads", "100000", "between 1 and 256"),
                                                ("--batch", "100000000", "--batch <="),
                                                ("--runs", "10000000000", "10,000,000"),
                                                ("--time-limit", "-1", "positive number of seconds")])
def test_huge_counts_are_refused_naming_the_bound(flag, value, bound, files, capsys):
    short = [] if flag == "--runs" else ["--runs", "5", "--warmup", "0"]
    code, out, err = _run(capsys, "--model", files["onnx"], flag, value, *short, "--quiet")
    line = _single_error(code, err)
    assert bound in line and flag in line and out == ""
    assert "thread" not in line.replace("--threads", "") and "MemoryError" not in line


def test_time_limit_from_the_environment(monkeypatch, files, capsys):
    monkeypatch.setenv("COMPRESSOR_BENCH_TIME_LIMIT", "soon")
    line = _single_error(*_run(capsys, "--model", files["tflite"], *FAST)[::2])
    assert "COMPRESSOR_BENCH_TIME_LIMIT" in line
    monkeypatch.setenv("COMPRESSOR_BENCH_TIME_LIMIT", "30")
    assert _run(capsys, "--model", files["tflite"], *FAST)[0] == 0


def _segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def _slow_call(path, rest: bool):
    from exporters.watchdog import beat, idle

    beat(path)
    if rest:
        idle()  # out of the runtime: hashing, gzip
    time.sleep(1.5)
    return "done"


def test_the_limit_counts_runtime_calls_only(tmp_path):
    from compressor.core.errors import CompressorError
    from exporters.watchdog import run_watched

    path = tmp_path / "slow.onnx"
    assert run_watched(_slow_call, (path, True), [path], limit=0.5) == "done"
    with pytest.raises(CompressorError, match=r"slow.onnx: one runtime call ran for more than 0.5 s"):
        run_watched(_slow_call, (path, False), [path], limit=0.5)


def test_a_runtime_crash_in_the_child_is_one_line(tmp_path):
    from compressor.core.errors import CompressorError
    from exporters.watchdog import run_watched

    with pytest.raises(CompressorError, match=r"the runtime crashed \(signal 11\)"):
        run_watched(_segfault, (), [tmp_path / "x.onnx"], limit=30)


# ---- scripts/benchmark.py: model builders and the tfmot peer, not the whole suite -----------------

def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_suite_model_builders_build_and_run(digits):
    from compressor.graph.flops import model_macs

    models = _load_script("models")
    assert set(models.MODELS) == {"mlp-128", "mlp-1024", "cnn", "dscnn", "mobilenetv2", "efficientnetb0", "encoder"}
    x = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    for spec in models.MODELS.values():
        model = spec.build()
        assert tuple(model.input_shape[1:]) == spec.input_shape
        shaped = spec.shape(x) if spec.shape else x.reshape((2, *spec.input_shape))
        out = model.predict(shaped, verbose=0)
        assert out.shape == (2, 10) and np.allclose(out.sum(axis=1), 1.0, atol=1e-4)
        assert model_macs(model) > 0
    names = {type(layer).__name__ for layer in models.MODELS["dscnn"].build().layers}
    assert {"DepthwiseConv2D", "SeparableConv2D", "BatchNormalization", "GlobalAveragePooling2D"} <= names


def test_tfmot_peer_reaches_its_target_without_touching_the_dense_model(small_mlp, digits):
    bench = _load_script("benchmark")
    before = [w.copy() for w in small_mlp.get_weights()]
    peer, reached = bench.tfmot_peer(small_mlp, digits, seed=0)
    assert reached and all(s >= 0.78 for s in reached.values()), reached
    assert all(np.array_equal(a, b) for a, b in zip(before, small_mlp.get_weights()))
    acc = float(np.mean(peer.predict(digits.x_test, verbose=0).argmax(1) == digits.y_test))
    assert acc > 0.8


def test_suite_static_metrics_reads_each_file(small_mlp, digits, tmp_path):
    """The suite's per-file pass (accuracy, sizes, stored weights) on one float file per runtime."""
    from exporters import onnx_export, tflite_export

    script = _load_script("benchmark")
    files = {"dense": {"tflite": tflite_export.export_float(small_mlp, tmp_path / "d.tflite", sparse=False),
                       "onnxruntime": onnx_export.export_float(small_mlp, tmp_path / "d.onnx")}}
    static = script.static_metrics({"files": files}, digits.x_test, digits.y_test)
    for runtime in ("tflite", "onnxruntime"):
        row = static[("dense", runtime)]
        assert row["resolver"] == "default" and row["params"] == small_mlp.count_params()
        assert abs(row["accuracy"] - static[("dense", "tflite")]["accuracy"]) < 0.01


def test_suite_frontier_section_and_fixed_recipe():
    """The goal-driven default (`fusion`) is compared with the same recipe without its search
    (`fusion-fixed`); the frontier section lists every point and marks the shipped one."""
    script = _load_script("benchmark")
    assert [s.name for s in script.fixed_recipe().stages][-1] != "search"
    rows = [{"point": "point0-2.00x", "predicted_speedup": 2.0, "accuracy": 0.95, "within_budget": True,
             "widths": {"h": 64}, "measured_speedup": {"onnxruntime": 1.8, "tflite": 2.2}, "files": ["pruned.keras"]},
            {"point": "point1-4.00x", "predicted_speedup": 4.0, "accuracy": 0.90, "within_budget": False,
             "widths": {"h": 16}, "measured_speedup": {"onnxruntime": 3.1, "tflite": 4.4}}]
    checks = [{"model": "point0", "error_pct": -10.0}, {"model": "point1", "error_pct": 30.0},
              {"model": "dense", "error_pct": 99.0}]
    text = "\n".join(script.frontier_section({"models": [{"name": "m", "frontier": rows, "latency_model": checks}]}))
    assert "| point0-2.00x | 2.00x | 1.80x | 2.20x | 0.9500 | yes | h 64 | yes |" in text
    assert "| point1-4.00x | 4.00x | 3.10x | 4.40x | 0.9000 | no | h 16 |  |" in text
    assert "median |prediction error| 20.0% over 2" in text


def test_suite_update_keeps_other_models_and_refuses_another_machine(tmp_path):
    """`--update` re-measures some models and keeps the rest of the page, in the suite's order, each
    with its own date; results from another CPU are never mixed in."""
    script = _load_script("benchmark")
    meta = {"machine": {"cpu": "A"}, "quick": False, "command": "python scripts/benchmark.py", "date": "d0",
            "tool_version": "1"}
    old = {"meta": meta, "models": [{"name": "mlp-128", "measured": {"date": "d0"}},
                                    {"name": "cnn", "measured": {"date": "d0"}}]}
    (tmp_path / "benchmarks.json").write_text(json.dumps(old))
    new = {"meta": dict(meta, command="python scripts/benchmark.py --update --models cnn", date="d1"),
           "models": [{"name": "cnn", "measured": {"date": "d1"}}]}
    merged = script._merged(tmp_path / "benchmarks.json", new)
    assert [(e["name"], e["measured"]["date"]) for e in merged["models"]] == [("mlp-128", "d0"), ("cnn", "d1")]
    assert merged["meta"]["updates"] == ["python scripts/benchmark.py --update --models cnn"]
    assert merged["meta"]["command"] == "python scripts/benchmark.py" and merged["meta"]["date"] == "d1"
    assert script._public_args(["--update", "--work", "/w", "--out=/o", "--models", "cnn"]) == [
        "--update", "--models", "cnn"]
    (tmp_path / "benchmarks.json").write_text(json.dumps(merged))
    again = script._merged(tmp_path / "benchmarks.json", new)  # the same command twice is listed once
    assert again["meta"]["updates"] == ["python scripts/benchmark.py --update --models cnn"]
    other = dict(new, meta=dict(new["meta"], machine={"cpu": "B"}))
    with pytest.raises(SystemExit, match="another machine"):
        script._merged(tmp_path / "benchmarks.json", other)


def test_families_update_replaces_a_familys_row_and_keeps_the_others_in_page_order():
    """A sweep of several hours is run in parts: `families.py --update` merges each into the page."""
    script = _load_script("families")
    previous = [{"family": "encoder", "exit": 1, "measured": "a"},
                {"family": "MobileNetV2", "exit": 0, "measured": "a"}]
    rows = [{"family": "encoder", "exit": 0, "measured": "b"}, {"family": "ResNet50", "exit": 0, "measured": "b"}]
    page = script.merged(previous, rows, ["MobileNetV2", "ResNet50", "encoder"])
    assert [(r["family"], r["exit"], r["measured"]) for r in page] == [
        ("MobileNetV2", 0, "a"), ("ResNet50", 0, "b"), ("encoder", 0, "b")]
    table = script.render(page)
    assert "| ResNet50 | 0 |" in table and table.count("\n| ") == 1 + len(page)  # the header, then one row each


def test_families_row_shows_the_best_stage_beside_an_undertrained_dense_model(tmp_path):
    """MobileNetV3Large's sweep row read 0.102 -> 0.181, hiding that the stages had reached 0.939."""
    script = _load_script("families")
    row = lambda variant, runtime, acc, ms: {"variant": variant, "runtime": runtime, "batch": 1, "threads": 1,  # noqa: E731
                                            "accuracy": acc, "latency_ms": {"p50": ms}, "gzip_bytes": 100, "flops": 10}
    report = {"results": [row("dense", "tflite", 0.102, 1.0), row("pruned", "tflite", 0.181, 0.1)],
              "verification": [{"ok": True}], "baseline_notes": ["the dense model looks undertrained: …"],
              "stages": [{"name": "depth", "metric_after": 0.915}, {"name": "sparse_opt", "metric_after": 0.939},
                         {"name": "search", "metric_after": 0.181}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    summary = script._summary(tmp_path)
    assert summary["accuracy_stages_best"] == 0.939 and summary["notes"] == report["baseline_notes"]
    table = script.render([{"family": "MobileNetV3Large", "exit": 0, **summary}])
    assert "0.102 -> 0.181 (best stage 0.939)" in table


def test_deployment_rows_head_the_page_with_both_timings_and_keep_the_suites_settings(tmp_path):
    """Rows at deployment size (scripts/benchmark.py --rows deployment|latency) come first, each with
    the call-only and the served speedup; adding them keeps the suite's meta (its rounds and load)."""
    script = _load_script("benchmark")
    speed = lambda x: {"median": x, "p10": x, "p90": x, "ci95": [x, x], "rounds": 600}  # noqa: E731
    row = lambda variant, ms, acc: {"variant": variant, "runtime": "tflite", "batch": 1, "threads": 1,  # noqa: E731
                                    "resolver": "default", "accuracy": acc, "accuracy_ci95": [acc, acc],
                                    "latency_ms": {"p50": ms}, "latency_ms_served": {"p50": ms + 0.5}}
    entry = {"name": "mobilenetv2-128-clutter", "data": "clutter@128",
             "rows": [row("dense", 4.0, 0.8), row("fusion", 1.0, 0.79)],
             "comparisons": [{"variant": "fusion", "baseline": "dense", "runtime": "tflite", "batch": 1, "threads": 1,
                              "speedup": speed(4.0), "speedup_served": speed(3.0), "gzip_ratio": 5.0}],
             "measured": {"load_average_1m": {"before_timing": 3.0, "after_timing": 4.0}}}
    results = {"meta": {"machine": {"cores": 2}}, "models": [entry]}
    table = script.deployment_table(results)
    assert "| mobilenetv2-128-clutter | clutter@128 | tflite | fusion | 1.000 (4.000) | 4.00x (4.00–4.00) | " \
           "1.5000 (4.5000) | 3.00x (3.00–3.00) | – | 5.0x | 0.790 ± 0.000 (0.800 ± 0.000) |" in table
    assert "**served**" in "\n".join(script._deployment_top(results))
    old = {"meta": {"machine": {"cpu": "A"}, "quick": False, "command": "python scripts/benchmark.py",
                    "settings": {"runs": {"1": 2000}}}, "models": [{"name": "cnn"}]}
    (tmp_path / "benchmarks.json").write_text(json.dumps(old))
    new = {"meta": {"machine": {"cpu": "A"}, "quick": False, "command": "python scripts/benchmark.py --rows deployment",
                    "settings": {"runs": {"1": 600}}, "rows": "deployment"}, "models": [entry]}
    merged = script._merged(tmp_path / "benchmarks.json", new)
    assert [m["name"] for m in merged["models"]] == ["cnn", "mobilenetv2-128-clutter"]
    assert merged["meta"]["settings"]["runs"]["1"] == 2000
    assert merged["meta"]["updates"] == ["python scripts/benchmark.py --rows deployment"]


def test_reuse_takes_the_models_an_earlier_run_left_in_work(small_mlp, tmp_path):
    """`--reuse --work DIR`: a deployment-size model is not trained (tens of minutes) twice."""
    script = _load_script("benchmark")
    small_mlp.save(tmp_path / "dense.keras")
    again = script._trained(None, None, tmp_path / "dense.keras", reuse=True)  # no spec needed: nothing trains
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), small_mlp.get_weights()))
    peer, reached = script._peer(None, None, tmp_path / "dense.keras", reuse=True)
    assert set(reached) and all(v == 0.0 for v in reached.values())


def test_user_models_record_a_refusal_by_its_line_in_their_own_section_of_the_families_page(tmp_path):
    """scripts/user_models.py and scripts/families.py write one page: each keeps the other's part."""
    script, families = _load_script("user_models"), _load_script("families")
    two_in, two_out = script.arrays_for("two-input", 50), script.arrays_for("two-output", 50)
    assert {"x_train_0", "x_train_1", "y_train", "x_calib_0", "x_calib_1"} <= set(two_in)
    assert two_out["y_train_0"].shape == (50,) and two_out["y_train_1"].shape == (50, 1)
    page = tmp_path / "FAMILIES.md"
    page.write_text(families.render([{"family": "MobileNet", "exit": 0}]))
    refused = {"model": "two-input", "exit": 1, "error": "error: models with several inputs are refused",
               "measured": "x"}
    script._write(page, [refused], "python scripts/user_models.py")
    script._write(page, [refused], "python scripts/user_models.py")  # a second sweep replaces the section
    text = page.read_text()
    assert text.count(script.SECTION) == 1 and "| 1: `error: models with several inputs are refused` |" in text
    again = families.keeping_user_models(page, families.render([{"family": "Xception", "exit": 0}]))
    assert "| Xception | 0 |" in again and "| MobileNet |" not in again
    assert again.endswith(text.split(script.SECTION)[1])
