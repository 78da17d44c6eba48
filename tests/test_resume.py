"""Long runs survive: a run killed during a stage continues with --resume and ends as a straight run would."""
import hashlib
import json
import os
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
from compressor.run.checkpoint import Checkpoint, folder_for

ROOT = Path(__file__).resolve().parents[1]
# Three stages; the second trains long enough that a kill right after the first checkpoint lands inside it.
RECIPE = {"targets": ["tflite"], "max_accuracy_drop": 0.2, "seed": 5,
          "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}, {"name": "activation", "epochs": 2},
                     {"name": "cluster", "epochs": 1}],
          "bench": {"runs": 200, "warmup": 1, "batch": [1], "threads": [1]}}
TIMINGS = {"seconds", "latency_ms", "latency_ms_served", "throughput_per_s", "speedup_p50", "speedup_p50_served",
           "speed_notes"}  # speed_notes: said only when a timing reads the pruned file slower


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_mlp):
    folder = tmp_path_factory.mktemp("resume")
    small_mlp.save(folder / "m.keras")
    (folder / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    return folder


def _args(folder: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(folder / "m.keras"), "--data", "digits", "--recipe", str(folder / "r.yaml"),
            "--quiet", *extra]


def _kill_after_first_stage(folder: Path, out: Path) -> None:
    """Start a run in a child process and SIGKILL it as soon as its first stage's checkpoint exists."""
    manifest = folder_for(out) / "manifest.json"
    proc = subprocess.Popen([sys.executable, "-m", "compressor.cli", *_args(folder, "--out", str(out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300
    while not manifest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {err[-500:]}"
    assert json.loads(manifest.read_text())["done"] == 1  # killed inside stage 2, nothing cleaned up
    assert list(out.parent.glob(f".{out.name}.partial-*"))


def test_killed_run_resumes_to_the_straight_runs_files_and_report(inputs, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_args(inputs, "--out", str(straight))) == 0
    assert not folder_for(straight).exists()  # a finished run leaves no checkpoint
    _kill_after_first_stage(inputs, resumed)

    capsys.readouterr()
    assert main(_args(inputs, "--resume", str(resumed), "--seed", "6")) == 1  # other inputs are refused
    assert _errors(capsys) == [f"error: cannot resume '{resumed}': the recipe changed since the interrupted run "
                               "(fields: seed); pass the same --recipe, --seed, --speedup, --runtime and "
                               "--keep-frontier as that run, or run without --resume to start over"]
    assert main(["run", "--model", str(inputs / "m.keras"), "--data", "mnist5k", "--recipe", str(inputs / "r.yaml"),
                 "--resume", str(resumed)]) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "the data changed since the interrupted run" in errors[0]

    assert main(_args(inputs, "--resume", str(resumed))) == 0
    assert not folder_for(resumed).exists() and not list(tmp_path.glob(".resumed.*"))
    a, b = (json.loads((d / "report.json").read_text()) for d in (straight, resumed))
    assert all(v["ok"] for v in b["verification"]) and [s["name"] for s in b["stages"]] == ["weight", "activation",
                                                                                            "cluster"]
    assert _without_timings(a) == _without_timings(b)
    for name in ("pruned.tflite", "dense.tflite"):
        assert _sha(straight / name) == _sha(resumed / name), name

    assert main(_args(inputs, "--resume", str(resumed))) == 1  # finished: nothing left to resume
    assert "nothing to resume" in _errors(capsys)[0]


def test_resume_without_checkpoint_or_with_another_model_is_one_error_line(inputs, tmp_path, capsys, small_mlp):
    out = tmp_path / "o"
    assert main(_args(inputs, "--resume", str(out))) == 1
    assert _errors(capsys) == [f"error: nothing to resume in '{out}': no checkpoint of an interrupted run (it "
                               "finished, or was stopped before its first stage ended); run without --resume"]
    assert main(_args(inputs, "--resume", str(out), "--out", str(tmp_path / "elsewhere"))) == 1
    assert "--resume" in _errors(capsys)[0]

    fingerprint = {"tool_version": "1", "recipe": "r", "model": "m", "data": "d"}
    Checkpoint(out, fingerprint, load_keras=None).save(1, small_mlp, [{"name": "weight"}], None)
    changed = Checkpoint(out, {**fingerprint, "model": "other"}, load_keras=None)
    with pytest.raises(CompressorError, match=r"the model file changed since the interrupted run; pass the same "
                                              r"--model file, unchanged, or run without --resume"):
        changed.check()


def test_checkpoint_round_trip_keeps_weights_records_and_points(tmp_path, small_mlp):
    from compressor.load.model_io import load_model

    records = [{"name": "weight", "accuracy_after": np.float32(0.5), "details": {"block": (16, 1)}}]
    cp = Checkpoint(tmp_path / "out", {"recipe": "r"}, load_keras=lambda p: load_model(p).model)
    cp.save(1, small_mlp, records, {"2.0x": small_mlp})
    cp.save(2, small_mlp, records * 2, {"2.0x": small_mlp})
    assert sorted(p.name for p in folder_for(tmp_path / "out").iterdir()) == [
        "manifest.json", "stage-2-point-0.keras", "stage-2.keras"]  # the previous stage's files are gone
    back = cp.load()
    assert back.done == 2 and back.records[1] == {"name": "weight", "accuracy_after": 0.5,
                                                  "details": {"block": [16, 1]}}
    for restored in (back.model, back.points["2.0x"]):
        assert all(np.array_equal(u, v) for u, v in zip(small_mlp.get_weights(), restored.get_weights()))
    assert cp.discard() and not folder_for(tmp_path / "out").exists()


def test_fine_tune_progress_shows_epoch_rate_and_eta(capsys, digits):
    from compressor.run.progress import Reporter
    from compressor.train.training import fit, reference_model

    reporter = Reporter()
    fit(reference_model((64,), 10), digits, epochs=2, batch_size=64, learning_rate=1e-3, hold_zeros=False,
        progress=reporter.epoch_callback("fine-tune", 2))
    lines = [line for line in capsys.readouterr().err.splitlines() if "fine-tune" in line]
    assert len(lines) == 3, lines
    for epoch, line in enumerate(lines[:2], 1):
        assert f"fine-tune: epoch {epoch}/2, " in line and " samples/s, ETA 0:" in line
    rate = float(lines[-1].split(", ")[-1].split()[0].replace(",", ""))
    assert "train accuracy" in lines[-1] and rate > 0


def test_a_data_folder_is_fingerprinted_by_its_listing(tmp_path):
    """Big image folders are not read on every run, yet a changed, added or removed file is noticed."""
    import os

    from compressor.run.checkpoint import data_digest

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(b"x" * 10)
    first = data_digest(tmp_path, None)
    assert data_digest(tmp_path, None) == first
    (tmp_path / "a" / "0.png").write_bytes(b"y" * 11)
    changed = data_digest(tmp_path, None)
    (tmp_path / "a" / "1.png").write_bytes(b"z")
    added = data_digest(tmp_path, None)
    os.remove(tmp_path / "a" / "1.png")
    assert len({first, changed, added}) == 3 and data_digest(tmp_path, None) == changed


def test_resume_alone_finishes_a_killed_run_with_the_inputs_its_checkpoint_names(inputs, tmp_path, capsys,
                                                                                monkeypatch):
    """A user who lost the shell history: `compressor run --resume OUT` and nothing else."""
    out = tmp_path / "alone"
    _kill_after_first_stage(inputs, out)
    saved = json.loads((folder_for(out) / "manifest.json").read_text())["inputs"]
    assert saved["model"] == str(inputs / "m.keras") and saved["data"] == "digits" and saved["recipe"]["seed"] == 5

    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--seed", "6"]) == 1  # what is given must match what the run used
    assert _errors(capsys) == [f"error: cannot resume '{out}': the recipe changed since the interrupted run "
                               "(fields: seed); pass the same --recipe, --seed, --speedup, --runtime and "
                               "--keep-frontier as that run, or run without --resume to start over"]
    assert main(["run", "--resume", str(out), "--data", "mnist5k"]) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "the data changed since the interrupted run" in errors[0]

    monkeypatch.chdir(tmp_path)  # the checkpoint names its inputs by absolute path
    assert main(["run", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["weight", "activation", "cluster"]
    assert report["verification"] and all(v["ok"] for v in report["verification"])
    assert report["recipe"]["seed"] == 5 and report["model"]["source"] == str(inputs / "m.keras")
    assert not folder_for(out).exists() and not list(tmp_path.glob(".alone.*"))


def test_run_without_model_or_data_and_without_resume_is_one_error_line(tmp_path, capsys):
    assert main(["run", "--data", "digits", "--out", str(tmp_path / "o")]) == 1
    assert _errors(capsys) == ["error: the following arguments are required: --model (or --resume OUT alone to "
                               "continue an interrupted run)"]
    assert main(["run", "--resume", str(tmp_path / "o")]) == 1
    assert "nothing to resume" in _errors(capsys)[0]


def test_a_checkpoint_that_does_not_name_its_inputs_asks_for_them(tmp_path, small_mlp, capsys):
    Checkpoint(tmp_path / "o", {"recipe": "r"}, load_keras=None).save(1, small_mlp, [], None)  # no inputs recorded
    assert main(["run", "--resume", str(tmp_path / "o")]) == 1
    assert _errors(capsys) == [f"error: the checkpoint of '{tmp_path / 'o'}' does not name its inputs (an older "
                               "version wrote it); pass the interrupted run's --model, --data and --recipe with "
                               "--resume"]
