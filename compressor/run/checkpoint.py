"""Per-stage checkpoints of `compressor run`, so an interrupted long run continues with `--resume`.

They live beside the output folder in `.NAME.checkpoint/`: the result itself is built in a partial
folder that an interrupted run removes (compressor.run.outdir), and the checkpoint must outlive even a
SIGKILL. After each finished stage it holds the model, the stage records the report is made of, the
search's frontier models (--keep-frontier) and a manifest binding them to the recipe, the input model
and the data by hash. Models are written first and the manifest last, each to a temp name renamed
into place, so a kill at any instant leaves either the previous stage's checkpoint or the new one.
Stages seed themselves from the recipe's seed and their index (compressor.run.pipeline), so continuing
after stage k gives the same result as running straight through.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from compressor.core.errors import CompressorError
from compressor.run.outdir import hidden_path, own_folder
from exporters.files import jsonable, write_text_atomic

MANIFEST = "manifest.json"
FORMAT = 1
_WHAT = {"tool_version": "compressor's version", "recipe": "the recipe", "model": "the model file",
         "data": "the data"}
_FIX = {"tool_version": "resume with the version that started it",
        "recipe": "pass the same --recipe, --seed, --speedup, --runtime and --keep-frontier as that run",
        "model": "pass the same --model file, unchanged", "data": "pass the same --data, unchanged"}


@dataclass
class Resumed:
    """What the finished stages left: the next stage starts from `model`."""

    done: int
    model: object
    records: list[dict]
    points: dict


# What a checkpoint folder may hold: its manifest, stage models and their temp files while written.
_OURS = re.compile(r"manifest\.json|(\.manifest\.json\..+\.partial)"
                   r"|\.?stage-\d+(-point-\d+)?(\.tmp-[0-9a-f]{8})?\.keras")


def folder_for(out: str | Path) -> Path:
    """The checkpoint folder of output folder `out` (a sibling that outdir's recovery leaves alone;
    inside `out` when it is written through, compressor.run.outdir)."""
    return hidden_path(out, "checkpoint")


def checked_folder(folder: Path) -> bool:
    """True if the checkpoint folder exists; a symlink, a file, another user's folder or a folder holding
    anything but checkpoint files is refused before it is read, written or deleted."""
    if not own_folder(folder, "compressor's checkpoint folder"):
        return False
    foreign = sorted(e.name for e in os.scandir(folder) if not (_OURS.fullmatch(e.name)
                                                                 and e.is_file(follow_symlinks=False)))
    if foreign:
        raise CompressorError(f"'{folder}' holds files compressor did not write ({', '.join(foreign[:3])}); nothing "
                              "was written or deleted there: move them away, or choose another --out")
    return True


def saved_inputs(out: str | Path) -> dict:
    """The model, data and recipe an interrupted run on `out` was started with (`--resume OUT` alone)."""
    body = Checkpoint(out, {}, load_keras=None).manifest()
    if body is None:
        raise CompressorError(f"nothing to resume in '{out}': no checkpoint of an interrupted run (it finished, or "
                              "was stopped before its first stage ended); run without --resume")
    inputs = body.get("inputs")
    if not isinstance(inputs, dict) or not all(isinstance(inputs.get(k), t) for k, t in
                                               (("model", str), ("data", str), ("recipe", dict))):
        raise CompressorError(f"the checkpoint of '{out}' does not name its inputs (an older version wrote it); "
                              "pass the interrupted run's --model, --data and --recipe with --resume")
    return inputs


def recipe_digest(recipe) -> str:
    return _sha(recipe.model_dump_json().encode())


def data_digest(spec, dataset) -> str:
    """A file by content, a folder by its listing; anything else (built-in name, pkg.mod:func) by the
    arrays it gave."""
    from compressor.load.model_io import file_sha256

    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        return folder_listing_digest(Path(spec))
    if isinstance(spec, (str, Path)) and Path(spec).exists():
        return file_sha256(spec)
    digest = hashlib.sha256(str(spec).encode() + b"\0")
    for f in fields(dataset) if is_dataclass(dataset) else ():
        value = getattr(dataset, f.name)
        if isinstance(value, np.ndarray):
            digest.update(f"{f.name}{value.shape}{value.dtype}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, (str, int, float)):
            digest.update(f"{f.name}={value!r}".encode())
    return digest.hexdigest()


def folder_listing_digest(folder: Path) -> str:
    """Every file's relative path, size and modification time (rsync's quick check): an image folder
    or TFRecord shards of hundreds of GB are fingerprinted without reading them on every run. An edit
    that keeps both size and mtime goes unnoticed; a changed, added or removed file does not."""
    digest = hashlib.sha256()
    for f in sorted(q for q in folder.rglob("*") if q.is_file()):
        st = f.stat()
        digest.update(f"{f.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return digest.hexdigest()


class Checkpoint:
    """`fingerprint` maps tool_version/recipe/model/data to digests; `load_keras(path)` reads a model
    back with the run's own loading policy."""

    def __init__(self, out: str | Path, fingerprint: dict[str, str], load_keras: Callable[[Path], object],
                 recipe_fields: dict | None = None, inputs: dict | None = None):
        self.out, self.folder = Path(out), folder_for(out)
        self.fingerprint, self.load_keras = dict(fingerprint), load_keras
        self.recipe_fields = recipe_fields or {}
        self.inputs = inputs or {}  # model path, data spec and recipe, so `--resume OUT` alone can continue

    # ------------------------------------------------------------------ reading

    def manifest(self) -> dict | None:
        if not checked_folder(self.folder):
            return None
        try:
            body = json.loads((self.folder / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CompressorError(f"the checkpoint in '{self.folder}' is damaged ({exc}); "
                                  "run without --resume to start over") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise CompressorError(f"the checkpoint in '{self.folder}' was written by another compressor version; "
                                  "run without --resume to start over")
        return body

    def check(self) -> dict:
        """The manifest, after proving it belongs to these inputs; one-line errors otherwise."""
        body = self.manifest()
        if body is None:
            raise CompressorError(f"nothing to resume in '{self.out}': no checkpoint of an interrupted run (it "
                                  "finished, or was stopped before its first stage ended); run without --resume")
        saved = body.get("fingerprint", {})
        for key in ("tool_version", "recipe", "model", "data"):
            if saved.get(key) != self.fingerprint.get(key):
                detail = self._recipe_changes(body) if key == "recipe" else ""
                raise CompressorError(f"cannot resume '{self.out}': {_WHAT[key]} changed since the interrupted run"
                                      f"{detail}; {_FIX[key]}, or run without --resume to start over")
        return body

    def _recipe_changes(self, body: dict) -> str:
        before = body.get("recipe_fields", {})
        changed = sorted(k for k in set(before) | set(self.recipe_fields) if before.get(k) != self.recipe_fields.get(k))
        return f" (fields: {', '.join(changed)})" if changed else ""

    def load(self) -> Resumed:
        body = self.check()
        model = self.load_keras(self.folder / body["model"])
        points = {p["label"]: self.load_keras(self.folder / p["file"]) for p in body.get("points", [])}
        return Resumed(done=int(body["done"]), model=model, records=body["records"], points=points)

    # ------------------------------------------------------------------ writing

    def save(self, done: int, model, records: list[dict], points: dict | None) -> None:
        """After stage `done` (1-based): new files first, then the manifest that names them, then
        the files no manifest names any more."""
        created = not checked_folder(self.folder)
        if created:
            os.mkdir(self.folder, 0o700)
        try:
            name, point_rows = self._write_models(done, model, points)
            body = {"format": FORMAT, "fingerprint": self.fingerprint, "recipe_fields": self.recipe_fields,
                    "inputs": self.inputs, "done": done, "model": name, "points": point_rows, "records": records}
            write_text_atomic(self.folder / MANIFEST, json.dumps(body, default=jsonable))
        except BaseException:
            if created:  # never leave an empty (or manifest-less) checkpoint folder behind
                shutil.rmtree(self.folder, ignore_errors=True)
            raise
        kept = [name, *(row["file"] for row in point_rows)]
        for entry in os.scandir(self.folder):  # checked_folder: only checkpoint files, none a link
            if entry.name not in kept and entry.name != MANIFEST and _OURS.fullmatch(entry.name):
                os.unlink(entry.path)

    def _write_models(self, done: int, model, points: dict | None) -> tuple[str, list[dict]]:
        from compressor.load.model_io import save_model_atomic

        name = f"stage-{done}.keras"
        save_model_atomic(model, self.folder / name)
        rows = []
        for i, (label, point) in enumerate((points or {}).items()):
            rows.append({"label": label, "file": f"stage-{done}-point-{i}.keras"})
            save_model_atomic(point, self.folder / rows[-1]["file"])
        return name, rows

    def discard(self) -> bool:
        """Remove the checkpoint (the run finished, or a new run replaces it); True if there was one."""
        existed = checked_folder(self.folder)
        if existed:
            shutil.rmtree(self.folder, ignore_errors=True)
        return existed


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()
