"""Bounds on a model file's containers, checked before anything is extracted, parsed or read.

A file from elsewhere can be built to exhaust the machine or to read bytes from outside itself:
a 2 MB `.keras` zip that expands to gigabytes, a `config.json` nested a million levels deep, an
HDF5 dataset whose bytes live in another file (external raw storage, an external link, a virtual
dataset), which Keras would load into the weights and the exports would ship. Each check here
reads only the container's own metadata and ends in one `error:` line. Limits (in the README):

- the expanded size of a `.keras` archive: the model-file limit (COMPRESSOR_MAX_MODEL_BYTES,
  2 GiB), and at most MAX_RATIO times the archive's own size once it expands past RATIO_FLOOR;
- a stored model config (JSON): MAX_CONFIG_BYTES, nested at most MAX_DEPTH levels.
"""
from __future__ import annotations

import json
import re
import sys
import zipfile
from typing import Any

import numpy as np

from compressor.core.errors import CompressorError
from exporters.untrusted import max_file_bytes

#: Deeper configs are not Keras models (and would exhaust Python's recursion limit).
MAX_DEPTH = 200
#: Stored model configs larger than this are not Keras models (the largest keras.applications
#: config, EfficientNetV2L's, is under 1 MiB; a 16 MiB one parses in well under a second).
MAX_CONFIG_BYTES = 16 << 20
#: An archive may expand to at most this many times its size once it is past RATIO_FLOOR: weights
#: hardly compress (a 90%-sparse kernel deflates about 5x), a zip bomb expands a thousandfold.
MAX_RATIO = 100
RATIO_FLOOR = 64 << 20
MAX_MEMBERS = 100_000
MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)


def clip(text: str, limit: int = 60) -> str:
    """A name from a file as shown in an error line: at most `limit` characters (the middle elided)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit // 2 - 1]}…{text[-(limit // 2 - 1):]}"


def check_archive(zf: zipfile.ZipFile, source: str, archive_bytes: int) -> None:
    """Refuse a zip whose members would expand past the limits, from the sizes its directory declares
    (Python's zipfile never returns more than a member's declared size)."""
    infos = zf.infolist()
    expanded = sum(info.file_size for info in infos)
    limit = max_file_bytes()
    if len(infos) > MAX_MEMBERS:
        raise CompressorError(f"cannot read model '{clip(source)}': the archive holds {len(infos):,} members (at "
                              f"most {MAX_MEMBERS:,}); not a Keras model file (corrupt or crafted)")
    ratio = expanded / max(archive_bytes, 1)
    if expanded > limit or (expanded > RATIO_FLOOR and ratio > MAX_RATIO):
        fix = ("if you trust it, raise COMPRESSOR_MAX_MODEL_BYTES" if ratio <= MAX_RATIO else
               "weights barely compress: a zip bomb, not a Keras file; re-save it with model.save()")
        raise CompressorError(
            f"cannot read model '{clip(source)}': the archive would expand to {expanded:,} bytes, {ratio:,.0f}x its "
            f"size (limits {limit:,} and {MAX_RATIO}x); nothing extracted; {fix}")


def read_member(zf: zipfile.ZipFile, name: str, source: str) -> bytes:
    """A config member of the archive, refused before reading when it is larger than a config can be."""
    size = zf.getinfo(name).file_size
    if size > MAX_CONFIG_BYTES:
        raise CompressorError(too_big(source, f"{name} is", size))
    return zf.read(name)


def parse_config(raw: bytes | str, source: str) -> Any:
    """json.loads, after checking the text's size and bracket nesting (strings skipped) cheaply."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > MAX_CONFIG_BYTES:
        raise CompressorError(too_big(source, "its stored model config is", len(data)))
    depth = json_depth(data)
    if depth > MAX_DEPTH:
        raise CompressorError(f"cannot read model '{clip(source)}': its stored model config is nested {depth:,} "
                              f"levels deep (at most {MAX_DEPTH}); not a Keras model (corrupt or crafted file)")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise CompressorError(f"cannot read model '{clip(source)}': its stored model config is not valid JSON "
                              "(corrupt file?); re-save it with model.save()") from None


def json_depth(data: bytes) -> int:
    """The deepest bracket nesting of a JSON text, outside its strings (vectorised: no parsing)."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def too_big(source: str, what: str, size: int) -> str:
    """The one line for a config larger than MAX_CONFIG_BYTES."""
    return (f"cannot read model '{clip(source)}': {what} {size:,} bytes (at most {MAX_CONFIG_BYTES:,}); not a "
            "Keras model (corrupt or crafted file)")


def check_folder(folder, source: str) -> None:
    """A SavedModel directory whose files are links to elsewhere would read bytes from outside it."""
    from pathlib import Path

    root = Path(folder).resolve()
    for path in Path(folder).rglob("*"):
        if path.is_symlink() and root not in Path(path).resolve().parents:
            raise CompressorError(f"cannot read model '{clip(source)}': '{clip(path.relative_to(folder), 40)}' is a "
                                  "link to a file outside the SavedModel folder; refused: copy the real files in")


# --------------------------------------------------------------------------- HDF5

#: HDF5 filters built into the library (deflate, shuffle, fletcher32, szip, nbit, scale-offset) and
#: h5py's LZF; any other id makes HDF5 search its plugin folder for code to load.
KNOWN_H5_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})
MAX_H5_OBJECTS = 1_000_000


def check_h5(h5file, source: str) -> None:
    """Refuse an HDF5 file that reads bytes from outside itself: datasets with external raw storage,
    virtual datasets, external links (soft links are not followed here), or unknown filters."""
    import h5py  # noqa: PLC0415 - ships with tf-keras; only needed for .h5 files

    todo, seen = [(h5file, "", 0)], 0
    while todo:
        group, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise CompressorError(_h5_error(source, path, f"is nested more than {MAX_DEPTH} groups deep"))
        for name in group:
            seen += 1
            if seen > MAX_H5_OBJECTS:
                raise CompressorError(_h5_error(source, path, f"holds more than {MAX_H5_OBJECTS:,} objects"))
            where = f"{path}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise CompressorError(_h5_error(source, where, f"is a link into the file '{clip(link.filename, 40)}'"))
            if not isinstance(link, h5py.HardLink):
                continue
            item = group.get(name)
            if isinstance(item, h5py.Group):
                todo.append((item, where, depth + 1))
            elif isinstance(item, h5py.Dataset):
                _check_dataset(item, where, source)


def _check_dataset(dataset, where: str, source: str) -> None:
    if dataset.external:
        files = ", ".join(sorted({clip(str(entry[0]), 40) for entry in dataset.external}))
        raise CompressorError(_h5_error(source, where, f"stores its bytes in another file ({clip(files, 60)})"))
    if dataset.is_virtual:
        raise CompressorError(_h5_error(source, where, "is a virtual dataset (its bytes come from other files)"))
    plist = dataset.id.get_create_plist()
    unknown = sorted({plist.get_filter(i)[0] for i in range(plist.get_nfilters())} - KNOWN_H5_FILTERS)
    if unknown:
        raise CompressorError(_h5_error(source, where, f"needs HDF5 filter {unknown[0]}, a plugin loaded from disk"))


def _h5_error(source: str, where: str, what: str) -> str:
    return (f"cannot read model '{clip(source)}': HDF5 object '{clip(where or '/', 40)}' {what}; refused: loading "
            "would read bytes from outside the model file; re-save it with model.save()")


# --------------------------------------------------------------------------- pkg.mod:func names

#: TensorFlow namespaces whose functions reach files, Python or the process (never a loss or metric).
_UNSAFE_TF_PARTS = frozenset({"io", "gfile", "py_func", "py_function", "numpy_function", "print", "summary",
                              "saved_model", "debugging", "load_op_library", "load_library", "raw_ops",
                              "sysconfig", "profiler", "compat"})


def refused_module(spec: str) -> str:
    """Why a `pkg.mod:func` name may not be used ('' when it may): it must name the user's own code,
    never the standard library or builtins, which reach files and processes (`os:system`)."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not MODULE_NAME.match(module_name) or not re.fullmatch(r"[A-Za-z_]\w*", attr):
        return "is not package.module:function"
    parts = module_name.split(".")
    if parts[0] in sys.stdlib_module_names or parts[0] in ("builtins", "__main__"):
        return f"names the Python standard library ('{clip(parts[0], 30)}'), code that reaches files and processes"
    if parts[0] == "tensorflow" and set(parts[1:] + [attr]) & _UNSAFE_TF_PARTS:
        return "names a TensorFlow function that reaches files or Python, not a loss or metric"
    return ""
