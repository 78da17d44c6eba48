"""Verification of an exported file against the Keras model it came from.

Two checks a user can rely on: the file computes what Keras computes (max |diff| on the test
inputs), and every zero of the Keras kernels is really stored in the file (counted by decoding
the file, never by looking at Keras again).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.core import keras_kernels
from exporters.readback import is_weight, stored_weights

FLOAT_TOLERANCE = 1e-4


def pair_kernels(path: str | Path, kernels: list[np.ndarray]) -> list[tuple[np.ndarray, object]]:
    """Each Keras kernel with the stored tensor that holds it (None when none does).

    Converters add constants of their own (e.g. an LSTM's zero initial state) and transpose or
    reshape kernels, so each Keras kernel is paired with an unused stored weight of the same
    number of elements; stored tensors without a Keras kernel are not counted.
    """
    weights = [t for t in stored_weights(path) if is_weight(t)]
    stored = [t for t in weights if len(t.shape) >= 2] + [t for t in weights if len(t.shape) < 2]
    used: set[int] = set()
    pairs = []
    for kernel in kernels:
        match = next((i for i, t in enumerate(stored) if i not in used and t.size == kernel.size), None)
        if match is not None:
            used.add(match)
        pairs.append((kernel, None if match is None else stored[match]))
    return pairs


# How each exporter quantizes weights (symmetric int8): the scale granularity, and whether an exact
# half rounds to zero (onnxruntime rounds half to even) or away from it (TFLite).
SCHEMES = {
    "tflite": ("per-channel", False),
    "onnxruntime-dynamic": ("per-tensor", True),
    "onnxruntime-static": ("per-channel", True),
}


def int8_zero_prediction(kernel: np.ndarray, scheme: str) -> int:
    """How many weights of `kernel` the exporter's int8 quantization stores as 0.

    A pruned zero stays 0; a small weight becomes 0 when |w| / scale < 0.5. Per-tensor uses one
    scale, per-channel one per output unit/filter (the last Keras axis).
    """
    granularity, half_to_zero = SCHEMES[scheme]
    flat = (kernel.reshape(-1, kernel.shape[-1]) if kernel.ndim > 1 else kernel.reshape(-1, 1)).astype(np.float32)
    peak = np.abs(flat).max(axis=0, keepdims=True) if granularity == "per-channel" else np.abs(flat).max()
    scale = np.float32(peak) / np.float32(127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(scale > 0, np.abs(flat) / np.where(scale > 0, scale, 1.0), 0.0)
    return int(np.sum(ratio <= 0.5) if half_to_zero else np.sum(ratio < 0.5))


def verify_file(path: str | Path, runner, keras_model, keras_outputs: np.ndarray, x: np.ndarray,
                quantized: str | None = None) -> dict:
    """One verification row (CONTRACTS.md); `ok` false names why in `problem`.

    `quantized` names the int8 scheme (a SCHEMES key) for int8 files: their expected zeros are the
    Keras zeros plus the weights that scheme rounds to zero, predicted from the Keras weights.
    """
    outputs = runner.predict(x)
    diff = float(np.max(np.abs(outputs.reshape(keras_outputs.shape) - keras_outputs)))
    pairs = pair_kernels(path, keras_kernels(keras_model))
    expected = int(sum(k.size - np.count_nonzero(k) for k, _ in pairs))
    in_file = int(sum(t.zeros for _, t in pairs if t is not None))
    pruned_zeros = expected
    if quantized:
        # a quantized kernel gains rounding zeros; one the quantizer left in float keeps Keras' zeros
        expected = int(sum(int8_zero_prediction(k, quantized) if t is not None and t.quantized
                           else k.size - np.count_nonzero(k) for k, t in pairs))
    agreement = float(np.mean(outputs.reshape(len(x), -1).argmax(1) == keras_outputs.reshape(len(x), -1).argmax(1)))
    problems = []
    if in_file != expected:
        problems.append(f"file stores {in_file} zero weights, expected {expected}")
    if quantized:
        if agreement < 0.95:
            problems.append(f"int8 predictions agree with Keras on only {agreement:.1%} of samples")
    elif diff > FLOAT_TOLERANCE:
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
    if quantized:
        row["pruned_zeros"] = pruned_zeros  # zeros in the Keras kernels; the rest come from int8 rounding
        row["quantization"] = f"symmetric int8, {SCHEMES[quantized][0]} ({quantized})"
    if problems:
        row["problem"] = "; ".join(problems)
    return row
