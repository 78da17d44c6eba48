"""int8 against float at deployment size: latency ratios, agreement and the graph each runtime runs.

    nice python scripts/int8_scale.py [--models MobileNetV2,ResNet50] [--runtimes onnxruntime,tflite]
                                      [--size 224] [--runs 100] [--schemes all|NAME,...] [--work DIR]

keras.applications models built with `weights=None` (seeded), exported through the target
registry (exporters/targets.py) as `pruned` float and every int8 scheme of each runtime's int8
target, calibrated on mnist5k digits resized to the input size. Files of one runtime are timed in
one process, interleaved (exporters/latency.py), batch 1, 1 thread, after warm-up; the float file
is the baseline of every ratio. Agreement: top-1 of the int8 file against the float file on
held-out digits, and the int8 output's relative L2 error. onnxruntime rows also count the op
types of the graph onnxruntime runs (all optimisations), where a float Conv left is visible.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402

BUILDERS = {"MobileNetV2": lambda keras, shape: keras.applications.MobileNetV2(alpha=1.0, weights=None,
                                                                               input_shape=shape),
            "ResNet50": lambda keras, shape: keras.applications.ResNet50(weights=None, input_shape=shape),
            "EfficientNetB0": lambda keras, shape: keras.applications.EfficientNetB0(weights=None,
                                                                                     input_shape=shape)}
KEY_OPS = ("Conv", "QLinearConv", "QuantizeLinear", "DequantizeLinear", "Transpose", "Add", "QLinearAdd", "Pad")


def digits(size: int, n: int, seed: int = 0) -> np.ndarray:
    """mnist5k digits resized to size x size, three channels, in [0, 1]."""
    from compressor.core._tf import tf
    from compressor.data.sources import mnist5k

    x = mnist5k().x_train
    x = x[np.random.default_rng(seed).permutation(len(x))[:n]].reshape(n, 28, 28, 1)
    return np.repeat(tf.image.resize(x, (size, size)).numpy(), 3, axis=-1).astype(np.float32)


def with_statistics(model, x: np.ndarray):
    """A random-weight network's activations fade to zero through its BatchNorms (the softmax came out
    exactly uniform, which hides any int8 error). As in a trained one, every BatchNorm gets a spread
    of per-channel scales and the mean and variance of its input on a batch of the data (one
    training-mode pass with momentum 0)."""
    from compressor.core._tf import keras

    rng = np.random.default_rng(0)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([rng.lognormal(0, 0.5, gamma.shape).astype(np.float32),
                           rng.normal(0, 0.2, beta.shape).astype(np.float32), mean, var])
        layer.momentum = 0.0
    model(x, training=True)
    for layer in norms:
        layer.momentum = 0.99
    return model


def export(name: str, size: int, runtimes: list[str], schemes: list[str] | None, work: Path,
           calib: np.ndarray) -> list[dict]:
    """Float and int8 files of one model per runtime: [{runtime, label, path, export_s}], float first."""
    from compressor.core._tf import keras
    from exporters import targets

    keras.utils.set_random_seed(0)
    model = with_statistics(BUILDERS[name](keras, (size, size, 3)), calib[:16])
    files = []
    for runtime in runtimes:
        fp, i8 = targets.float_target(runtime), next(t for t in targets.TARGETS.values()
                                                     if t.runtime == runtime and t.int8)
        start = time.perf_counter()
        path = fp.export(model, work / f"{name}-{fp.filename('pruned')}")
        files.append({"runtime": runtime, "label": "float", "path": path, "export_s": time.perf_counter() - start})
        for scheme in i8.schemes:
            if (schemes and scheme.name not in schemes) or scheme.name in ("dynamic", "dynamic-range"):
                continue
            start = time.perf_counter()
            path = i8.export(model, work / f"{name}-{scheme.name}-{i8.filename('pruned-int8')}", calibration=calib,
                             scheme=scheme, sparse=False)
            files.append({"runtime": runtime, "label": scheme.name, "path": path,
                          "export_s": time.perf_counter() - start})
    return files


def op_summary(row: dict) -> str:
    from exporters.runtimes import open_runner

    runner = open_runner(row["path"])
    if not hasattr(runner, "op_names"):  # onnxruntime: the op types of the graph it optimised
        from exporters.onnx_quant import optimized_op_counts

        counts = optimized_op_counts(row["path"])
        return ", ".join(f"{op} {counts[op]}" for op in KEY_OPS if counts.get(op))
    ops = runner.op_names()
    return ", ".join(f"{op} {ops.count(op)}" for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "QUANTIZE", "DEQUANTIZE",
                                                        "DELEGATE") if op in ops)


def _logits(y: np.ndarray) -> np.ndarray:
    """Probabilities (rows summing to 1) as centred log-probabilities, the logits up to a constant:
    a random-weight model's softmax is near uniform and would hide any error."""
    if y.min() >= 0 and np.allclose(y.sum(-1), 1, atol=1e-3):
        y = np.log(np.maximum(y, 1e-30))
        return y - y.mean(-1, keepdims=True)
    return y


def measure(rows: list[dict], x_time: np.ndarray, x_check: np.ndarray, runs: int, warmup: int) -> None:
    """p50 ms, ratio over float, top-1 agreement and relative error for each file of one runtime."""
    from exporters.latency import measure_interleaved
    from exporters.runtimes import open_runner
    from exporters.stats import latency_summary

    runners = {r["label"]: open_runner(r["path"]) for r in rows}
    outputs = {label: runner.predict(x_check, batch=8) for label, runner in runners.items()}
    times = measure_interleaved(runners, x_time, runs, warmup)
    base = latency_summary(times["float"])["p50"]
    for r in rows:
        r["p50_ms"] = latency_summary(times[r["label"]])["p50"]
        r["speedup"] = base / r["p50_ms"]
        ref, out = _logits(outputs["float"]), _logits(outputs[r["label"]])
        r["agreement"] = float(np.mean(ref.argmax(-1) == out.argmax(-1)))
        r["rel_error"] = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))
        r["ops"] = op_summary(r)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MobileNetV2,ResNet50")
    parser.add_argument("--runtimes", default="onnxruntime,tflite")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calibration", type=int, default=32, help="calibration samples")
    parser.add_argument("--check", type=int, default=32, help="held-out samples for the agreement")
    parser.add_argument("--schemes", default="qdq-per-channel,qdq-per-tensor,int8-dense",
                        help="int8 scheme names to export, or all (every static one)")
    parser.add_argument("--work", default="artifacts/int8-scale")
    parser.add_argument("--doc", help="also write the table as a markdown section here (docs/int8_scale.md, "
                        "which scripts/benchmark.py puts into docs/BENCHMARKS.md)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = digits(args.size, args.calibration + args.check)
    calib, check = data[: args.calibration], data[args.calibration :]
    schemes = None if args.schemes == "all" else args.schemes.split(",")
    start_load = os.getloadavg()[0]
    lines = ["| model | runtime | file | export s | p50 ms | x float | top-1 agreement | rel. error | ops run |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        files = export(name, args.size, args.runtimes.split(","), schemes, work, calib)
        for runtime in args.runtimes.split(","):
            rows = [r for r in files if r["runtime"] == runtime]
            measure(rows, check[:1], check, args.runs, args.warmup)
            for r in rows:
                lines.append(f"| {name} | {runtime} | {r['label']} | {r['export_s']:.0f} | {r['p50_ms']:.2f} | "
                             f"{r['speedup']:.2f} | {r['agreement']:.3f} | {r['rel_error']:.3f} | {r['ops']} |")
                print(lines[-1], flush=True)
    note = (f"batch 1, 1 thread, {args.size}x{args.size}x3, {args.runs} interleaved runs, "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}; 1-min load average {start_load:.1f} at start and "
            f"{os.getloadavg()[0]:.1f} at end on {os.cpu_count()} cores")
    print("# " + note)
    if args.doc:
        _write_doc(Path(args.doc), lines, note, argv if argv is not None else sys.argv[1:])
    return 0


def _write_doc(path: Path, table: list[str], note: str, argv: list[str]) -> None:
    local = ("--work", "--doc")
    shown = [a for i, a in enumerate(argv) if a not in local and (i == 0 or argv[i - 1] not in local)]
    command = " ".join(["python scripts/int8_scale.py", *shown, "--doc docs/int8_scale.md"])
    text = [f"## Deployment size: int8 against float at {note.split(', ')[2]}", "",
            "keras.applications models built with `weights=None`; latency only (random weights: the agreement "
            "columns compare the int8 file with the float one on resized mnist5k digits, not accuracy). "
            f"Regenerate with `{command}`.", "", f"{note[0].upper()}{note[1:]}.", "", *table]
    path.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
