"""Atomic writes and size figures: a file carries its final name only once it is complete."""
from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

import numpy as np


def make_readable(path: str | Path) -> None:
    """mkstemp creates 0600 files; a published artifact gets the usual mode (0666 minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_bytes_atomic(path: str | Path, payload: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def gzip_size(path: str | Path) -> int:
    """Size after gzip -9: what a download or an OTA update actually costs."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9, mtime=0))


def jsonable(value):
    """`json.dump(default=...)`: reports and checkpoints hold numpy scalars/arrays and paths; written as plain
    values."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
