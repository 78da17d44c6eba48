"""Verification of an exported file against the Keras model it came from.

Two checks a user can rely on: the file computes what Keras computes (max |diff| on the test
inputs), and every zero of the Keras kernels is really stored in the file (counted by decoding
the file, never by looking at Keras again).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.training import kernel_zeros
from exporters.readback import count_weight_zeros

FLOAT_TOLERANCE = 1e-4


def verify_file(path: str | Path, runner, keras_model, keras_outputs: np.ndarray, x: np.ndarray,
                quantized: bool = False) -> dict:
    """One verification row (CONTRACTS.md); `ok` false names why in `problem`."""
    outputs = runner.predict(x)
    diff = float(np.max(np.abs(outputs.reshape(keras_outputs.shape) - keras_outputs)))
    expected, _ = kernel_zeros(keras_model)
    in_file, _ = count_weight_zeros(path)
    agreement = float(np.mean(outputs.reshape(len(x), -1).argmax(1) == keras_outputs.reshape(len(x), -1).argmax(1)))
    problems = []
    if quantized:
        # int8 rounding turns tiny weights into extra zeros; every pruned zero must still be there.
        if in_file < expected:
            problems.append(f"{expected - in_file} pruned zeros missing from the file")
        if agreement < 0.95:
            problems.append(f"int8 predictions agree with Keras on only {agreement:.1%} of samples")
    else:
        if in_file != expected:
            problems.append(f"file stores {in_file} zero weights, Keras has {expected}")
        if diff > FLOAT_TOLERANCE:
            problems.append(f"outputs differ from Keras by {diff:.2e} (> {FLOAT_TOLERANCE:g})")
    row = {
        "file": Path(path).name,
        "max_abs_diff": diff,
        "tolerance": None if quantized else FLOAT_TOLERANCE,
        "prediction_agreement": agreement,
        "zeros_expected": expected,
        "zeros_in_file": in_file,
        "ok": not problems,
    }
    if problems:
        row["problem"] = "; ".join(problems)
    return row
