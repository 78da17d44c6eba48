"""Verification of an exported file against the Keras model it came from.

Two checks a user can rely on: the file computes what Keras computes (max |diff| on the test
inputs for float files, top-1 agreement for int8 ones), and every zero of the Keras kernels is
really stored in the file (decoded from the file, never by looking at Keras again).

int8 files hold more zeros than Keras: weights that round to zero. Which ones depends on the
converter (BatchNorm folded into the conv kernel, per-channel or per-tensor scales, 7-bit
`reduce_range`, scales widened to keep the bias in int32), so no prediction made from the Keras
weights alone holds for every scheme. Instead each stored kernel is paired with its Keras kernel by
how well they match per output channel (converters scale each channel on its own), laid over it
element by element, and a channel is accepted when one scale rounds every kept weight to its stored
level. Only a channel with no such scale is judged by its least-squares scale. A file fails when it
lost a pruned zero, or stores a zero where the weight is far from rounding to zero: a mismatch
means a pruned weight was lost or gained, not a rounding disagreement.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from compressor.core import export_form, keras_kernels
from exporters.readback import is_weight, stored_weights

FLOAT_TOLERANCE = 1e-4   # absolute floor ...
FLOAT_RELATIVE = 5e-4    # ... or this fraction of the largest |output|: deep nets (MobileNetV3, 100+ layers)
                         # differ by ~1e-4 in float from op fusion alone; a lost weight moves outputs by ~1e-3
ROUNDING_EDGE = 0.5      # |level| below this rounds to 0
EDGE_BAND = 0.1          # within this of the edge, the file's own rounding is accepted either way
MIN_AGREEMENT = 0.95
DECISIVE_MARGIN = 0.05   # samples whose Keras top-1 leads by less (of the peak |output|) cannot disagree


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


def align_to_kernel(values: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray | None, float]:
    """`values` (a stored tensor, in the converter's layout) rearranged to the Keras kernel's layout.

    Converters transpose kernels (TFLite OHWI, ONNX OIHW, FULLY_CONNECTED out x in) and add or drop
    unit axes; the axis permutation whose shape fits and whose values match the kernel best is
    taken. Returns (aligned values or None, match score in [0, 1], see `_channel_match`).
    """
    target = _squeezed(kernel.shape)
    squeezed = values.reshape(_squeezed(values.shape))
    best, best_score = None, -1.0
    for perm in itertools.permutations(range(squeezed.ndim)):
        if tuple(squeezed.shape[p] for p in perm) != target:
            continue
        cand = squeezed.transpose(perm).reshape(kernel.shape)
        score = _channel_match(cand, kernel)
        if score > best_score:
            best, best_score = cand, score
    if best is not None and best_score < GATE_RETRY:
        reordered = _gates_in_keras_order(best)
        score = _channel_match(reordered, kernel) if reordered is not None else -1.0
        if score > best_score:
            best, best_score = reordered, score
    return best, best_score


GATE_RETRY = 0.9  # a best match below this may be an LSTM kernel with its gate blocks in ONNX order


def _gates_in_keras_order(values: np.ndarray) -> np.ndarray | None:
    """An LSTM kernel stored with ONNX's gate order (input, output, forget, cell: tf2onnx's LSTM op,
    onnxruntime's DynamicQuantizeLSTM) with its column blocks put back in Keras' (input, forget,
    cell, output); None when the last axis is not four gate blocks."""
    columns = values.shape[-1]
    if columns % 4:
        return None
    blocks = values.reshape(*values.shape[:-1], 4, columns // 4)
    return blocks[..., [0, 2, 3, 1], :].reshape(values.shape)


def _channel_match(stored: np.ndarray, kernel: np.ndarray) -> float:
    """Mean |cosine| between stored and Keras weights per output channel (the last Keras axis).

    A converter scales each output channel on its own (BatchNorm folding, per-channel int8 scales,
    a negative gamma flips the sign), which leaves a whole-tensor correlation near zero for the right
    tensor (MobileNetV2's projection convs: 0.04) and lets a same-sized wrong one win; the cosine of
    each channel is untouched by such scaling, ~1 for the right tensor and ~0 for any other.
    """
    s = stored.reshape(-1, kernel.shape[-1]).astype(np.float64)
    k = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(s, axis=0) * np.linalg.norm(k, axis=0)
    live = norms > 0
    if not live.any():
        return 0.0
    return float(np.mean(np.abs(np.sum(s * k, axis=0)[live]) / norms[live]))


def pair_kernels(path: str | Path, kernels: list[np.ndarray]) -> list[tuple[np.ndarray, object]]:
    """Each Keras kernel with the stored tensor that holds it (None when none does).

    Converters add constants of their own (e.g. an LSTM's zero initial state) and transpose or
    reshape kernels, so each Keras kernel is paired with an unused stored weight of the same
    number of elements, the best-matching one per output channel when several fit (repeated blocks,
    an expand and a projection conv of transposed shapes); stored tensors without a Keras kernel are
    not counted.
    """
    weights = [t for t in stored_weights(path) if is_weight(t)]
    stored = [t for t in weights if len(t.shape) >= 2] + [t for t in weights if len(t.shape) < 2]
    used: set[int] = set()
    pairs = []
    for kernel in kernels:
        fits = [i for i, t in enumerate(stored) if i not in used and t.size == kernel.size]
        if len(fits) > 1:
            fits.sort(key=lambda i: -align_to_kernel(_levels(stored[i]), kernel)[1])
        match = fits[0] if fits else None
        if match is not None:
            used.add(match)
        pairs.append((kernel, None if match is None else stored[match]))
    return pairs


def _levels(t) -> np.ndarray:
    return t.levels() if t.quantized else t.values


def _rounding_consistent(w: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per output channel: whether it has one scale r under which every kept weight rounds to its stored
    level (|w| r within EDGE_BAND of |q| +- 0.5). The fitted ratio of a channel stored only as levels
    0 and +-1 is off by tens of percent (mlp-1024's dynamic int8: 283 for a true 234), so a fitted
    scale alone would call a correct rounding zero "gained"; the interval of admissible scales is exact.
    """
    a, m = np.abs(w), np.abs(q)
    kept = a > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(kept, np.maximum(m - ROUNDING_EDGE - EDGE_BAND, 0.0) / a, 0.0)
        high = np.where(kept, (m + ROUNDING_EDGE + EDGE_BAND) / a, np.inf)
    signs = np.sign(w) * np.sign(q)
    flipped = np.any(signs > 0, axis=0) & np.any(signs < 0, axis=0)  # a scale has one sign per channel
    return (low.max(axis=0) <= high.min(axis=0)) & ~flipped


def int8_zero_check(kernel: np.ndarray, stored) -> dict:
    """Zeros of one int8 kernel: Keras zeros, rounding zeros under the file's own scales, and the
    zeros lost (a pruned weight stored non-zero) or gained (a weight far from rounding stored as 0)."""
    keras_zero = kernel == 0
    levels, _ = align_to_kernel(stored.levels(), kernel)
    if levels is None:  # a layout we cannot lay over the kernel: fall back to counts
        in_file = int(stored.zeros)
        return {"expected": max(int(keras_zero.sum()), in_file), "lost": max(0, int(keras_zero.sum()) - in_file),
                "gained": 0}
    file_zero = levels == 0
    w = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    q = levels.reshape(-1, kernel.shape[-1]).astype(np.float64)
    consistent = _rounding_consistent(w, q)  # channels where one scale rounds every kept weight as stored
    den = np.sum(w * w, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(np.sum(q * w, axis=0) / den)
    known = (den > 0) & np.any(q != 0, axis=0)
    fill = float(np.median(ratio[known])) if known.any() else 0.0
    ratio = np.where(known, ratio, fill)  # an all-zero stored channel: the tensor's typical scale
    magnitude = (np.abs(w) * ratio).reshape(kernel.shape)  # |level| each weight quantizes to
    rounds = ~keras_zero & (magnitude < ROUNDING_EDGE - EDGE_BAND) & ~consistent
    edge = ~keras_zero & ((np.abs(magnitude - ROUNDING_EDGE) <= EDGE_BAND) | consistent)  # stored rounding accepted
    return {
        "expected": int(keras_zero.sum() + rounds.sum() + (edge & file_zero).sum()),
        "lost": int((keras_zero & ~file_zero).sum()),
        "gained": int((file_zero & ~keras_zero & ~rounds & ~edge).sum()),
        "kept": int((rounds & ~file_zero).sum()),
    }


def _agreement(outputs: np.ndarray, keras_outputs: np.ndarray, threshold: float | None = None) -> float:
    """Top-1 agreement over the samples where Keras' choice is decisive: a near-tie between two
    classes may flip under int8 rounding without the file being wrong. A binary output (one unit,
    `threshold` given) compares the thresholded classes: argmax over one unit always agrees."""
    out, ref = outputs.reshape(len(outputs), -1), keras_outputs.reshape(len(outputs), -1)
    if threshold is not None and ref.shape[1] == 1:
        decisive = np.abs(ref[:, 0] - threshold) > DECISIVE_MARGIN * max(1.0, float(np.abs(ref).max(initial=0.0)))
        disagree = ((ref[:, 0] > threshold) != (out[:, 0] > threshold)) & decisive
        return float(1.0 - disagree.mean()) if len(ref) else 1.0
    top, mine = ref.argmax(1), out.argmax(1)
    rows = np.arange(len(ref))
    margin = ref[rows, top] - ref[rows, mine]
    peak = float(np.abs(ref).max()) if ref.size else 1.0
    disagree = (top != mine) & (margin > DECISIVE_MARGIN * peak)
    return float(1.0 - disagree.mean()) if len(ref) else 1.0


def verify_file(path: str | Path, runner, keras_model, keras_outputs: np.ndarray, x: np.ndarray,
                quantized: str | None = None, accuracy_held: bool = False, thresholds=None) -> dict:
    """One verification row (CONTRACTS.md); `ok` false names why in `problem`.

    `quantized` describes the int8 scheme of an int8 file (for the report); its expected zeros are
    the Keras zeros plus the weights that round to zero under the file's own scales. A multi-output
    model's `keras_outputs` is a list: every output is compared (the file's matched by name).
    `accuracy_held`: the int8 file's own score was measured within the budget of its float model's. Low
    top-1 agreement then comes from rounding on a model with few decisive predictions (EfficientNetB3
    near chance: 93.6%, while its int8 accuracy matched), not from a broken file: a note, not a failure.
    `thresholds`: per output, the decision threshold of a binary (one-unit) output, else None.
    """
    if isinstance(keras_outputs, (list, tuple)):
        pairs_out = list(zip(runner.predict_outputs(x, list(keras_model.output_names)), keras_outputs))
    else:
        pairs_out = [(runner.predict(x), keras_outputs)]
    # (max |diff|, tolerance) per output: each output is held to its own scale
    checks = [(float(np.max(np.abs(o.reshape(k.shape) - k))),
               max(FLOAT_TOLERANCE, FLOAT_RELATIVE * float(np.max(np.abs(k), initial=0.0)))) for o, k in pairs_out]
    diff = max(d for d, _ in checks)
    worst, tolerance = max(checks, key=lambda c: c[0] / c[1])
    pruned_zeros, in_file, expected, lost, gained, kept = _zero_counts(path, keras_model, quantized)
    thresholds = list(thresholds or [None] * len(pairs_out))
    agreement = min(_agreement(o, k, t) for (o, k), t in zip(pairs_out, thresholds))
    problems = _zero_problems(in_file, expected, lost, gained, kept)
    note = None
    if quantized and agreement < MIN_AGREEMENT:
        if accuracy_held:
            note = (f"int8 predictions agree with Keras on {agreement:.1%} of samples, but the file's measured "
                    "score is within the budget of the float model's: rounding flips near-ties, nothing is lost")
        else:
            problems.append(f"int8 predictions agree with Keras on only {agreement:.1%} of samples")
    elif not quantized and worst > tolerance:
        problems.append(f"outputs differ from Keras by {worst:.2e} (> {tolerance:.2g})")
    row = {
        "file": Path(path).name,
        "max_abs_diff": diff,
        "tolerance": None if quantized else tolerance,
        "prediction_agreement": agreement,
        "zeros_expected": expected,
        "zeros_in_file": in_file,
        "ok": not problems,
    }
    if quantized:
        row["pruned_zeros"] = pruned_zeros  # zeros in the Keras kernels; the rest come from int8 rounding
        row["quantization"] = quantized
    if note:
        row["note"] = note
    if problems:
        row["problem"] = "; ".join(problems)
    return row


def _zero_counts(path, keras_model, quantized) -> tuple[int, int, int, int, int, int]:
    """(zeros in the Keras kernels, zeros in the file, zeros expected in it, pruned zeros lost, weights
    zeroed that do not round to zero, weights that round to zero stored non-zero)."""
    pairs = pair_kernels(path, keras_kernels(export_form(keras_model)))  # kernels in the layout the converters got
    pruned_zeros = int(sum(k.size - np.count_nonzero(k) for k, _ in pairs))
    in_file = int(sum(t.zeros for _, t in pairs if t is not None))
    expected, lost, gained, kept = pruned_zeros, 0, 0, 0
    if quantized:
        checks = [int8_zero_check(k, t) if t is not None and t.quantized
                  else {"expected": k.size - np.count_nonzero(k), "lost": 0, "gained": 0} for k, t in pairs]
        expected = int(sum(c["expected"] for c in checks))
        lost, gained = sum(c["lost"] for c in checks), sum(c["gained"] for c in checks)
        kept = sum(c.get("kept", 0) for c in checks)
    return pruned_zeros, in_file, expected, lost, gained, kept


def _zero_problems(in_file: int, expected: int, lost: int, gained: int, kept: int) -> list[str]:
    """What is wrong with the file's zeros (an empty list when nothing is)."""
    problems = []
    if lost or gained:
        problems.append(f"file stores {in_file} zero weights, expected {expected}: {lost} pruned zero(s) lost, "
                        f"{gained} weight(s) zeroed that do not round to zero")
    elif in_file != expected:
        problems.append(f"file stores {in_file} zero weights, expected {expected}"
                        + (f" ({kept} weight(s) that round to zero stored non-zero)" if kept else ""))
    return problems
