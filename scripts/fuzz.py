"""Fuzz the command line with damaged files: every answer must be one `error:` line or a correct result.

Builds a tiny valid model (.keras, .h5, .tflite dense and sparse, .onnx plain and compact), a small
.npz and a small recipe, then writes `--files` mutated copies (truncation, byte flips, overwritten
ranges, and wrong types swapped into .keras/.h5 configs, .npz arrays and recipe fields) and runs
`compressor inspect`, `bench` and `run` on each in a subprocess with a time limit.

A case passes when the process exits 0 with output (or a report for `run`), or exits 1 with
exactly one `error:` line on stderr and no traceback. A signal death (crash), a timeout (hang) or
a traceback fails the fuzz. Seeded: the same --seed gives the same files and the same cases.

Hostile kinds (`--hostile` files, default a tenth of --files, spread over them) are built to
attack rather than damaged at random, and each also asserts what the tool promises about it:

- links: `.OUT.checkpoint`, `.OUT.lock`, `.OUT.partial-*`, `.OUT.old-*` planted as symlinks to the
  user's folder or file: refused, the link and its target untouched.
- savedmodel: a SavedModel whose tracked resource `tf.print`s to a file while it loads: refused,
  no file written (or appended to).
- h5-external: an .h5 whose kernel is HDF5 external storage (or a virtual dataset) reading another
  file: refused, its bytes in no artifact.
- mount, full-disk: `--out` is a tmpfs mount point / lies on a full tmpfs (in a private mount
  namespace, `unshare -rm`; skipped, and said so, where that is not allowed): the result lands in
  the mount point, or one line naming the cause; nothing left behind.
- symlink-out: `--out` is a symlink to a folder (empty, or a previous result with --force): the
  result lands where the link points, the link stays, nothing beside it.
- bomb: a .keras zip bomb (1 GiB of config), a config nested 100,000 deep (.keras, .h5), a recipe of
  YAML aliases: refused in seconds, in a line under 300 characters, no temp files left.
- onnx-loop: a Loop that runs 2**62 times (constant, or computed at run time): refused, or stopped
  by bench's time limit.
- odd-npz: 0-d arrays, strings, uint64 labels near 2**64, float labels of 1e30: refused.

For every hostile case the folder the case runs in must be byte-identical afterwards except the
output folder of a successful run, the error line must not be the catch-all "unexpected ...", and
a run that should be refused must not succeed.

    python scripts/fuzz.py --files 300 --seed 0 --jobs 2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("keras", "h5", "tflite", "onnx", "npz", "recipe")
HOSTILE = ("links", "savedmodel", "h5-external", "mount", "full-disk", "symlink-out", "bomb", "onnx-loop", "odd-npz")
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
    guard: Guard | None = None  # hostile kinds: what the tool promises beyond one line
    env: dict = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # e.g. a private mount namespace
    prepare: list[str] | None = None  # a command run first (a previous result)
    how: str = ""


@dataclass
class Outcome:
    case: Case
    verdict: str  # pass | crash | hang | traceback | bad-exit
    detail: str


# --------------------------------------------------------------------------- seed files


def build_seeds(folder: Path) -> dict[str, list[Path]]:
    """A small trained MLP in every format the tool reads, plus data and a recipe (kept in a --workdir
    from an earlier fuzz: reused)."""
    sys.path.insert(0, str(ROOT))
    seeds = {"keras": [folder / "seed.keras"], "h5": [folder / "seed.h5"], "npz": [folder / "seed.npz"],
             "tflite": [folder / "seed.tflite", folder / "seed-sparse.tflite"], "recipe": [folder / "seed.yaml"],
             "onnx": [folder / "seed.onnx", folder / "seed-compact.onnx"]}
    if all(p.exists() for paths in seeds.values() for p in paths):
        return seeds
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
    return seeds


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
        arrays[key], np.nan, dtype=np.float32), "scalar": np.float32(3),
        "3d": arrays[key].reshape(len(arrays[key]), -1, 1),
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


# --------------------------------------------------------------------------- hostile kinds


def digest(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (symlinks not followed): a link's target, a file's SHA-256."""
    entries = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                entries[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[rel] = ("dir",)
            else:
                entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return entries


@dataclass
class Guard:
    """A hostile case's promise: `folder` (where the case runs) is byte-identical afterwards except
    the names in `may_change` after a success; a case that should be refused is refused."""

    folder: Path
    must_fail: bool = True
    may_change: tuple[str, ...] = ("res",)
    report_in: Path | None = None  # a successful run's report.json must be here
    extra: Callable[[str], str | None] | None = None  # reads the stdout (markers of a namespace script)
    before: dict = field(default_factory=dict)

    def snapshot(self) -> None:
        self.before = digest(self.folder)

    def problem(self, code: int, out: str, err: str) -> str | None:
        ok = code == 0
        if ok and self.must_fail:
            return "succeeded where the input should be refused"
        after = digest(self.folder)
        changed = sorted(k for k in set(self.before) | set(after) if self.before.get(k) != after.get(k)
                         and not (ok and k.split(os.sep)[0] in self.may_change))
        if changed:
            return f"changed beside the result: {changed[:6]}"
        if ok and self.report_in is not None and not (self.report_in / "report.json").is_file():
            return f"exit 0 but no report.json in {self.report_in.name}"
        line = next((x for x in err.splitlines() if x.startswith("error:")), "")
        if not ok and line.startswith("error: unexpected"):
            return f"catch-all message: {line[:160]}"
        if len(line) > 300:
            return f"error line of {len(line):,} characters"
        return self.extra(out) if self.extra else None


def _nth(turn: int, variants: tuple):
    """The k-th file of a hostile kind takes its k-th variant, so a few files cover them all."""
    return variants[turn % len(variants)]


def _case_dir(work: Path, kind: str, index: int) -> Path:
    folder = work / "cases" / f"h{index:04d}-{kind}"
    shutil.rmtree(folder, ignore_errors=True)  # a kept --workdir from an earlier fuzz (links not followed)
    folder.mkdir(parents=True)
    return folder


def _run_argv(seeds: dict, out: Path, **inputs) -> list[str]:
    chosen = {"model": seeds["keras"][0], "data": seeds["npz"][0], "recipe": seeds["recipe"][0], **inputs}
    return ["run", "--quiet", "--out", str(out), *(a for k, v in chosen.items() for a in (f"--{k}", str(v)))]


def _victims(folder: Path) -> tuple[Path, Path]:
    """A user's folder (files and a sub-folder) and a user's file, for planted links to point at."""
    thesis = folder / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "draft.txt").write_text("three years of work\n")
    (thesis / "chapters" / "one.txt").write_text("chapter one\n")
    notes = folder / "notes.txt"
    notes.write_text("do not truncate\n")
    return thesis, notes


def hostile_links(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    thesis, notes = _victims(folder)
    pid = rng.randrange(2, 99999)
    name, target = _nth(turn, ((".res.checkpoint", thesis), (".res.lock", notes), (f".res.partial-{pid}", thesis),
                               (f".res.old-{pid}", thesis)))
    (folder / name).symlink_to(target)
    case = Case(folder / name, "links", "run", _run_argv(seeds, folder / "res"), Guard(folder))
    return [case], f"{name} -> {target.name}"


def hostile_savedmodel(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    """tf.print(output_stream="file://...") in a tracked resource's initializer runs while it loads."""
    import tensorflow as tf

    from compressor.core._tf import keras

    target = folder / _nth(turn, ("written.txt", "notes.txt"))
    if target.name == "notes.txt":
        target.write_text("appending to this is a foreign write\n")

    class Planted(tf.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

        def _initialize(self):
            tf.print("planted", output_stream="file://" + str(target))

    model = keras.Sequential([keras.layers.Dense(16, activation="relu", input_shape=(64,), name="hidden"),
                              keras.layers.Dense(10, activation="softmax", name="out")])
    model.planted = Planted()
    model.save(folder / "model_savedmodel", save_format="tf")
    case = Case(folder / "model_savedmodel", "savedmodel", "run",
                _run_argv(seeds, folder / "res", model=folder / "model_savedmodel"), Guard(folder))
    return [case], f"tf.print to {target.name} in a resource initializer"


SECRET = b"PRIVATE-KEY-0123" * 256  # 4096 bytes: the size of the seed's 64x16 float32 kernel


def hostile_h5_external(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    """The seed .h5 with its hidden kernel read from another file (external storage or a virtual dataset)."""
    import h5py

    secret = folder / "secret.bin"
    secret.write_bytes(SECRET)
    model = folder / "model.h5"
    shutil.copyfile(seeds["h5"][0], model)
    how = _nth(turn, ("external storage", "virtual dataset"))
    with h5py.File(model, "r+") as f:
        name = next(n for n, d in _datasets(f) if d.shape == (64, 16))
        del f[name]
        if how == "external storage":
            f.create_dataset(name, shape=(64, 16), dtype="<f4", external=[(str(secret), 0, len(SECRET))])
        else:
            other = folder / "other.h5"
            with h5py.File(other, "w") as g:
                g["k"] = np.frombuffer(SECRET, "<f4").reshape(64, 16)
            layout = h5py.VirtualLayout(shape=(64, 16), dtype="<f4")
            layout[:] = h5py.VirtualSource(str(other), "k", shape=(64, 16))
            f.create_virtual_dataset(name, layout)

    def leaked(out: str) -> str | None:
        for path in folder.rglob("*"):
            if path.is_file() and path not in (secret, folder / "other.h5") and SECRET[:64] in path.read_bytes():
                return f"the other file's bytes are in {path.relative_to(folder)}"
        return None

    cases = [Case(model, "h5-external", "inspect", ["inspect", str(model)], Guard(folder, extra=leaked)),
             Case(model, "h5-external", "run", _run_argv(seeds, folder / "res", model=model),
                  Guard(folder, extra=leaked))]
    return cases, how


def _datasets(f):
    found = []
    f.visititems(lambda n, obj: found.append((n, obj)) if hasattr(obj, "shape") else None)
    return found


def namespaces_allowed() -> bool:
    """Whether a private mount namespace (for tmpfs mounts nobody else sees) can be made here."""
    try:
        probe = "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=1m tmpfs /tmp"
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=20,
                              check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_MOUNTED = ('mount -t tmpfs -o size="$SIZE" tmpfs "$MNT" || exit 99; "$@"; rc=$?; echo "@@rc:$rc"; '
            'echo "@@report:$(test -f "$OUT/report.json" && echo yes || echo no)"; '
            'echo "@@left:$(ls -A "$MNT" | tr "\\n" " ")"; exit $rc')


def _markers(out: str, allowed: set[str]) -> str | None:
    report = next((x.split(":", 1)[1] for x in out.splitlines() if x.startswith("@@report:")), None)
    left = next((x.split(":", 1)[1].split() for x in out.splitlines() if x.startswith("@@left:")), None)
    if report is None or left is None:
        return "the mount namespace script did not finish (tmpfs not mounted?)"
    extra = sorted(set(left) - allowed) if report == "yes" else left
    return f"left in the tmpfs: {extra}" if extra else None


def hostile_mount(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    """--out is itself a tmpfs mount point (renaming onto it fails with EBUSY)."""
    mnt = folder / "res"
    mnt.mkdir()
    case = Case(mnt, "mount", "run", _run_argv(seeds, mnt), Guard(folder, must_fail=False, extra=_report_only),
                {"MNT": str(mnt), "OUT": str(mnt), "SIZE": "64m"}, ["unshare", "-rm", "sh", "-c", _MOUNTED, "sh"])
    return [case], "--out is a tmpfs mount point"


def _report_only(out: str) -> str | None:
    """A mount point --out: the result lands inside it (a success without report.json is wrong)."""
    report = next((x.split(":", 1)[1] for x in out.splitlines() if x.startswith("@@report:")), None)
    if report is None:
        return "the mount namespace script did not finish (tmpfs not mounted?)"
    rc = next((x for x in out.splitlines() if x.startswith("@@rc:")), "@@rc:0")
    return "exit 0 but no report.json in the mount point" if report == "no" and rc == "@@rc:0" else None


def hostile_full_disk(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    """--out on a tmpfs too small for the run: one line naming the file and the room, nothing left."""
    disk = folder / "disk"
    disk.mkdir()
    size = _nth(turn, ("64k", "256k", "1m"))
    case = Case(disk, "full-disk", "run", _run_argv(seeds, disk / "res"),
                Guard(folder, must_fail=False, extra=lambda out: _markers(out, {"res"})),
                {"MNT": str(disk), "OUT": str(disk / "res"), "SIZE": size},
                ["unshare", "-rm", "sh", "-c", _MOUNTED, "sh"])
    return [case], f"--out on a {size} tmpfs"


def hostile_symlink_out(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    """--out is a symlink to a folder: empty, or holding a previous result replaced with --force."""
    real, link = folder / "real", folder / "res"
    real.mkdir()
    link.symlink_to(real)
    previous = _nth(turn, (False, True))
    argv = _run_argv(seeds, link) + (["--force"] if previous else [])

    def through(out: str) -> str | None:
        if not link.is_symlink() or os.readlink(link) != str(real):
            return "the --out symlink was replaced"
        return None

    guard = Guard(folder, must_fail=False, may_change=("real",), report_in=real, extra=through)
    case = Case(link, "symlink-out", "run", argv, guard, prepare=_run_argv(seeds, real) if previous else None)
    return [case], "--out symlink to a previous result, --force" if previous else "--out symlink to an empty folder"


def hostile_bomb(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    """Expansion bombs: a .keras whose config.json inflates to 512 MiB, a config nested 100,000
    deep (.keras and .h5), a recipe of YAML aliases nine wide and six deep."""
    how = _nth(turn, ("zip", "nest-keras", "nest-h5", "yaml"))
    env = {"TMPDIR": str(folder / "tmp")}
    (folder / "tmp").mkdir()
    nested = "[" * 100_000 + "]" * 100_000
    if how == "zip":
        path = _zip_bomb(seeds["keras"][0], folder / "bomb.keras")
    elif how == "nest-keras":
        path = folder / "nested.keras"
        with zipfile.ZipFile(seeds["keras"][0]) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                data = src.read(info.filename)
                dst.writestr(info, data.replace(b'"layers": [', b'"layers": [' + nested.encode() + b", ", 1)
                             if info.filename == "config.json" else data)
    elif how == "nest-h5":
        import h5py

        path = folder / "nested.h5"
        shutil.copyfile(seeds["h5"][0], path)
        with h5py.File(path, "r+") as f:
            f.attrs["model_config"] = f.attrs["model_config"].replace('"layers": [', '"layers": [' + nested + ", ", 1)
    else:
        path = folder / "laughs.yaml"
        lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
        path.write_text("\n".join(lines) + "\nstages: *a6\n")
        return [Case(path, "bomb", "run", _run_argv(seeds, folder / "res", recipe=path), Guard(folder), env)], how
    return [Case(path, "bomb", "inspect", ["inspect", str(path)], Guard(folder), env),
            Case(path, "bomb", "run", _run_argv(seeds, folder / "res", model=path), Guard(folder), env)], how


def _zip_bomb(seed: Path, out: Path, mib: int = 512) -> Path:
    """The seed .keras with config.json followed by `mib` MiB of whitespace (still valid JSON): ~0.5 MB."""
    with zipfile.ZipFile(seed) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for info in src.infolist():
            if info.filename != "config.json":
                dst.writestr(info, src.read(info.filename))
                continue
            with dst.open(zipfile.ZipInfo("config.json"), "w", force_zip64=True) as member:
                member.write(src.read("config.json"))
                chunk = b" " * (1 << 20)
                for _ in range(mib):
                    member.write(chunk)
    return out


def loop_onnx(path: Path, constant: bool) -> Path:
    """An ONNX Loop adding 1 to its input 2**62 times (the count a constant, or computed by a Mul)."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Add", ["v_in", "one"], ["v_out"])], "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("v_in", T.FLOAT, [1, 64])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("v_out", T.FLOAT, [1, 64])],
        [h.make_tensor("one", T.FLOAT, [1], [1.0])])
    inits, nodes = [h.make_tensor("cond", T.BOOL, [], [True])], []
    if constant:
        inits.append(h.make_tensor("M", T.INT64, [], [2**62]))
    else:
        inits += [h.make_tensor("a", T.INT64, [], [2**31]), h.make_tensor("b", T.INT64, [], [2**31])]
        nodes.append(h.make_node("Mul", ["a", "b"], ["M"]))
    nodes.append(h.make_node("Loop", ["M", "cond", "x"], ["y"], body=body, name="forever"))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 64])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def hostile_onnx_loop(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    constant = _nth(turn, (True, False))
    path = loop_onnx(folder / "loop.onnx", constant)
    env = {"COMPRESSOR_BENCH_TIME_LIMIT": "5"}  # the computed count runs until bench's limit stops it
    bench = ["bench", "--model", str(path), "--runs", "20", "--warmup", "1", "--quiet"]
    cases = [Case(path, "onnx-loop", "bench", bench, Guard(folder), env)]
    if constant:
        cases.append(Case(path, "onnx-loop", "inspect", ["inspect", str(path)], Guard(folder)))
    return cases, "2**62 trips, constant" if constant else "2**62 trips, computed at run time"


def hostile_odd_npz(seeds, folder: Path, rng: random.Random, turn: int) -> tuple[list[Case], str]:
    """The seed .npz with one array of a dtype or rank the loader must refuse in one line."""
    arrays = dict(np.load(seeds["npz"][0]))
    n = len(arrays["y_train"])
    how = _nth(turn, ("0-d x_train", "string x_train", "string labels", "uint64 labels near 2**64",
                      "float labels 1e30"))
    if how == "0-d x_train":
        arrays["x_train"] = np.float32(3.0)
    elif how == "string x_train":
        arrays["x_train"] = np.array([["pixel"] * 64] * n)
    elif how == "string labels":
        arrays["y_train"], arrays["y_test"] = np.array(["cat"] * n), np.array(["dog"] * len(arrays["y_test"]))
    elif how == "uint64 labels near 2**64":
        arrays["y_train"] = np.full(n, 2**64 - 3, np.uint64)
        arrays["y_test"] = np.full(len(arrays["y_test"]), 2**64 - 3, np.uint64)
    else:
        arrays["y_train"], arrays["y_test"] = np.full(n, 1e30), np.full(len(arrays["y_test"]), 1e30)
    path = folder / "odd.npz"
    np.savez(path, **arrays)
    cases = [Case(path, "odd-npz", "run", _run_argv(seeds, folder / "res", data=path), Guard(folder))]
    if "labels" in how:
        cases.append(Case(path, "odd-npz", "bench", ["bench", "--model", str(seeds["tflite"][0]), "--data", str(path),
                                                     "--runs", "20", "--warmup", "1", "--quiet"], Guard(folder)))
    return cases, how


HOSTILE_MAKERS = {"links": hostile_links, "savedmodel": hostile_savedmodel, "h5-external": hostile_h5_external,
                  "mount": hostile_mount, "full-disk": hostile_full_disk, "symlink-out": hostile_symlink_out,
                  "bomb": hostile_bomb, "onnx-loop": hostile_onnx_loop, "odd-npz": hostile_odd_npz}


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
           "TF_CPP_MIN_LOG_LEVEL": "3", **case.env}
    cli = [sys.executable, "-m", "compressor.cli"]
    if case.prepare:
        first = subprocess.run([*cli, *case.prepare], capture_output=True, text=True, timeout=timeout, env=env,
                               check=False)
        if first.returncode != 0:
            return Outcome(case, "bad-exit", f"the previous result could not be made: {first.stderr[-300:]!r}")
    if case.guard is not None:
        case.guard.snapshot()
    try:
        proc = subprocess.run([*case.prefix, *cli, *case.argv], capture_output=True, text=True,
                              timeout=timeout, env=env, errors="replace", check=False)
    except subprocess.TimeoutExpired:
        return Outcome(case, "hang", f"no answer within {timeout:.0f} s")
    outcome = _verdict(case, proc)
    if outcome.verdict == "pass" and case.guard is not None:
        problem = case.guard.problem(proc.returncode, proc.stdout, proc.stderr)
        if problem:
            return Outcome(case, "broken", problem)
    return outcome


def _verdict(case: Case, proc: subprocess.CompletedProcess) -> Outcome:
    """crash, traceback, pass (one line or a result) or bad-exit, from the exit and stderr alone."""
    err = proc.stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if proc.returncode < 0:
        return Outcome(case, "crash", f"killed by signal {-proc.returncode}; stderr tail: {err[-300:]!r}")
    if "Traceback (most recent call last)" in err:
        return Outcome(case, "traceback", err[-600:])
    if proc.returncode == 0 and (proc.stdout.strip() or case.command == "run"):
        out = case.argv[case.argv.index("--out") + 1] if case.command == "run" else None
        if out is None or case.prefix or (Path(out) / "report.json").is_file():  # a namespace's tmpfs: the guard
            return Outcome(case, "pass", "ok")
    if proc.returncode == 1 and len(errors) == 1:
        return Outcome(case, "pass", errors[0][:200])
    return Outcome(case, "bad-exit", f"exit {proc.returncode}, {len(errors)} error lines; stderr tail: {err[-300:]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="mutated files to write (spread over the kinds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hostile", type=int, help="hostile files (default: a tenth of --files, or --files when "
                        "--kinds names only hostile kinds)")
    parser.add_argument("--kinds", default=",".join(KINDS + HOSTILE),
                        help=f"comma list of {', '.join(KINDS + HOSTILE)}")
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"comma list of {', '.join(COMMANDS)}")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("--workdir", help="keep the files here (default: a temp folder, removed afterwards)")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    commands = tuple(c for c in args.commands.split(",") if c)
    if set(kinds) - set(KINDS + HOSTILE) or set(commands) - set(COMMANDS) or not kinds or not commands:
        parser.error(f"--kinds from {KINDS + HOSTILE}, --commands from {COMMANDS}")
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
    for i in range(args.files if cycle else 0):
        kind = cycle[i % len(cycle)]
        path, how = make_file(kind, seeds, work, i, rng)
        described[path] = how
        cases.extend(cases_for(path, kind, seeds, commands, work))
    hostile, skipped = hostile_cases(args, kinds, commands, seeds, work)
    cases += hostile
    described.update({c.file: c.how for c in hostile})
    outcomes = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for outcome in pool.map(lambda c: judge(c, args.timeout), cases):
            outcomes.append(outcome)
            if len(outcomes) % 25 == 0:
                print(f"fuzz: {len(outcomes)}/{len(cases)} cases, {time.time() - start:.0f} s", file=sys.stderr)
    verdicts = ("pass", "crash", "hang", "traceback", "bad-exit", "broken")
    counts = {v: sum(o.verdict == v for o in outcomes) for v in verdicts}
    for o in outcomes:
        if o.verdict != "pass":
            print(f"{o.verdict.upper()}: {o.case.command} {o.case.kind} {o.case.file.name} ({described[o.case.file]}): "
                  f"{o.detail}")
    for kind in skipped:
        print(f"SKIPPED: {kind}: needs a private mount namespace (unshare -rm with tmpfs), not allowed here")
    print(f"fuzz summary: seed {args.seed}, files {len(described)} ({', '.join(kinds)}), cases {len(outcomes)}, "
          f"passes {counts['pass']}, crashes {counts['crash']}, hangs {counts['hang']}, "
          f"tracebacks {counts['traceback']}, other failures {counts['bad-exit']}, broken promises {counts['broken']}, "
          f"{time.time() - start:.0f} s")
    return 0 if counts["pass"] == len(outcomes) else 1


def hostile_cases(args, kinds, commands, seeds, work: Path) -> tuple[list[Case], list[str]]:
    """The hostile files, spread over the hostile kinds asked for (each with its own seeded rng, so the
    damaged files of the other kinds stay those of the same --seed)."""
    wanted = [k for k in HOSTILE if k in kinds]
    only = not any(k in KINDS for k in kinds)
    count = args.hostile if args.hostile is not None else (args.files if only else args.files // 10)
    skipped = []
    if {"mount", "full-disk"} & set(wanted) and count and not namespaces_allowed():
        skipped = [k for k in wanted if k in ("mount", "full-disk")]
        wanted = [k for k in wanted if k not in skipped]
    cases = []
    for i in range(count if wanted else 0):
        kind = wanted[i % len(wanted)]
        rng, turn = random.Random(f"{args.seed}-{i}"), i // len(wanted) + args.seed
        made, how = HOSTILE_MAKERS[kind](seeds, _case_dir(work, kind, i), rng, turn)
        for case in made:
            case.how = how
        cases += [c for c in made if c.command in commands]
    return cases, skipped


if __name__ == "__main__":
    sys.exit(main())
