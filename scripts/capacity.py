"""Does a task need capacity? Train a tiny CNN and keras.applications MobileNetV2 on the same data
with the same seed and epochs, and print both test accuracies (the figures in README's data section).

    python scripts/capacity.py [--data clutter128] [--epochs 5]

A task where the tiny network scores close to the big one says little about pruning a big network
("within one point" is easy when a few thousand weights suffice).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from compressor.core._tf import keras  # noqa: E402

L = keras.layers


def tiny_cnn(shape, classes: int) -> keras.Model:
    """Three small convolutions with pooling and global pooling: ~6,400 weights, enough for mnist5k."""
    inputs = L.Input(shape)
    x = L.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(16, 3, activation="relu")(x)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(32, 3, activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(classes, activation="softmax")(x), name="tiny_cnn")


def mobilenet_v2(shape, classes: int) -> keras.Model:
    return keras.applications.MobileNetV2(input_shape=shape, alpha=1.0, weights=None, classes=classes)


def main(argv=None) -> int:
    from compressor.data.sources import load_dataset
    from compressor.train.training import fit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="clutter128")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--models", default="tiny,mobilenetv2")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    ds = load_dataset(args.data)
    print(f"{args.data}: {ds.input_shape} x {len(ds.x_train)} train in {time.perf_counter() - t:.1f}s", flush=True)
    build = {"tiny": tiny_cnn, "mobilenetv2": mobilenet_v2}
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        model = build[name](ds.input_shape, ds.num_classes)
        t = time.perf_counter()
        fit(model, ds, epochs=args.epochs, batch_size=32, learning_rate=1e-3, hold_zeros=False)
        acc = float((model.predict(ds.x_test, batch_size=64, verbose=0).argmax(1) == ds.y_test).mean())
        print(json.dumps({"data": args.data, "model": name, "params": int(model.count_params()),
                          "epochs": args.epochs, "test_accuracy": round(acc, 4),
                          "train_seconds": round(time.perf_counter() - t, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
