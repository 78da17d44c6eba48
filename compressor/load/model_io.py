"""Load user models (tf-keras or Keras 3), list what pruning cannot touch, save atomically.

Every model the pipeline prunes comes through `load_model`, which always returns a tf-keras
model (tensorflow-model-optimization needs Keras 2). The input path is only ever read.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from compressor.core._tf import keras
from compressor.core.errors import CompressorError

# Importing keras3_layers registers the tf-keras classes/activations that Keras 3 imports are rebuilt
# with, so that files saved after an import (pruned.keras) load again; tf-keras only.
from compressor.layers import (
    handler_for,
    keras3_layers,  # noqa: F401
    supported_class_names,
)
from compressor.load.bounds import (
    MAX_CONFIG_BYTES,
    check_archive,
    check_folder,
    check_h5,
    clip,
    parse_config,
    read_member,
    too_big,
)
from compressor.load.flatten import flatten_nested
from compressor.load.safety import STRICT, LoadPolicy, check_config, check_savedmodel

FORMAT_TFK_KERAS = "tf-keras .keras"
FORMAT_TFK_H5 = "tf-keras .h5"
FORMAT_SAVEDMODEL = "SavedModel"
FORMAT_K3_KERAS = "Keras 3 .keras (imported)"
FORMAT_K3_H5 = "Keras 3 .h5 (imported)"

_H5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_H5_SUFFIXES = {".h5", ".hdf5"}
#: Keras stores model.weights.h5 uncompressed; a deflated one is checked in memory up to this size.
_MAX_COMPRESSED_WEIGHTS = 512 << 20

#: Layer classes the pruning stages prune, or prune around (the layer table, compressor/layers).
#: Anything else (recurrent layers, Lambda, custom classes, ...) stays unpruned.
PRUNING_SUPPORTED = supported_class_names() | {"InputLayer"}


@dataclass
class LoadedModel:
    """A tf-keras model ready for tfmot, plus where it came from and what the user should know."""

    model: "keras.Model"
    source: str
    format: str
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- loading


def load_model(path: str | Path, policy: LoadPolicy = STRICT) -> LoadedModel:
    """Load a tf-keras or Keras 3 model (.keras, .h5, SavedModel dir) as a tf-keras model.

    The stored config is checked (compressor.load.safety) before anything is deserialised, so a file
    never runs code unless `policy` trusts it. Keras 3 files are rebuilt in tf-keras and verified
    against Keras 3 on random inputs. Every user-facing failure is a one-line CompressorError.
    """
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise CompressorError(f"model '{clip(source)}' not found; check the path passed to --model")
    if p.is_dir():
        model, fmt, notes = _load_savedmodel(p, source, policy)
    else:
        suffix = p.suffix.lower()
        if suffix == ".keras":
            model, fmt, notes = _load_keras_zip(p, source, policy)
        elif suffix in _H5_SUFFIXES:
            model, fmt, notes = _load_h5(p, source, policy)
        else:
            raise CompressorError(
                f"cannot read model '{clip(source)}': unknown extension '{p.suffix or '(none)'}'; "
                "pass a .keras or .h5 file or a SavedModel directory"
            )
    _check_is_model(model, source)
    model, flat_notes = flatten_nested(model)  # so the stages see the layers of nested models
    warnings = list(notes) + flat_notes + unsupported_notes(model)
    return LoadedModel(model=model, source=source, format=fmt, warnings=warnings)


def _check_is_model(model, source: str) -> None:
    if not isinstance(model, keras.Model):
        raise CompressorError(
            f"'{clip(source)}' does not hold a Keras model ({type(model).__name__}); "
            "save a Keras model with model.save()"
        )
    real = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not real:
        raise CompressorError(
            f"model '{clip(source)}' has no layers; save a trained model with at least one layer"
        )


def _load_keras_zip(p: Path, source: str, policy: LoadPolicy):
    if not zipfile.is_zipfile(p):
        raise CompressorError(
            f"cannot read model '{clip(source)}': file is not a Keras zip archive (corrupt or truncated?); "
            f"re-save it with model.save('{p.name}')"
        )
    try:
        with zipfile.ZipFile(p) as zf:
            check_archive(zf, source, p.stat().st_size)  # before anything is decompressed
            names = set(zf.namelist())
            bad = zf.testzip()
            meta = parse_config(read_member(zf, "metadata.json", source), source) if "metadata.json" in names else {}
            config = parse_config(read_member(zf, "config.json", source), source) if "config.json" in names else None
            if bad is None and "model.weights.h5" in names:
                _check_h5_member(zf, "model.weights.h5", source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, RecursionError) as exc:
        raise CompressorError(
            f"cannot read model '{clip(source)}': damaged Keras zip archive ({_one_line(exc)}); "
            f"re-save it with model.save('{p.name}')"
        ) from None
    if bad is not None:
        raise CompressorError(
            f"cannot read model '{clip(source)}': archive member '{bad}' is corrupt (truncated?); "
            f"re-save it with model.save('{p.name}')"
        )
    if "config.json" not in names:
        raise CompressorError(
            f"cannot read model '{clip(source)}': zip archive has no config.json, so it is not a Keras "
            f"model file; re-save it with model.save('{p.name}')"
        )
    version = str(meta.get("keras_version", "")) if isinstance(meta, dict) else ""
    _config_object(config, source, version)
    if version.startswith("3"):
        return _import_keras3(source, "Keras 3 .keras", FORMAT_K3_KERAS, config)
    check_config(config, source, policy, keras3=not version)  # no version: it may still be a Keras 3 file
    if version:
        return _load_tf_keras(source, policy), FORMAT_TFK_KERAS, []
    # No version recorded: try tf-keras first, then Keras 3.
    try:
        return _load_tf_keras(source, policy), FORMAT_TFK_KERAS, []
    except CompressorError:
        return _import_keras3(source, "Keras 3 .keras", FORMAT_K3_KERAS, config)


def _load_h5(p: Path, source: str, policy: LoadPolicy):
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head != _H5_SIGNATURE:
        raise CompressorError(
            f"cannot read model '{clip(source)}': file is not an HDF5 file (corrupt or truncated?); "
            f"re-save it with model.save('{p.name}')"
        )
    import h5py  # noqa: PLC0415 - ships with tf-keras; only needed here

    try:
        with h5py.File(p, "r") as f:
            check_h5(f, source)  # nothing read from outside the file, before Keras reads a weight
            attrs = f.attrs
            has_config = "model_config" in attrs
            size = attrs.get_id("model_config").get_storage_size() if has_config else 0
            if size > MAX_CONFIG_BYTES:  # refused before it is read
                raise CompressorError(too_big(source, "its stored model config is", size))
            version = attrs.get("keras_version", b"")
            raw_config = attrs.get("model_config") if has_config else None
    except OSError as exc:
        raise CompressorError(
            f"cannot read model '{clip(source)}': damaged HDF5 file ({_one_line(exc)}); "
            f"re-save it with model.save('{p.name}')"
        ) from None
    if isinstance(version, bytes):
        version = version.decode("utf-8", "replace")
    if not has_config:
        raise CompressorError(
            f"'{clip(source)}' has no Keras model config (a weights-only file?); save the whole model with "
            "model.save('model.keras'), not save_weights()"
        )
    if not isinstance(raw_config, (bytes, str)):
        raise CompressorError(
            f"cannot read model '{clip(source)}': its stored model config is not valid JSON (corrupt file?); "
            f"re-save it with model.save('{p.name}')"
        )
    config = parse_config(raw_config, source)
    _config_object(config, source, version)
    if str(version).startswith("3"):
        return _import_keras3(source, "Keras 3 .h5", FORMAT_K3_H5, config)
    check_config(config, source, policy)
    return _load_tf_keras(source, policy), FORMAT_TFK_H5, []


def _check_h5_member(zf: zipfile.ZipFile, name: str, source: str) -> None:
    """The weights file inside a .keras archive, as tf-keras and Keras 3 open it (in place, by h5py)."""
    import io

    import h5py  # noqa: PLC0415

    info = zf.getinfo(name)
    if info.compress_type == zipfile.ZIP_STORED:
        with zf.open(name) as fh, h5py.File(fh, "r") as f:
            check_h5(f, source)
        return
    # A compressed member seeks by decompressing again from its start: read it once instead.
    if info.file_size > _MAX_COMPRESSED_WEIGHTS:
        raise CompressorError(f"cannot read model '{clip(source)}': its compressed {name} expands to "
                              f"{info.file_size:,} bytes (at most {_MAX_COMPRESSED_WEIGHTS:,} compressed); re-save it "
                              "with model.save(), which stores it uncompressed")
    with h5py.File(io.BytesIO(zf.read(name)), "r") as f:
        check_h5(f, source)


def _config_object(config, source: str, version: str) -> None:
    """A config that is not a JSON object cannot be checked, so it is never loaded (old tf-keras
    Sequential configs hold a plain list of layers; Keras 3 always writes an object)."""
    inner = (dict,) if str(version).startswith("3") else (dict, list)
    if not isinstance(config, dict) or not isinstance(config.get("config", {}), inner):
        raise CompressorError(
            f"cannot read model '{clip(source)}': its stored model config is not a Keras model config "
            "(corrupt file?); re-save it with model.save()"
        )


def _load_savedmodel(p: Path, source: str, policy: LoadPolicy):
    if not ((p / "saved_model.pb").exists() or (p / "saved_model.pbtxt").exists()):
        raise CompressorError(
            f"'{clip(source)}' is a directory but not a SavedModel (no saved_model.pb); pass a .keras "
            "or .h5 file or a SavedModel directory saved by tf-keras"
        )
    no_meta = CompressorError(
        f"SavedModel '{clip(source)}' has no Keras metadata (saved by tf.saved_model.save or Keras 3 "
        "export?); re-save the Keras model with model.save('model.keras')"
    )
    if not (p / "keras_metadata.pb").is_file():
        raise no_meta
    check_folder(p, source)
    check_savedmodel(p, source, policy)
    model = _load_tf_keras(source, policy)
    if not isinstance(model, keras.Model):
        raise no_meta
    return model, FORMAT_SAVEDMODEL, []


def _load_tf_keras(source: str, policy: LoadPolicy):
    try:
        return keras.models.load_model(source, compile=False, safe_mode=not policy.trust_code,
                                       custom_objects=dict(policy.custom_objects) or None)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one user-facing line
        raise _tf_keras_error(source, exc) from None


def _tf_keras_error(source: str, exc: Exception) -> CompressorError:
    msg = _one_line(exc)
    m = re.search(
        r"(?:Unknown (?:layer|object|class|activation|initializer|regularizer|constraint|loss|metric)"
        r"|Cannot deserialize object of type|Could not locate class|Could not deserialize class)"
        r":?\s*[`']?([\w.>]+)[`']?",
        msg,
    )
    if m:
        return CompressorError(
            f"cannot read model '{clip(source)}': custom class '{clip(m.group(1), 40)}' cannot be deserialized; "
            "pass a tf-keras model of built-in layers, or register the class "
            "(@keras.saving.register_keras_serializable) before loading"
        )
    if "Lambda" in msg and "safe_mode" in msg:
        return CompressorError(
            f"cannot read model '{clip(source)}': it contains a Lambda layer (arbitrary Python code, "
            "refused for safety); replace the Lambda with built-in layers and re-save"
        )
    if "Unknown activation function: 'function'" in str(exc):
        return CompressorError(
            f"cannot read model '{clip(source)}': it uses a registered activation function (e.g. hard_silu of "
            "an imported Keras 3 model), which tf-keras cannot read back from .h5; save the model as .keras"
        )
    if isinstance(exc, (zipfile.BadZipFile, EOFError)) or "truncated" in msg.lower() or "CRC" in msg:
        return CompressorError(
            f"cannot read model '{clip(source)}': file is damaged ({msg}) (corrupt or truncated?); "
            "re-save it with model.save()"
        )
    return CompressorError(f"cannot read model '{clip(source)}' with tf-keras: {msg}; re-save it with model.save()")


def _import_keras3(source: str, kind: str, fmt: str, config: dict | None = None):
    from compressor.load.keras3_import import load_keras3  # noqa: PLC0415 - pulls in Keras 3 lazily

    model, notes, _ = load_keras3(source, kind, config)
    return model, fmt, notes


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return clip(text.splitlines()[0], 160)


# --------------------------------------------------------------------------- inspection


def unsupported_layers(model) -> list[str]:
    """Layers the pruning stages cannot handle, as "'name' (Class)"; they are left unpruned.

    Nested models are searched too (reported as 'outer/inner').
    """
    return [f"'{name}' ({cls})" for name, cls in _unsupported(model)]


def unsupported_notes(model, shown: int = 4) -> list[str]:
    """The same as user notes, one line per class: a model can hold dozens of one kind."""
    by_class: dict[str, list[str]] = {}
    for name, cls in _unsupported(model):
        by_class.setdefault(cls, []).append(name)
    notes = []
    for cls, names in by_class.items():
        if len(names) == 1:
            notes.append(f"layer '{names[0]}' ({cls}) is not supported by the pruning stages and is left unpruned")
            continue
        listed = ", ".join(f"'{n}'" for n in names[:shown]) + (", ..." if len(names) > shown else "")
        notes.append(f"{len(names)} {cls} layers ({listed}) are not supported by the pruning stages and are "
                     "left unpruned")
    return notes


def _unsupported(model) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def walk(m, prefix: str) -> None:
        for layer in m.layers:
            cls = type(layer).__name__
            if isinstance(layer, keras.Model):
                walk(layer, f"{prefix}{layer.name}/")
            elif not isinstance(layer, keras.layers.InputLayer) and cls not in _supported(layer):
                found.append((f"{prefix}{layer.name}", cls))

    walk(model, "")
    return found


def _supported(layer) -> frozenset[str]:
    """The layer's class name if the layer table handles its exact type in this configuration and
    prunes around it (a user subclass named 'Dense' is still custom), else nothing."""
    handler = handler_for(layer)
    if handler is None or handler.left_whole or handler.check(layer) is not None:
        return frozenset()
    return frozenset({type(layer).__name__})


# --------------------------------------------------------------------------- saving


def save_model_atomic(model, path: str | Path) -> None:
    """Save so that the final name only ever points at a complete model.

    Writes to a hidden temp name in the same folder (same file system, same extension so Keras
    picks the same format), then os.replace()s it into place. A path without .keras/.h5 is saved
    as a SavedModel directory and swapped in the same way.
    """
    final = Path(path)
    folder = final.parent
    folder.mkdir(parents=True, exist_ok=True)
    suffix = final.suffix.lower()
    tmp = folder / f".{final.stem}.tmp-{uuid.uuid4().hex[:8]}{final.suffix}"
    try:
        if suffix in (".keras", ".h5", ".hdf5"):
            model.save(str(tmp))
            _fsync(tmp)
            os.replace(tmp, final)
        else:
            model.save(str(tmp))
            _replace_dir(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """os.replace cannot overwrite a non-empty directory: move the old one aside first."""
    if final.is_dir():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        if final.exists():
            final.unlink()
        os.replace(tmp, final)


def _fsync(p: Path) -> None:
    with open(p, "rb") as fh:
        os.fsync(fh.fileno())


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, or of a directory tree (relative paths + contents, in sorted order).

    Used to prove an input model was not modified by a run.
    """
    p = Path(path)
    if p.is_dir():
        digest = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            digest.update(f.relative_to(p).as_posix().encode("utf-8") + b"\0")
            digest.update(_hash_file(f).encode("ascii") + b"\n")
        return digest.hexdigest()
    return _hash_file(p)


def _hash_file(p: Path) -> str:
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "LoadedModel", "load_model", "unsupported_layers", "unsupported_notes", "save_model_atomic", "file_sha256",
    "PRUNING_SUPPORTED",
]
