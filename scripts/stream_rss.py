"""Peak memory of `compressor run` on streamed data: does it grow with the number of images?

Generates N 28x28 grayscale PNGs of 10 classes (a bright bar per class over noise) as an image
folder (`<work>/images_N/<class>/<i>.png`) and the same images as TFRecord shards
(`<work>/records_N/shard-XX.tfrecord`), trains and saves a small conv net on a few of them, then runs
`python -m compressor.cli run --model ... --data <folder or shards>` in a child process per form
with a short recipe and reports the child's peak RSS (getrusage of a wrapper process whose only
child is the run) and wall time. Generated data is kept and reused on the next call.

    python scripts/stream_rss.py --work /tmp/rss --sizes 5000,50000
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
SIDE, CLASSES, SHARD = 28, 10, 5000
RECIPE = {"targets": ["tflite", "onnxruntime"], "max_accuracy_drop": 0.05,
          "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
          "bench": {"runs": 200, "warmup": 10, "batch": [1]},
          "data": {"tfrecord": {"features": {"image": {"dtype": "string", "image": True},
                                             "label": {"dtype": "int64"}}}}}
# The wrapper's only child is the run, so RUSAGE_CHILDREN's ru_maxrss (KiB on Linux) is the run's peak RSS.
WRAPPER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "code = subprocess.run(sys.argv[1:]).returncode; "
           "print(json.dumps({'exit': code, 'seconds': round(time.perf_counter() - t, 1), "
           "'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}))")


def images(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images start..start+n-1 (uint8, deterministic per index): class c lights rows 2c..2c+5."""
    y = np.arange(start, start + n) % CLASSES
    x = np.random.default_rng(start).integers(0, 100, (n, SIDE, SIDE), dtype=np.uint8)
    for c in range(CLASSES):
        x[y == c, 2 * c:2 * c + 6] += 150
    return x, y


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def generate(work: Path, n: int) -> tuple[Path, Path]:
    """The image folder and TFRecord shards of n images (skipped when a finished copy exists)."""
    import tensorflow as tf

    folder, records = work / f"images_{n}", work / f"records_{n}"
    if not (work / f"done_{n}").exists():
        for c in range(CLASSES):
            (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        records.mkdir(parents=True, exist_ok=True)
        for shard, start in enumerate(range(0, n, SHARD)):
            x, y = images(start, min(SHARD, n - start))
            with tf.io.TFRecordWriter(str(records / f"shard-{shard:02d}.tfrecord")) as writer:
                for i, (img, label) in enumerate(zip(x, y)):
                    png = _png(img)
                    (folder / f"c{label}" / f"{start + i:06d}.png").write_bytes(png)
                    writer.write(tf.train.Example(features=tf.train.Features(feature={
                        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))})
                    ).SerializeToString())
        (work / f"done_{n}").write_text("ok")
    return folder, records


def model_file(work: Path) -> Path:
    """A small conv net trained on 2,000 of the images (the same model for every size)."""
    path = work / "model.keras"
    if not path.exists():
        from compressor.core._tf import keras

        keras.utils.set_random_seed(0)
        x, y = images(0, 2000)
        model = keras.Sequential([
            keras.layers.Conv2D(8, 3, activation="relu", input_shape=(SIDE, SIDE, 1)), keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"), keras.layers.Dense(CLASSES, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(x[..., None] / 255.0, y, epochs=2, verbose=0)
        model.save(path)
    return path


def measure(model: Path, data: Path, recipe: Path, out: Path) -> dict:
    """One `compressor run` in a fresh process: exit code, wall seconds, peak RSS, train/test sizes."""
    command = [sys.executable, "-m", "compressor.cli", "run", "--model", str(model), "--data", str(data),
               "--recipe", str(recipe), "--out", str(out), "--force", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True,
                          check=False)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if row["exit"] != 0:
        raise SystemExit(f"run failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {**row, "command": " ".join(command[1:]), "train": report["data"]["train"], "test": report["data"]["test"],
            "accuracy": report["baseline"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated data and the runs' output")
    parser.add_argument("--sizes", default="5000,50000", help="image counts, comma separated")
    parser.add_argument("--forms", default="folder,tfrecord", help="folder, tfrecord or both")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    model = model_file(args.work)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        folder, records = generate(args.work, n)
        print(f"{n} images ready ({time.perf_counter() - t:.0f} s)", flush=True)
        for form in args.forms.split(","):
            data = {"folder": folder, "tfrecord": records}[form]
            row = {"images": n, "form": form, **measure(model, data, recipe, args.work / f"out_{form}_{n}")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| images | form | train | test | peak RSS (MB) | wall (s) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']:,} | {r['form']} | {r['train']:,} | {r['test']:,} | {r['peak_rss_mb']:.0f} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
