"""The side-by-side benchmark of exported files: accuracy, latency distribution, size, params, FLOPs.

Files of one runtime are timed in the same process, interleaved (dense, pruned, int8, dense, …),
at fixed thread counts and batch sizes, after warm-up, so ratios between them survive a noisy
machine.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from compressor.core import CompressorError, inputs
from exporters.cpu import ISA_FLAGS, cpu_flags
from exporters.files import gzip_size
from exporters.latency import BLOCK, measure_both
from exporters.readback import is_weight, stored_weights
from exporters.runtimes import open_runner
from exporters.stats import accuracy_interval, latency_summary, throughput


@dataclass
class Artifact:
    variant: str            # dense | pruned | pruned-int8 | …
    runtime: str            # tflite | onnxruntime
    path: Path
    flops: int = 0
    resolver: str = "default"
    notes: list[str] = field(default_factory=list)


def machine_info() -> dict:
    versions = {}
    for pkg in ("tensorflow", "tf-keras", "tensorflow-model-optimization", "onnxruntime", "ai-edge-litert",
                "tf2onnx", "onnx", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "isa": [f for f in ISA_FLAGS if f in flags] if flags else None}


def file_params(path: Path) -> tuple[int, int]:
    """(weights, non-zero weights) stored in the file, decoded from the file itself.

    Every weight tensor counts, biases included (int32 in int8 TFLite files); quantization scales
    and zero points are bookkeeping, not weights, and shape/index constants are not weights.
    """
    total = nonzero = 0
    for tensor in stored_weights(path):
        bookkeeping = tensor.size == 1 and any(k in tensor.name.lower() for k in ("scale", "zero_point"))
        if is_weight(tensor) and not bookkeeping:
            total += tensor.size
            nonzero += tensor.size - tensor.zeros
    return total, nonzero


def correctness(runner, x: np.ndarray, y: np.ndarray, path: Path) -> np.ndarray:
    """Per-sample top-1 correctness (a bool vector, for the CI and the paired test)."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu" or (y.size and int(y.min()) < 0):
        raise CompressorError(f"labels must be class indices (integers from 0), got {y.dtype} values from "
                              f"{y.min() if y.size else 'none'}; pass integer labels in [0, outputs)")
    out = runner.predict(x).reshape(len(x), -1)
    if int(y.max()) >= out.shape[1]:
        raise CompressorError(f"labels go up to {int(y.max())} but '{path.name}' has {out.shape[1]} outputs; "
                              "pass data labelled for this model")
    return out.argmax(axis=1) == y


def _scored(judge, runner) -> tuple[dict, np.ndarray | None]:
    """A file's quality on the test split, streamed: the metric (every output's), and for
    single-output classification the accuracy, its Wilson interval and the per-sample correctness."""
    score = judge.file(runner, "test")
    row = {"accuracy": score.value if judge.is_accuracy else None,
           "metric": {"name": judge.name, "direction": judge.direction, "value": score.value,
                      "per_output": score.per_output, "samples": score.samples}}
    if score.correct is not None:
        row["accuracy_ci95"] = list(accuracy_interval(score.correct))
    return row, score.correct


def _time_group(group: list[Artifact], x: np.ndarray, threads: int, runs: int, warmup: int, block: int,
                reporter, label: str) -> tuple[dict, dict]:
    """One runtime's files timed interleaved at one thread count and batch: (call-only, served) times."""
    runners = {str(a.path): open_runner(a.path, threads=threads, resolver=a.resolver) for a in group}
    if reporter is None:
        return measure_both(runners, x, runs, warmup, block=block)
    with reporter.bar(label, runs) as bar:
        return measure_both(runners, x, runs, warmup, on_round=lambda i: bar.advance(), block=block)


def run_benchmark(artifacts: list[Artifact], judge, x_sample: np.ndarray, runs: int, warmup: int,
                  threads_list: list[int], batches: list[int], reporter=None,
                  block: int = BLOCK) -> tuple[list[dict], dict]:
    """Rows for report.json `results`, plus per-file correctness vectors for paired tests (only where
    they apply: single-output classification). `judge` scores each file in the recipe's metric
    (compressor/config/task.py); `x_sample` feeds the timed runs. `latency_ms` is the runtime call
    alone (input placed before the clock); `latency_ms_served` adds the copy-in and copy-out a
    Python server pays (exporters.latency)."""
    rows, correct_by_file = [], {}
    static = {}
    for art in artifacts:
        runner = open_runner(art.path, threads=1, resolver=art.resolver)
        quality, correct = _scored(judge, runner)
        params, nonzero = file_params(art.path)
        if correct is not None:
            correct_by_file[art.path.name] = correct
        static[art.path] = {
            **quality, "size_bytes": art.path.stat().st_size, "gzip_bytes": gzip_size(art.path),
            "params": params, "nonzero_params": nonzero,
        }
    by_runtime: dict[str, list[Artifact]] = {}
    for art in artifacts:
        by_runtime.setdefault(art.runtime, []).append(art)
    combos = [(rt, t, b) for rt in by_runtime for t in threads_list for b in batches]
    for runtime, threads, batch in combos:
        group = by_runtime[runtime]
        x = inputs.each(x_sample, lambda a: np.resize(a[: max(batch, 1)], (batch,) + a.shape[1:]).astype(np.float32))
        times, served = _time_group(group, x, threads, runs, warmup, block, reporter,
                                    f"bench {runtime} batch {batch} threads {threads}")
        for art in group:
            samples = times[str(art.path)]
            rows.append({
                "variant": art.variant, "runtime": runtime, "file": art.path.name,
                **{k: static[art.path][k] for k in ("accuracy", "accuracy_ci95", "metric") if k in static[art.path]},
                "latency_ms": {**latency_summary(samples), "warmup": warmup, "block": block},
                "latency_ms_served": {**latency_summary(served[str(art.path)]), "warmup": warmup, "block": block},
                "throughput_per_s": throughput(samples, batch),
                "batch": batch, "threads": threads,
                **{k: static[art.path][k] for k in ("size_bytes", "gzip_bytes", "params", "nonzero_params")},
                "flops": art.flops, "resolver": art.resolver, "notes": art.notes,
            })
    return rows, correct_by_file

