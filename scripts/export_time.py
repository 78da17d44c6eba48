"""Time the export step (all four targets, int8 choice, verification) on a keras.applications model.

    python scripts/export_time.py --model mobilenetv2 --size 224
    python scripts/export_time.py --model resnet50 --size 224 --floor

The model is built with `weights=None` (nothing downloaded), the data are seeded noise images with
random labels (export cost does not depend on what the model learned), and the recipe is one light
weight stage, so the files have the dense architecture, as a user's first try of a 224 px model.
Prints wall and CPU seconds (this process and its children) of the export and the verification,
and the 1-minute load average: on a shared machine CPU seconds are the comparable figure. `--floor`
also times one float LiteRT conversion and one tf2onnx conversion of the model alone.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402

MODELS = {"mobilenetv2": "MobileNetV2", "resnet50": "ResNet50", "efficientnetb0": "EfficientNetB0"}
RECIPE = {"targets": None, "max_accuracy_drop": 0.01,  # targets: every registered one (main() fills them in)
          "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}], "bench": {"runs": 200, "warmup": 20}}


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds of a block, and the load average at its end."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu
        self.load = os.getloadavg()[0]


def build(name: str, size: int, samples: int):
    from compressor.config.recipe import parse_recipe
    from compressor.core import keras
    from compressor.data.sources import Dataset
    from exporters import targets

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, MODELS[name])(weights=None, input_shape=(size, size, 3), classes=10)
    rng = np.random.default_rng(0)
    x = rng.random((2 * samples, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 10, 2 * samples)
    data = Dataset(name, x[:samples], y[:samples], x[samples:], y[samples:], x[:samples])
    return model, data, parse_recipe({**RECIPE, "targets": list(targets.NAMES)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenetv2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=200, help="train and test samples each (calibration: train)")
    parser.add_argument("--floor", action="store_true", help="also time one conversion per runtime alone")
    args = parser.parse_args()
    from compressor.graph.flops import model_macs
    from compressor.run.context import Run
    from compressor.run.pipeline import run_stages, verify_samples
    from compressor.run.progress import Reporter
    from exporters import ship

    model, data, recipe = build(args.model, args.size, args.samples)
    run = Run.build(model, data, recipe, Reporter(quiet=True))
    pruned, _ = run_stages(run)
    with tempfile.TemporaryDirectory(prefix="export-time-") as folder:
        out = Path(folder)
        with Clock() as export:
            shipped = ship.export_all(run.dense, pruned, recipe, out, run.reporter, run.task,
                                      flops=(model_macs(run.dense), model_macs(pruned)))
        x_check = data.sample("test", verify_samples(model_macs(run.dense)))[0]
        with Clock() as verify:
            rows = ship.verify_all(shipped, x_check, run.reporter)
        if args.floor:
            floor(pruned, out)
    print(f"{args.model} @{args.size}: export wall {export.wall:.1f} s, cpu {export.cpu:.1f} s; verification "
          f"({len(x_check)} samples) wall {verify.wall:.1f} s, cpu {verify.cpu:.1f} s; load {verify.load:.1f}; "
          f"all files verified: {all(r['ok'] for r in rows)}")
    for rec in shipped.int8:
        print(f"  {rec['target']}: chose {rec['chosen']}; "
              + "; ".join(f"{c['scheme']} " + (f"skipped ({c['skipped']})" if c["skipped"] else "built")
                          for c in rec["candidates"]))


def floor(model, out: Path) -> None:
    """One float conversion per runtime, nothing else: what the export step cannot go below per file."""
    from exporters import onnx_export, tflite_export

    onnx_export._CONVERTED.clear()  # cold: not the ONNX graph the export converted
    with Clock() as tfl:
        tflite_export.export_float(model, out / "floor.tflite", sparse=False)
    with Clock() as onnx:
        onnx_export.export_float(model, out / "floor.onnx")
    print(f"floor: one LiteRT float conversion wall {tfl.wall:.1f} s, cpu {tfl.cpu:.1f} s; one tf2onnx conversion "
          f"wall {onnx.wall:.1f} s, cpu {onnx.cpu:.1f} s; load {onnx.load:.1f}")


if __name__ == "__main__":
    main()
