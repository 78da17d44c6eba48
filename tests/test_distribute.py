"""Fine-tuning under tf.distribute: MirroredStrategy over 2 logical CPU devices, a 2-worker
MultiWorkerMirroredStrategy cluster on localhost, and one-line errors for a bad `distribute:`.

Logical devices and collective ops must be set up before TensorFlow starts, so the runs happen in
fresh `compressor run` processes.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compressor.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 0.05
STAGES = [{"name": "weight", "sparsity": 0.8, "epochs": 1}, {"name": "activation", "epochs": 1},
          {"name": "sparse_opt", "epochs": 1, "finetune_epochs": 1}]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, small_mlp):
    path = tmp_path_factory.mktemp("dist") / "m.keras"
    small_mlp.save(path)
    return path


def _recipe(folder: Path, distribute: dict, **overrides) -> Path:
    raw = {"targets": ["tflite", "onnxruntime"], "stages": STAGES, "max_accuracy_drop": BUDGET,
           "bench": {"runs": 200, "warmup": 5, "batch": [1]}, "distribute": distribute, **overrides}
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(model: Path, recipe: Path, out: Path, env: dict | None = None, log=subprocess.PIPE) -> subprocess.Popen:
    """`compressor run` in a fresh process; output to pipes, or to a file `log` when nobody reads it meanwhile."""
    cmd = [sys.executable, "-m", "compressor.cli", "run", "--model", str(model), "--data", "digits",
           "--recipe", str(recipe), "--out", str(out), "--quiet"]
    return subprocess.Popen(cmd, stdout=log, stderr=log, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"run did not finish within {timeout}s: {err[-2000:]}")
    return proc.returncode, err


def _check_result(out: Path, strategy: str, replicas: int, workers: int) -> dict:
    """Verified files, every pruned file within the budget, and the strategy recorded."""
    report = json.loads((out / "report.json").read_text())
    assert ({"pruned.keras", "pruned.tflite", "pruned.onnx", "dense.tflite", "dense.onnx"}
            <= {p.name for p in out.iterdir()})
    assert report["verification"] and all(v["ok"] for v in report["verification"])
    assert report["distribute"]["strategy"] == strategy
    assert report["distribute"]["replicas"] == replicas and report["distribute"]["workers"] == workers
    baseline = report["baseline"]["accuracy"]
    pruned = [r for r in report["results"] if r["variant"] == "pruned"]
    assert pruned and all(baseline - r["accuracy"] <= BUDGET for r in pruned)
    reached = report["stages"][0]["details"]["layers"]  # the tfmot wrappers pruned under the strategy
    assert reached and min(reached.values()) >= 0.78
    return report


def test_mirrored_over_two_cpu_devices(model_file, tmp_path):
    out = tmp_path / "out"
    code, err = _finish(_run(model_file, _recipe(tmp_path, {"strategy": "mirrored", "devices": 2}), out))
    assert code == 0, err[-2000:]
    report = _check_result(out, "mirrored", replicas=2, workers=1)
    assert [d.rsplit(":", 1)[-1] for d in report["distribute"]["devices"]] == ["0", "1"]


def _free_ports(count: int) -> list[int]:
    """Ports the OS hands out for port 0 (closed again just before the workers bind them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("localhost", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[tuple[int, str]]:
    """Both workers end in time, or all are killed: one that fails would leave the other waiting on
    a collective op forever."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.5)
    return [(p.wait(), log.read_text()) for p, log in zip(procs, logs)]


def test_two_worker_cluster_on_localhost(model_file, tmp_path):
    """MultiWorkerMirroredStrategy across two processes from TF_CONFIG; only the chief (worker 0) writes."""
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    recipe = _recipe(tmp_path, {"strategy": "multi_worker"}, stages=STAGES[:2])
    outs = [tmp_path / f"out{i}" for i in range(2)]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with logs[i].open("w") as log:  # the child keeps its own handle
            procs.append(_run(model_file, recipe, outs[i], log=log,
                              env={"TF_CONFIG": json.dumps({"cluster": cluster,
                                                            "task": {"type": "worker", "index": i}})}))
    results = _wait_all(procs, logs, timeout=420)
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    _check_result(outs[0], "multi_worker", replicas=2, workers=2)
    assert not outs[1].exists()  # the other worker wrote into a scratch folder only
    assert not list(tmp_path.glob(".out1*"))


@pytest.mark.parametrize("distribute, env, expected", [
    ({"strategy": "ring"}, {}, "distribute.strategy"),
    ({"strategy": "none", "devices": 2}, {}, "devices applies to strategy mirrored only"),
    ({"strategy": "mirrored", "devices": 0}, {}, "distribute.devices"),
    ({"strategy": "multi_worker"}, {}, "needs the TF_CONFIG environment variable"),
    ({"strategy": "multi_worker"}, {"TF_CONFIG": "{cluster"}, "TF_CONFIG is not valid JSON"),
    ({"strategy": "multi_worker"}, {"TF_CONFIG": '{"cluster": {"worker": ["localhost:1"]}, '
                                                 '"task": {"type": "worker", "index": 3}}'}, "not a member"),
])
def test_bad_distribute_config_is_one_line(distribute, env, expected, model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    code = main(["run", "--model", str(model_file), "--data", "digits", "--recipe",
                 str(_recipe(tmp_path, distribute)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert expected in err, err
    assert not out.exists()


def test_devices_after_tensorflow_started_is_one_line(model_file, tmp_path, capsys):
    """This test process runs TensorFlow already: 3 CPU devices can no longer be made."""
    code = main(["run", "--model", str(model_file), "--data", "digits", "--recipe",
                 str(_recipe(tmp_path, {"strategy": "mirrored", "devices": 3})), "--out", str(tmp_path / "o"),
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "must be created before TensorFlow starts" in err and "\n" not in err


def test_batch_that_does_not_split_over_replicas_is_one_line(model_file, tmp_path):
    recipe = _recipe(tmp_path, {"strategy": "mirrored", "devices": 2}, batch_size=33)
    code, err = _finish(_run(model_file, recipe, tmp_path / "out"), timeout=120)
    assert code == 1 and err.strip().splitlines() == [err.strip()]
    assert "batch_size 33 does not split evenly over 2 replicas" in err
