"""Fuzz the command line with damaged files: every answer must be one `error:` line or a correct result.

Builds a tiny valid model (.keras, .h5, .tflite dense and sparse, .onnx plain and compact), a small
.npz and a small recipe, then writes `--files` mutated copies (truncation, byte flips, overwritten
ranges, and wrong types swapped into .keras/.h5 configs, .npz arrays and recipe fields) and runs
`compressor inspect`, `bench` and `run` on each in a subprocess with a time limit.

A case passes when the process exits 0 with output (or a report for `run`), or exits 1 with
exactly one `error:` line on stderr and no traceback. A signal death (crash), a timeout (hang) or
a traceback fails the fuzz. Seeded: the same --seed gives the same files and the same cases.

    python scripts/fuzz.py --files 300 --seed 0 --jobs 2
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("keras", "h5", "tflite", "onnx", "npz", "recipe")
# The order files are made in: every kind early, then mostly the cheap ones (a .tflite/.onnx case
# takes a second or two; a `run` on a model that still loads trains, exports and benchmarks).
CYCLE = ("tflite", "onnx", "keras", "h5", "npz", "recipe", "tflite", "onnx", "tflite", "onnx", "tflite", "onnx",
         "tflite", "onnx", "tflite", "onnx", "tflite", "onnx", "tflite", "onnx")
COMMANDS = ("inspect", "bench", "run")
RECIPE = {"targets": ["tflite"], "max_accuracy_drop": 0.5, "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
          "bench": {"runs": 200, "warmup": 1, "batch": [1], "threads": [1]}}
WRONG_VALUES = (None, "", "x" * 300, -1, 0, 2**63, 1e308, float("nan"), [], [1, "a"], {}, {"class_name": 7}, True)


@dataclass
class Case:
    file: Path
    kind: str
    command: str
    argv: list[str]


@dataclass
class Outcome:
    case: Case
    verdict: str  # pass | crash | hang | traceback | bad-exit
    detail: str


# --------------------------------------------------------------------------- seed files


def build_seeds(folder: Path) -> dict[str, list[Path]]:
    """A small trained MLP in every format the tool reads, plus data and a recipe."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import yaml

    from compressor.core._tf import keras
    from compressor.data.sources import load_dataset
    from exporters import onnx_export, tflite_export

    data = load_dataset("digits")
    x, y = data.x_train[:300], data.y_train[:300]
    np.savez(folder / "seed.npz", x_train=x, y_train=y, x_test=data.x_test[:100], y_test=data.y_test[:100])
    (folder / "seed.yaml").write_text(yaml.safe_dump(RECIPE))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(16, activation="relu", input_shape=(64,), name="hidden"),
                              keras.layers.Dense(10, activation="softmax", name="out")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, verbose=0)
    model.save(folder / "seed.keras")
    model.save(folder / "seed.h5")
    tflite_export.export_float(model, folder / "seed.tflite", sparse=False)
    onnx_export.export_float(model, folder / "seed.onnx", compact=False)
    kernel, bias = model.get_layer("hidden").get_weights()
    blocks = np.abs(kernel).reshape(16, 4, 16).mean(axis=1) < np.quantile(np.abs(kernel), 0.7)
    model.get_layer("hidden").set_weights([np.where(np.repeat(blocks, 4, axis=0), 0, kernel), bias])
    tflite_export.export_float(model, folder / "seed-sparse.tflite", sparse=True)
    onnx_export.export_float(model, folder / "seed-compact.onnx", compact=True)
    return {"keras": [folder / "seed.keras"], "h5": [folder / "seed.h5"], "npz": [folder / "seed.npz"],
            "tflite": [folder / "seed.tflite", folder / "seed-sparse.tflite"], "recipe": [folder / "seed.yaml"],
            "onnx": [folder / "seed.onnx", folder / "seed-compact.onnx"]}


# --------------------------------------------------------------------------- mutations


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Truncate, flip a few bytes, or overwrite a range with random bytes."""
    how = rng.choice(("truncate", "flip", "flip", "overwrite"))
    buf = bytearray(data)
    if how == "truncate":
        cut = rng.randrange(0, len(buf))
        return bytes(buf[:cut]), f"truncate at {cut}"
    if how == "flip":
        n = rng.choice((1, 2, 4, 16))
        for _ in range(n):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        return bytes(buf), f"flip {n} bytes"
    start = rng.randrange(len(buf))
    length = rng.choice((4, 8, 64, 512))
    buf[start:start + length] = bytes(rng.randrange(256) for _ in range(min(length, len(buf) - start)))
    return bytes(buf), f"overwrite {length} bytes at {start}"



def bytes_instead(seed: Path, out: Path, rng: random.Random, chance: float) -> str | None:
    """With probability `chance`, a raw byte mutation of the whole file (the other half of every kind)."""
    if rng.random() >= chance:
        return None
    data, how = mutate_bytes(seed.read_bytes(), rng)
    out.write_bytes(data)
    return how


def swap_type(tree, rng: random.Random):
    """Replace one randomly chosen value anywhere in a JSON-like tree with a value of a wrong type."""
    slots = []

    def collect(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            slots.append((node, key))
            collect(value)

    collect(tree)
    if not slots:
        return rng.choice(WRONG_VALUES), "whole document"
    node, key = rng.choice(slots)
    node[key] = rng.choice(WRONG_VALUES)
    return tree, f"wrong type at {key!r}"


def mutate_keras(seed: Path, out: Path, rng: random.Random) -> str:
    how = bytes_instead(seed, out, rng, 0.5)
    if how:
        return how
    with zipfile.ZipFile(seed) as src, zipfile.ZipFile(out, "w") as dst:
        member = rng.choice(("config.json", "config.json", "metadata.json"))
        for info in src.infolist():
            payload = src.read(info.filename)
            if info.filename == member:
                tree, how = swap_type(json.loads(payload), rng)
                payload = json.dumps(tree).encode()
            dst.writestr(info, payload)
    return f"{member}: {how}"


def mutate_h5(seed: Path, out: Path, rng: random.Random) -> str:
    how = bytes_instead(seed, out, rng, 0.5)
    if how:
        return how
    import h5py

    shutil.copyfile(seed, out)
    with h5py.File(out, "r+") as f:
        tree, how = swap_type(json.loads(f.attrs["model_config"]), rng)
        f.attrs["model_config"] = json.dumps(tree)
    return f"model_config: {how}"


def mutate_npz(seed: Path, out: Path, rng: random.Random) -> str:
    import numpy as np

    how = bytes_instead(seed, out, rng, 0.4)
    if how:
        return how
    arrays = dict(np.load(seed))
    key = rng.choice(sorted(arrays))
    swaps = {"strings": np.array(["a"] * len(arrays[key])), "empty": arrays[key][:0], "nan": np.full_like(
        arrays[key], np.nan, dtype=np.float32), "scalar": np.float32(3), "3d": arrays[key].reshape(len(arrays[key]), -1, 1),
        "objects": np.array([None, 1], dtype=object), "negative": -np.abs(arrays[key]) - 1, "missing": None}
    how = rng.choice(sorted(swaps))
    if swaps[how] is None:
        del arrays[key]
    else:
        arrays[key] = swaps[how]
    np.savez(out, **arrays)
    return f"{key}: {how}"


def mutate_recipe(seed: Path, out: Path, rng: random.Random) -> str:
    import yaml

    how = bytes_instead(seed, out, rng, 0.3)
    if how:
        return how
    tree, how = swap_type(yaml.safe_load(seed.read_text()), rng)
    out.write_text(yaml.safe_dump(tree))
    return how


def make_file(kind: str, seeds: dict, folder: Path, index: int, rng: random.Random) -> tuple[Path, str]:
    seed = rng.choice(seeds[kind])
    out = folder / f"m{index:04d}{''.join(seed.suffixes)}"
    if kind == "keras":
        how = mutate_keras(seed, out, rng)
    elif kind == "h5":
        how = mutate_h5(seed, out, rng)
    elif kind == "npz":
        how = mutate_npz(seed, out, rng)
    elif kind == "recipe":
        how = mutate_recipe(seed, out, rng)
    else:
        data, how = mutate_bytes(seed.read_bytes(), rng)
        out.write_bytes(data)
    return out, how


# --------------------------------------------------------------------------- running


def cases_for(path: Path, kind: str, seeds: dict, commands: tuple[str, ...], work: Path) -> list[Case]:
    """inspect/bench/run wherever the file is an input of that command."""
    s = {k: str(v[0]) for k, v in seeds.items()}

    def run(**inputs):
        chosen = {"model": s["keras"], "data": s["npz"], "recipe": s["recipe"], **inputs}
        return ["run", "--quiet", "--out", str(work / f"out-{path.stem}"),
                *(arg for key, value in chosen.items() for arg in (f"--{key}", str(value)))]

    argv = {"inspect": None, "bench": None, "run": None}
    if kind in ("keras", "h5", "tflite", "onnx"):
        argv["inspect"] = ["inspect", str(path)]
        argv["bench"] = ["bench", "--model", str(path), "--runs", "20", "--warmup", "1", "--quiet"]
    if kind in ("keras", "h5"):
        argv["run"] = run(model=path)
    if kind == "npz":
        argv["bench"] = ["bench", "--model", s["tflite"], "--data", str(path), "--runs", "20", "--warmup", "1"]
        argv["run"] = run(data=path)
    if kind == "recipe":
        argv["run"] = run(recipe=path)
    return [Case(path, kind, c, argv[c]) for c in commands if argv[c]]


def judge(case: Case, timeout: float) -> Outcome:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        proc = subprocess.run([sys.executable, "-m", "compressor.cli", *case.argv], capture_output=True, text=True,
                              timeout=timeout, env=env, errors="replace")
    except subprocess.TimeoutExpired:
        return Outcome(case, "hang", f"no answer within {timeout:.0f} s")
    err = proc.stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if proc.returncode < 0:
        return Outcome(case, "crash", f"killed by signal {-proc.returncode}; stderr tail: {err[-300:]!r}")
    if "Traceback (most recent call last)" in err:
        return Outcome(case, "traceback", err[-600:])
    if proc.returncode == 0 and (proc.stdout.strip() or case.command == "run"):
        out = case.argv[case.argv.index("--out") + 1] if case.command == "run" else None
        if out is None or (Path(out) / "report.json").is_file():
            return Outcome(case, "pass", "ok")
    if proc.returncode == 1 and len(errors) == 1:
        return Outcome(case, "pass", errors[0][:200])
    return Outcome(case, "bad-exit", f"exit {proc.returncode}, {len(errors)} error lines; stderr tail: {err[-300:]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="mutated files to write (spread over the kinds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"comma list of {', '.join(COMMANDS)}")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("--workdir", help="keep the files here (default: a temp folder, removed afterwards)")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    commands = tuple(c for c in args.commands.split(",") if c)
    if set(kinds) - set(KINDS) or set(commands) - set(COMMANDS) or not kinds or not commands:
        parser.error(f"--kinds from {KINDS}, --commands from {COMMANDS}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="compressor-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        return _fuzz(args, kinds, commands, work, start)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _fuzz(args, kinds, commands, work: Path, start: float) -> int:
    seeds = build_seeds(work)
    rng = random.Random(args.seed)
    cases, described = [], {}
    cycle = [k for k in CYCLE if k in kinds]
    for i in range(args.files):
        kind = cycle[i % len(cycle)]
        path, how = make_file(kind, seeds, work, i, rng)
        described[path] = how
        cases.extend(cases_for(path, kind, seeds, commands, work))
    outcomes = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for outcome in pool.map(lambda c: judge(c, args.timeout), cases):
            outcomes.append(outcome)
            if len(outcomes) % 25 == 0:
                print(f"fuzz: {len(outcomes)}/{len(cases)} cases, {time.time() - start:.0f} s", file=sys.stderr)
    counts = {v: sum(o.verdict == v for o in outcomes) for v in ("pass", "crash", "hang", "traceback", "bad-exit")}
    for o in outcomes:
        if o.verdict != "pass":
            print(f"{o.verdict.upper()}: {o.case.command} {o.case.file.name} ({described[o.case.file]}): {o.detail}")
    print(f"fuzz summary: seed {args.seed}, files {args.files} ({', '.join(kinds)}), cases {len(outcomes)}, "
          f"passes {counts['pass']}, crashes {counts['crash']}, hangs {counts['hang']}, "
          f"tracebacks {counts['traceback']}, other failures {counts['bad-exit']}, {time.time() - start:.0f} s")
    return 0 if counts["pass"] == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
