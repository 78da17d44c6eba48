"""How fast can width pruning alone make a model? Time the topology with every layer cut to k units.

    python scripts/width_floor.py --models cnn,mobilenetv2 [--widths 1,16] [--runs 3000]

For each suite model (scripts/models.py) the files of each runtime are timed interleaved at batch 1,
1 thread, exported as the benchmark exports its dense files: the model as built, the same topology
with every Conv/Dense width set to each of `--widths` (the classifier keeps its classes; depthwise layers
follow their input), and a one-operator model (the runtime's cost of a call). Weights do not change
latency, so nothing is trained. dense p50 / the fastest narrow p50 bounds what any width choice
can buy on this machine (onnxruntime may run width 16 faster than width 1: its NCHWc block); what
is left is the runtime's fixed cost per call and per operator, which only removing operators (the
depth stage) can cut.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import models as suite  # noqa: E402  (scripts/models.py)
from compressor.core._tf import keras  # noqa: E402
from compressor.stages.search.latency_model import measure_models  # noqa: E402
from exporters import targets as registry  # noqa: E402

WIDTH_KEYS = ("filters", "units")


def narrowed(model: keras.Model, width: int) -> keras.Model:
    """The same layers and wiring with every width set to `width`, except the output layer's."""
    config = model.get_config()
    last = model.layers[-1].name
    for entry in config["layers"]:
        for key in WIDTH_KEYS:
            if key in entry["config"] and entry["name"] != last:
                entry["config"][key] = width
    return keras.Model.from_config(config)


def one_op(shape: tuple[int, ...]) -> keras.Model:
    inputs = keras.layers.Input(shape)
    return keras.Model(inputs, keras.layers.Softmax()(keras.layers.Flatten()(inputs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn", help="comma-separated names from scripts/models.py")
    parser.add_argument("--widths", default="1,16", help="comma-separated widths every layer is cut to")
    parser.add_argument("--runs", type=int, default=3000, help="timed rounds per file")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    print("| model | runtime | one-op p50 us | dense p50 us | " + " | ".join(f"all widths {w} p50 us" for w in widths)
          + " | width-pruning ceiling |")
    print("|---|---|---|---|" + "---|" * len(widths) + "---|")
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        dense = suite.MODELS[name].build()
        variants = {"one-op": one_op(dense.input_shape[1:]), "dense": dense,
                    **{f"width-{w}": narrowed(dense, w) for w in widths}}
        for runtime, _ in registry.runtime_formats(registry.NAMES):
            p50 = {k: ms * 1e3 for k, ms in measure_models(variants, runtime, batch=1, runs=args.runs).items()}
            narrow = [p50[f"width-{w}"] for w in widths]
            print(f"| {name} | {runtime} | {p50['one-op']:.1f} | {p50['dense']:.1f} | "
                  + " | ".join(f"{t:.1f}" for t in narrow) + f" | {p50['dense'] / min(narrow):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
