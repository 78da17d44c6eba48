"""Every architecture family users ship, through `compressor run` with the default recipe, as a user would.

Each family is built by Keras 3 (`keras.applications(..., weights=None)` at 32x32x3 or the family's
smallest input (Xception 71, InceptionV3 75), or a Keras 3
transformer encoder reading the 28 digit rows as tokens), trained briefly on the bundled mnist5k,
saved as `.keras`, then handed to the command line in a fresh process with no recipe (the
default). The table records what a user sees: exit code, wall time, whether every file verified,
accuracy and the batch-1 speedups from report.json. Writes docs/FAMILIES.md and docs/families.json.

    python scripts/families.py                       # all families (hours on 2 cores)
    python scripts/families.py --families MobileNetV2,encoder --train 2000 --update   # merge into the page
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import provenance  # noqa: E402  (scripts/provenance.py)

CLASSES = 10
USER_MODELS = "## The models users bring"  # scripts/user_models.py's section of the page
# keras.applications' smallest inputs for the two families that refuse 32x32 (the others take it)
INPUT_SIZE = {"Xception": (71, 71, 3), "InceptionV3": (75, 75, 3)}


def _keras3_encoder(keras3, blocks: int = 2, d_model: int = 64, heads: int = 4, ffn: int = 128):
    """A Keras 3 post-norm encoder (MultiHeadAttention, LayerNormalization, GELU FFN, Dropout)."""
    L = keras3.layers
    inputs = keras3.Input((28, 28), name="rows")
    x = L.Dense(d_model, name="tokens")(inputs)
    for b in range(blocks):
        attended = L.Dropout(0.1)(L.MultiHeadAttention(heads, d_model // heads, name=f"mha{b}")(x, x))
        x = L.LayerNormalization(name=f"ln{b}a")(L.Add()([x, attended]))
        hidden = L.Dense(ffn, activation="gelu", name=f"ffn{b}_in")(x)
        x = L.LayerNormalization(name=f"ln{b}b")(L.Add()([x, L.Dense(d_model, name=f"ffn{b}_out")(hidden)]))
    outputs = L.Dense(CLASSES, activation="softmax")(L.GlobalAveragePooling1D()(x))
    return keras3.Model(inputs, outputs, name="encoder")


def builders(keras3) -> dict:
    apps = keras3.applications
    common = {"input_shape": (32, 32, 3), "weights": None, "classes": CLASSES}
    return {
        "MobileNetV2": lambda: apps.MobileNetV2(alpha=0.35, **common),
        "MobileNetV3Small": lambda: apps.MobileNetV3Small(alpha=0.75, **common),
        "MobileNetV3Large": lambda: apps.MobileNetV3Large(alpha=0.75, **common),
        "EfficientNetB0": lambda: apps.EfficientNetB0(**common),
        "EfficientNetB3": lambda: apps.EfficientNetB3(**common),
        "EfficientNetV2B0": lambda: apps.EfficientNetV2B0(**common),
        "ResNet50": lambda: apps.ResNet50(**common),
        "ResNet50V2": lambda: apps.ResNet50V2(**common),
        "DenseNet121": lambda: apps.DenseNet121(**common),
        "ConvNeXtTiny": lambda: apps.ConvNeXtTiny(**common),
        "MobileNet": lambda: apps.MobileNet(alpha=0.25, **common),
        "Xception": lambda: apps.Xception(**{**common, "input_shape": INPUT_SIZE["Xception"]}),
        "InceptionV3": lambda: apps.InceptionV3(**{**common, "input_shape": INPUT_SIZE["InceptionV3"]}),
        "NASNetMobile": lambda: apps.NASNetMobile(**common),
        "encoder": lambda: _keras3_encoder(keras3),
    }


def as_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """28x28 digits as size x size x 3: scaled up by a whole factor (71 and 75 px: twice), centred on a
    zero border, grey copied to three channels."""
    factor = max(size // 28, 1)
    images = images.repeat(factor, 1).repeat(factor, 2)
    before = (size - images.shape[1]) // 2
    after = size - images.shape[1] - before
    padded = np.pad(images, ((0, 0), (before, after), (before, after)))
    return np.repeat(padded[..., None], 3, -1)


def data_for(name: str, n_train: int) -> dict:
    """mnist5k shaped for the family: 28 rows as tokens, or padded to 32x32x3 (0..255, as the apps expect)."""
    sys.path.insert(0, str(ROOT))
    from compressor.data.sources import load_dataset

    raw = load_dataset("mnist5k")

    def shape(x):
        images = x.reshape(len(x), 28, 28)
        if name == "encoder":
            return images
        return as_rgb(images, INPUT_SIZE.get(name, (32,))[0]) * 255.0

    return {"x_train": shape(raw.x_train[:n_train]), "y_train": raw.y_train[:n_train],
            "x_test": shape(raw.x_test), "y_test": raw.y_test, "x_calib": shape(raw.x_calib)}


def train_and_save(name: str, arrays: dict, epochs: int, folder: Path) -> Path:
    """Train in Keras 3 in its own process (tf-keras and Keras 3 must not share one)."""
    import keras as keras3

    keras3.utils.set_random_seed(0)
    model = builders(keras3)[name]()
    model.compile(keras3.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(arrays["x_train"], arrays["y_train"], epochs=epochs, batch_size=32, verbose=0)
    path = folder / "model.keras"
    model.save(path)
    return path


def _summary(out: Path) -> dict:
    """What a user reads off report.json: verified files, accuracy and batch-1 / 1-thread speedups."""
    report = json.loads((out / "report.json").read_text())
    rows = {(r["variant"], r["runtime"]): r for r in report.get("results", [])
            if r.get("batch") == 1 and r.get("threads") == 1}
    speed, gzip, accuracy, macs = {}, {}, {}, None
    for runtime in ("tflite", "onnxruntime"):
        dense, pruned = rows.get(("dense", runtime)), rows.get(("pruned", runtime))
        if dense and pruned:
            speed[runtime] = dense["latency_ms"]["p50"] / pruned["latency_ms"]["p50"]
            gzip[runtime] = dense["gzip_bytes"] / max(pruned["gzip_bytes"], 1)
            accuracy = {"dense": dense.get("accuracy"), "pruned": pruned.get("accuracy")}
            macs = dense.get("flops", 0) / max(pruned.get("flops", 0), 1)
    stages = [s["metric_after"] for s in report.get("stages", []) if s.get("metric_after") is not None]
    return {"verified": all(v["ok"] for v in report.get("verification", [])), "speedup": speed, "gzip": gzip,
            "accuracy_dense": accuracy.get("dense"), "accuracy_pruned": accuracy.get("pruned"),
            "accuracy_stages_best": max(stages) if stages else None,  # on the budget split; see baseline_notes
            "mac_ratio": macs if speed else None, "notes": report.get("baseline_notes", [])}


def run_family(name: str, args, work: Path) -> dict:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    arrays = data_for(name, args.train)
    np.savez(folder / "data.npz", **{k: v.astype(np.float32) if k.startswith("x") else v for k, v in arrays.items()})
    started = time.time()
    trained = subprocess.run([sys.executable, __file__, "--train-only", name, "--epochs", str(args.epochs),
                              "--train", str(args.train), "--work", str(work)], capture_output=True, text=True)
    if trained.returncode:
        return {"family": name, "exit": trained.returncode, "error": trained.stderr.strip().splitlines()[-1:]}
    command = [sys.executable, "-m", "compressor.cli", "run", "--model", str(folder / "model.keras"),
               "--data", str(folder / "data.npz"), "--out", str(folder / "out"), "--force", "--quiet"]
    if args.recipe:
        command += ["--recipe", args.recipe]
    begun = time.time()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    last_line = done.stderr.strip().splitlines()[-1:] if done.returncode else []
    row = {"family": name, "exit": done.returncode, "train_s": round(begun - started), "measured": _stamp(args),
           "run_s": round(time.time() - begun), "error": [line.replace(str(work), "<work>") for line in last_line]}
    if (folder / "out" / "report.json").exists():
        row.update(_summary(folder / "out"))
    return row


def _stamp(args) -> str:
    """Which code ran on which training budget, and when: rows of several sweeps share one page."""
    return (f"{provenance.commit() or 'unknown'}, {time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"--train {args.train} --epochs {args.epochs}{' --recipe ' + args.recipe if args.recipe else ''}")


def merged(previous: list[dict], rows: list[dict], order: list[str]) -> list[dict]:
    """The page's rows after this sweep: a family run now replaces its earlier row, others stay."""
    by_family = {r["family"]: r for r in previous}
    by_family.update({r["family"]: r for r in rows})
    return provenance.in_order(list(by_family.values()), "family", order)


def render(rows: list[dict]) -> str:
    lines = ["# Every family through `compressor run`", "",
             "Generated by `python scripts/families.py` (each row's `measured` column names the commit, date and "
             "training budget; `--update` merges a new sweep into this page). The default recipe unless named, "
             "Keras 3 models at 32x32x3 (Xception 71x71x3, InceptionV3 75x75x3, their smallest; "
             "encoder: 28 rows as tokens), trained briefly on mnist5k; batch 1, 1 "
             "thread, the pipeline's own benchmark (report.json). Dense models trained this briefly can sit near "
             "chance: a speedup is then real but says nothing about what the model would keep at full accuracy. "
             "The best stage's accuracy (on the budget split) is in brackets: where it is far above the dense "
             "model's, the dense model was undertrained and the budget, counted from it, let the search trade that "
             "gain for speed (the run's report says so). "
             "MobileNetV2, EfficientNetB0 and the encoder, trained longer and timed beside the tfmot peer, are in "
             "docs/BENCHMARKS.md.",
             "", "| family | exit | verified | accuracy dense -> pruned | LiteRT | onnxruntime | "
             "gzip smaller (LiteRT / onnxruntime) | MACs | run time | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = r.get("speedup", {})
        acc = (f"{r['accuracy_dense']:.3f} -> {r['accuracy_pruned']:.3f}"
               if r.get("accuracy_pruned") is not None else "–")
        if r.get("accuracy_stages_best") is not None and r.get("accuracy_pruned") is not None:
            acc += f" (best stage {r['accuracy_stages_best']:.3f})"
        fmt = lambda v: f"{v:.2f}x" if isinstance(v, (int, float)) else "–"  # noqa: E731
        lines.append(f"| {r['family']} | {r['exit']}{' ' + ' '.join(r['error']) if r.get('error') else ''} | "
                     f"{r.get('verified', '–')} | {acc} | {fmt(speed.get('tflite'))} | "
                     f"{fmt(speed.get('onnxruntime'))} | "
                     f"{fmt(r.get('gzip', {}).get('tflite'))} / {fmt(r.get('gzip', {}).get('onnxruntime'))} | "
                     f"{fmt(r.get('mac_ratio'))} | {r.get('run_s', '–')} s | {r.get('measured', '–')} |")
    return "\n".join(lines) + "\n"


def keeping_user_models(path: Path, text: str) -> str:
    """The new page with scripts/user_models.py's section (which ends the page) kept as it was."""
    old = path.read_text() if path.exists() else ""
    return text + ("\n" + USER_MODELS + old.split(USER_MODELS, 1)[1] if USER_MODELS in old else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated subset (default: all)")
    parser.add_argument("--train", type=int, default=5000, help="training samples (default: all of mnist5k's)")
    parser.add_argument("--epochs", type=int, default=3, help="dense training epochs before compression")
    parser.add_argument("--recipe", help="a recipe file (default: the built-in default recipe)")
    parser.add_argument("--work", default="artifacts/families", help="where models and outputs are kept")
    parser.add_argument("--out", default="docs", help="folder for FAMILIES.md and families.json")
    parser.add_argument("--update", action="store_true", help="merge into the existing families.json (a family "
                        "run now replaces its row; the others stay)")
    parser.add_argument("--train-only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    if args.train_only:
        arrays = dict(np.load(work / args.train_only / "data.npz"))
        train_and_save(args.train_only, arrays, args.epochs, work / args.train_only)
        return 0
    import keras as keras3

    names = args.families.split(",") if args.families else list(builders(keras3))
    rows, out = [], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = []
    if args.update and (out / "families.json").exists():
        previous = json.loads((out / "families.json").read_text())
    for name in names:  # the page is rewritten after every family: a sweep of hours keeps what it finished
        rows.append(run_family(name, args, work))
        print(json.dumps(rows[-1]), flush=True)
        page = merged(previous, rows, list(builders(keras3)))
        (out / "families.json").write_text(json.dumps(page, indent=1))
        (out / "FAMILIES.md").write_text(keeping_user_models(out / "FAMILIES.md", render(page)))
    return 0 if all(r["exit"] == 0 and r.get("verified") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
