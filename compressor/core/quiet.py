"""Silence native libraries that write straight to file descriptor 2.

TensorFlow prints absl/oneDNN/CUDA start-up lines, the TFLite converter pages of MLIR
diagnostics, LiteRT an "INFO: Created … XNNPACK delegate" line: noise that makes a clean run
look broken. The text is captured, so an error can still quote the line that matters.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def quiet_stderr():
    """Redirect fd 2 to a temp file; yields a list that holds the captured text afterwards.

    The redirect happens inside the `try`, so an interrupt (Ctrl-C) at any point still gets fd 2
    back before the CLI prints its one-line error.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    try:
        with tempfile.TemporaryFile(mode="w+b") as sink:
            try:
                os.dup2(sink.fileno(), 2)
                yield captured
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                captured.append(sink.read().decode("utf-8", "replace"))
    finally:
        os.close(saved)
