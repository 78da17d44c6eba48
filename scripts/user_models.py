"""The models users bring, each through a bare `compressor run`, as a new user would give them.

Each model is built from code by Keras 3 (recurrent classifiers, a keras.applications backbone
nested in a Sequential, two inputs, two outputs, a tabular MLP with a Normalization and a 1-unit
sigmoid head, a hand-written encoder, a UNet-style denoiser, a Conv1D keyword spotter, and KerasHub
models when keras_hub is importable), trained briefly on offline data (the bundled mnist5k, or
synthetic signals, tables and token sequences) in its own process, saved as `.keras`, then handed to
`compressor run` in a fresh process: the default recipe, or a task recipe where the task is not
classification. A refusal is recorded by its one `error:` line. Writes its section of
docs/FAMILIES.md (SECTION to the end of the page; scripts/families.py keeps it) and
docs/user_models.json, rewritten after every model.

    python scripts/user_models.py                                 # every model (hours on 2 cores)
    python scripts/user_models.py --models lstm,tabular --train 1000 --epochs 2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import families  # noqa: E402  (scripts/families.py: the Keras 3 digit shapes and the stamp)
import provenance  # noqa: E402

SEQ, VOCAB = 16, 64  # token models: 16 ids below 64, 0 is padding
RECIPES = {  # the task recipes of the models that are not plain classification (README, Task)
    "two-output": {"loss": ["sparse_categorical_crossentropy", "mae"],
                   "metric": {"name": ["accuracy", "mae"], "output": "kind"}, "max_metric_drop": 0.02},
    "unet-denoiser": {"loss": "mse", "metric": "mse", "max_metric_drop": 0.002},
}


# ---- offline data ---------------------------------------------------------------------------------

def _digits(n_train: int):
    sys.path.insert(0, str(ROOT))
    from compressor.data.sources import load_dataset

    raw = load_dataset("mnist5k")
    return {"train": (raw.x_train[:n_train], raw.y_train[:n_train]), "test": (raw.x_test, raw.y_test),
            "calib": (raw.x_calib, None)}


def _split(x, y, n_train: int, n_test: int = 1000, n_calib: int = 300) -> dict:
    """One synthetic draw cut into train / test / calib."""
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:n_train + n_test], y[n_train:n_train + n_test]),
            "calib": (x[n_train + n_test:n_train + n_test + n_calib], None)}


def _tokens(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences of 8..16 ids (then 0 padding): class 1 when most real ids are below VOCAB / 2."""
    ids = rng.integers(1, VOCAB, size=(n, SEQ))
    lengths = rng.integers(8, SEQ + 1, size=n)
    ids[np.arange(SEQ)[None, :] >= lengths[:, None]] = 0
    low = ((ids > 0) & (ids < VOCAB // 2)).sum(1)
    return ids.astype("int32"), (2 * low > lengths).astype("int64")


def _signals(n: int, rng, length: int = 256, classes: int = 10):
    """Keyword-like bursts: class k is a tone of 4 + 3k cycles per window, shifted, enveloped, in noise."""
    labels = rng.integers(0, classes, size=n)
    t = np.arange(length)[None, :] / length
    centre = rng.uniform(0.3, 0.7, size=(n, 1))
    tone = np.sin(2 * np.pi * (4 + 3 * labels[:, None]) * t + rng.uniform(0, 2 * np.pi, size=(n, 1)))
    x = tone * np.exp(-((t - centre) / 0.15) ** 2) + 0.5 * rng.normal(size=(n, length))
    return x[..., None].astype("float32"), labels


def _table(n: int, rng):
    """Eight raw features on very different scales (up to a few thousand), a 0/1 label from a rule."""
    scale = np.array([1, 5, 30, 200, 1000, 0.1, 2, 50], dtype="float64")
    offset = np.array([0, 10, 100, 2000, 1500, 0, -5, 300], dtype="float64")
    z = rng.normal(size=(n, 8))
    label = (z[:, 0] + 0.5 * z[:, 1] - z[:, 2] + z[:, 3] * z[:, 4] > 0).astype("int64")
    return (z * scale + offset).astype("float32"), label


def arrays_for(name: str, n_train: int) -> dict:
    """The npz a user would write for the model: x/y per split, several inputs or outputs by suffix."""
    rng = np.random.default_rng(0)
    synthetic = {"kws-conv1d": _signals, "tabular": _table}
    if name in synthetic:
        parts = _split(*synthetic[name](n_train + 1300, rng), n_train)
    elif name in ("encoder", "hub-bert", "hub-layers"):
        parts = _split(*_tokens(n_train + 1300, rng), n_train)
    else:
        parts = _digits(n_train)
    out = {}
    for split, (x, y) in parts.items():
        inputs, labels = _shaped(name, x, y, rng)
        out.update({f"x_{split}{suffix}": v for suffix, v in inputs.items()})
        if split != "calib":
            out.update({f"y_{split}{suffix}": v for suffix, v in labels.items()})
    return out


def _shaped(name: str, x, y, rng) -> tuple[dict, dict]:
    """Digits (N, 784) in the model's input form; labels per output ('' for a single one)."""
    if name in ("lstm", "bigru"):
        return {"": x.reshape(-1, 28, 28)}, {"": y}
    if name == "nested-mobilenetv2":
        return {"": families.as_rgb(x.reshape(-1, 28, 28), 32)}, {"": y}
    if name == "two-input":  # top and bottom halves of the digit
        return {"_0": x[:, :392], "_1": x[:, 392:]}, {"": y}
    if name == "two-output":  # the class, and the ink (mean pixel x 10) as a regression target
        return {"": x}, {"_0": y, "_1": None if y is None else (10 * x.mean(1, keepdims=True)).astype("float32")}
    if name == "unet-denoiser":
        clean = x.reshape(-1, 28, 28, 1).astype("float32")
        noisy = np.clip(clean + 0.3 * rng.normal(size=clean.shape), 0, 1).astype("float32")
        return {"": noisy}, {"": clean}
    return {"": x}, {"": y}


# ---- models (Keras 3, built in the training process) ----------------------------------------------

def _recurrent(keras3, bidirectional: bool):
    L = keras3.layers
    inputs = keras3.Input((28, 28), name="rows")
    x = L.Bidirectional(L.GRU(24))(inputs) if bidirectional else L.LSTM(32)(inputs)
    x = L.Dense(64, activation="relu")(x)
    return keras3.Model(inputs, L.Dense(10, activation="softmax")(x), name="bigru" if bidirectional else "lstm")


def _two_input(keras3):
    L = keras3.layers
    top, bottom = keras3.Input((392,), name="top"), keras3.Input((392,), name="bottom")
    x = L.Concatenate()([L.Dense(64, activation="relu")(top), L.Dense(64, activation="relu")(bottom)])
    x = L.Dense(64, activation="relu")(x)
    return keras3.Model([top, bottom], L.Dense(10, activation="softmax")(x), name="two_input")


def _two_output(keras3):
    L = keras3.layers
    inputs = keras3.Input((784,), name="pixels")
    x = L.Dense(64, activation="relu")(L.Dense(128, activation="relu")(inputs))
    kind, ink = L.Dense(10, activation="softmax", name="kind")(x), L.Dense(1, name="ink")(x)
    return keras3.Model(inputs, [kind, ink], name="two_output")


def _tabular(keras3, x_train):
    L = keras3.layers
    norm = L.Normalization()
    norm.adapt(x_train)
    inputs = keras3.Input((x_train.shape[1],), name="features")
    x = L.Dense(32, activation="relu")(L.Dense(64, activation="relu")(norm(inputs)))
    return keras3.Model(inputs, L.Dense(1, activation="sigmoid")(x), name="tabular")


def _encoder(keras3, blocks: int = 2, d_model: int = 32, heads: int = 4):
    """Token + position Embedding (the position table applied to ops.arange), pre-norm blocks."""
    L, ops = keras3.layers, keras3.ops
    ids = keras3.Input((SEQ,), dtype="int32", name="token_ids")
    x = L.Embedding(VOCAB, d_model)(ids) + L.Embedding(SEQ, d_model)(ops.arange(SEQ))
    for _ in range(blocks):
        h = L.LayerNormalization()(x)
        x = L.Add()([x, L.MultiHeadAttention(heads, d_model // heads)(h, h)])
        h = L.Dense(d_model)(L.Dense(2 * d_model, activation="gelu")(L.LayerNormalization()(x)))
        x = L.Add()([x, h])
    x = L.GlobalAveragePooling1D()(L.LayerNormalization()(x))
    return keras3.Model(ids, L.Dense(2, activation="softmax")(x), name="encoder")


def _unet(keras3):
    L = keras3.layers
    inputs = keras3.Input((28, 28, 1), name="noisy")
    c1 = L.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    c2 = L.Conv2D(32, 3, padding="same", activation="relu")(L.MaxPooling2D()(c1))
    b = L.Conv2D(64, 3, padding="same", activation="relu")(L.MaxPooling2D()(c2))
    u2 = L.Concatenate()([L.Conv2DTranspose(32, 2, strides=2)(b), c2])
    u2 = L.Conv2D(32, 3, padding="same", activation="relu")(u2)
    u1 = L.Concatenate()([L.Conv2DTranspose(16, 2, strides=2)(u2), c1])
    u1 = L.Conv2D(16, 3, padding="same", activation="relu")(u1)
    return keras3.Model(inputs, L.Conv2D(1, 1, activation="sigmoid")(u1), name="unet_denoiser")


def _kws(keras3):
    L = keras3.layers
    inputs = keras3.Input((256, 1), name="signal")
    x = inputs
    for filters, kernel in ((32, 9), (64, 5), (64, 5)):
        x = L.ReLU()(L.BatchNormalization()(L.Conv1D(filters, kernel, strides=2, padding="same")(x)))
    return keras3.Model(inputs, L.Dense(10, activation="softmax")(L.GlobalAveragePooling1D()(x)), name="kws")


def _hub(keras3, bert: bool):
    import keras_hub

    L, ops = keras3.layers, keras3.ops
    ids = keras3.Input((SEQ,), dtype="int32", name="token_ids")
    if bert:
        backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=64,
                                                 intermediate_dim=128, max_sequence_length=SEQ)
        x = backbone({"token_ids": ids, "padding_mask": ops.not_equal(ids, 0),
                      "segment_ids": ops.zeros_like(ids)})["pooled_output"]
    else:  # as keras.io's text-classification example uses them
        x = keras_hub.layers.TokenAndPositionEmbedding(VOCAB, SEQ, 32)(ids)
        for _ in range(2):
            x = keras_hub.layers.TransformerEncoder(intermediate_dim=64, num_heads=2)(x)
        x = L.GlobalAveragePooling1D()(x)
    return keras3.Model(ids, L.Dense(2, activation="softmax")(x), name="hub_bert" if bert else "hub_layers")


def build(name: str, keras3, arrays: dict):
    L = keras3.layers
    if name == "nested-mobilenetv2":  # the transfer-learning pattern, as #27's done-when writes it
        return keras3.Sequential([keras3.applications.MobileNetV2(include_top=False, weights=None,
                                                                  input_shape=(32, 32, 3)),
                                  L.GlobalAveragePooling2D(), L.Dense(10, activation="softmax")])
    makers = {"lstm": lambda: _recurrent(keras3, False), "bigru": lambda: _recurrent(keras3, True),
              "two-input": lambda: _two_input(keras3), "two-output": lambda: _two_output(keras3),
              "tabular": lambda: _tabular(keras3, arrays["x_train"]), "encoder": lambda: _encoder(keras3),
              "unet-denoiser": lambda: _unet(keras3), "kws-conv1d": lambda: _kws(keras3),
              "hub-bert": lambda: _hub(keras3, True), "hub-layers": lambda: _hub(keras3, False)}
    return makers[name]()


MODELS = {  # name -> what the table calls it, and its input
    "lstm": ("LSTM classifier", "28 rows x 28"),
    "bigru": ("Bidirectional GRU classifier", "28 rows x 28"),
    "nested-mobilenetv2": ("Sequential(MobileNetV2 backbone, GAP, Dense)", "32x32x3"),
    "two-input": ("two-input MLP (digit halves, Dense branches concatenated)", "392 + 392"),
    "two-output": ("two-output MLP (class + ink regression), two-output recipe", "784"),
    "tabular": ("tabular MLP, adapted Normalization, 1-unit sigmoid", "8 raw features"),
    "encoder": ("hand-written Keras 3 encoder (token + position Embedding, pre-norm)", "16 token ids"),
    "unet-denoiser": ("UNet-style denoiser (Conv2DTranspose, skip Concatenates), MSE budget", "28x28x1"),
    "kws-conv1d": ("Conv1D keyword spotter, synthetic signals", "256 x 1"),
    "hub-bert": ("KerasHub BertBackbone (2 layers, hidden 64) + Dense head", "16 token ids"),
    "hub-layers": ("KerasHub TokenAndPositionEmbedding + TransformerEncoder x2", "16 token ids"),
}


def train_and_save(name: str, folder: Path, epochs: int) -> None:
    """Train in Keras 3 in its own process (tf-keras and Keras 3 must not share one)."""
    import keras as keras3

    arrays = dict(np.load(folder / "data.npz"))
    keras3.utils.set_random_seed(0)
    model = build(name, keras3, arrays)
    xs = [arrays[k] for k in sorted(arrays) if k.startswith("x_train")]
    ys = [arrays[k] for k in sorted(arrays) if k.startswith("y_train")]
    losses = {"two-output": ["sparse_categorical_crossentropy", "mae"], "unet-denoiser": "mse",
              "tabular": "binary_crossentropy"}
    model.compile(keras3.optimizers.Adam(1e-3), losses.get(name, "sparse_categorical_crossentropy"))
    model.fit(xs if len(xs) > 1 else xs[0], ys if len(ys) > 1 else ys[0], epochs=epochs, batch_size=32, verbose=0)
    model.save(folder / "model.keras")


# ---- the run and its table ------------------------------------------------------------------------

def _quality(report: dict) -> dict:
    """Dense and pruned quality per runtime (batch 1, 1 thread): accuracy, else the recipe's metric."""
    rows = {(r["variant"], r["runtime"]): r for r in report.get("results", [])
            if r.get("batch") == 1 and r.get("threads") == 1}
    speed, quality = {}, {}
    for runtime in ("tflite", "onnxruntime"):
        dense, pruned = rows.get(("dense", runtime)), rows.get(("pruned", runtime))
        if dense and pruned:
            speed[runtime] = dense["latency_ms"]["p50"] / pruned["latency_ms"]["p50"]
            quality[runtime] = [_value(dense), _value(pruned)]
    name = (report.get("metric") or {}).get("name", "accuracy")
    return {"speedup": speed, "quality": quality, "metric": name if isinstance(name, str) else str(name),
            "verified": all(v["ok"] for v in report.get("verification", [])) if report.get("verification") else None}


def _value(row: dict):
    return row["accuracy"] if row.get("accuracy") is not None else (row.get("metric") or {}).get("value")


def run_model(name: str, args, work: Path) -> dict:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    row = {"model": name, "measured": _stamp(args)}
    if name.startswith("hub-") and importlib.util.find_spec("keras_hub") is None:
        return {**row, "exit": None, "error": "skipped: keras_hub is not importable"}
    arrays = {k: v for k, v in arrays_for(name, args.train).items() if v is not None}
    np.savez(folder / "data.npz", **arrays)
    trained = subprocess.run([sys.executable, __file__, "--train-only", name, "--epochs", str(args.epochs),
                              "--work", str(work)], capture_output=True, text=True)
    if trained.returncode:
        return {**row, "exit": trained.returncode, "error": "training failed: " + _last(trained.stderr, work)}
    command = [sys.executable, "-m", "compressor.cli", "run", "--model", str(folder / "model.keras"),
               "--data", str(folder / "data.npz"), "--out", str(folder / "out"), "--force", "--quiet"]
    if name in RECIPES:
        (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPES[name]))
        command += ["--recipe", str(folder / "recipe.yaml")]
    begun = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
        row.update(exit=done.returncode, error=_last(done.stderr, work) if done.returncode else "")
    except subprocess.TimeoutExpired:
        row.update(exit=None, error=f"stopped after the script's --timeout of {args.timeout} s")
    row["run_s"] = round(time.time() - begun)
    if (folder / "out" / "report.json").exists():
        row.update(_quality(json.loads((folder / "out" / "report.json").read_text())))
    return row


def _last(stderr: str, work: Path) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].replace(str(work), "<work>")[:300] if lines else ""


def _stamp(args) -> str:
    return (f"{provenance.commit() or 'unknown'}, {time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"--train {args.train} --epochs {args.epochs}")


SECTION = "## The models users bring"


def render(rows: list[dict], command: str) -> str:
    lines = [SECTION, "", f"Generated by `{command}` (scripts/user_models.py; each row's `measured` column names "
             "the commit, date and training budget). Each model is built by Keras 3 from code, trained briefly on "
             "offline data (mnist5k; synthetic signals, tables and token sequences) and given to a bare `compressor "
             "run`: the default recipe, the README's two-output recipe for the two-output model, an MSE budget "
             "(`loss: mse, metric: mse, max_metric_drop: 0.002`) for the denoiser. Speedups are the pruned file's "
             "over the dense one's in the run's own benchmark (batch 1, 1 thread, report.json); quality is "
             "onnxruntime's (LiteRT's where onnxruntime has none). A refusal shows its one `error:` line.", "",
             "| model | input | exit / error | verified | LiteRT | onnxruntime | quality dense -> pruned | "
             "run time | measured |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        title, size = MODELS[r["model"]]
        fmt = lambda v: f"{v:.2f}x" if isinstance(v, (int, float)) else "–"  # noqa: E731
        pair = (r.get("quality") or {}).get("onnxruntime") or (r.get("quality") or {}).get("tflite")
        quality = (f"{r['metric']} {pair[0]:.3f} -> {pair[1]:.3f}"
                   if pair and None not in pair else "–")
        status = ("" if r["exit"] is None else f"{r['exit']}: ") + (f"`{r['error']}`" if r.get("error") else "")
        status = status.rstrip(": ")
        speed = r.get("speedup") or {}
        lines.append(f"| {title} | {size} | {status} | {r.get('verified', '–')} | {fmt(speed.get('tflite'))} | "
                     f"{fmt(speed.get('onnxruntime'))} | {quality} | {r.get('run_s', '–')} s | {r['measured']} |")
    return "\n".join(lines) + "\n"


def _write(page: Path, rows: list[dict], command: str) -> None:
    """The page with its last section (SECTION to the end) replaced by the table."""
    page.parent.mkdir(parents=True, exist_ok=True)
    head = (page.read_text() if page.exists() else "").split(SECTION)[0].rstrip("\n")
    page.write_text((head + "\n\n" if head else "") + render(rows, command))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    parser.add_argument("--train", type=int, default=2000, help="training samples per model")
    parser.add_argument("--epochs", type=int, default=3, help="dense training epochs before compression")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one `compressor run` may take")
    parser.add_argument("--work", default="artifacts/user_models", help="where models and outputs are kept")
    parser.add_argument("--page", default="docs/FAMILIES.md", help="the page whose last section is the table")
    parser.add_argument("--json", default="docs/user_models.json", help="the rows as JSON")
    parser.add_argument("--render", help="comma-separated JSON files of earlier sweeps: write the page from their "
                        "rows (in order) without running anything")
    parser.add_argument("--train-only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    if args.train_only:
        train_and_save(args.train_only, work / args.train_only, args.epochs)
        return 0
    if args.render:
        rows = [row for part in args.render.split(",") for row in json.loads(Path(part).read_text())]
        _write(Path(args.page), rows, rows[0]["command"] if rows else "python scripts/user_models.py")
        return 0
    names = args.models.split(",") if args.models else list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {','.join(MODELS)}")
    command = f"python scripts/user_models.py --train {args.train} --epochs {args.epochs}"
    rows = []
    for name in names:  # the table is rewritten after every model: a sweep of hours keeps what it finished
        rows.append({**run_model(name, args, work), "command": command})
        print(json.dumps(rows[-1]), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
        _write(Path(args.page), rows, command)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
