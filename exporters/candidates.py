"""The int8 candidates of one target: which schemes are worth a file on this model, and their files.

Each candidate costs a converter run (with a calibration pass for full-integer int8), a score on the
budget split and a timing; on MobileNetV2 at 224 px that was up to a minute each. So a scheme that
cannot win is not built, and the report names why:

- sparse storage when no kernel holds enough zeros for the converter to store it sparse: the file
  would be its dense twin's;
- float-activation (dynamic) schemes when an int8-activation scheme is already within the budget and
  most of the model's multiply-adds are in convolutions, which those schemes run slower (onnxruntime
  ConvInteger: MobileNetV2 at 224 took 158 ms against 13 ms for static QDQ);
- the quantization-aware fine-tune unless every post-training full-integer scheme misses the budget.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.core import keras_kernels
from exporters.runtimes import open_runner_safely

SPARSE_STORED = 0.2  # a kernel below this fraction of zeros stays dense in the converter's sparse storage (at 30%)


def build(target, pruned, out: Path, encode: bool, judge, reference: float, qat=None) -> list[dict]:
    """One entry per scheme of the target: a written, opened and scored file, or `skipped` with why.
    `qat(model) -> model`: the quantization-aware fine-tune (None: not offered by the caller)."""
    found = []
    calibration = judge.data.calibration()  # read once: every full-integer scheme calibrates on the same samples
    for scheme in target.schemes:
        entry = {"scheme": scheme.name, "description": scheme.description}
        why = _skip(scheme, target, pruned, found, encode, judge, reference, qat)
        if why:
            entry["skipped"] = why
        else:
            _write(entry, target, scheme, pruned, calibration, out, judge, qat)
        found.append(entry)
    return found


def _within(found: list[dict], judge, reference: float) -> list[dict]:
    return [c for c in found if c.get("metric") is not None and judge.drop(reference, c["metric"]) <= judge.budget]


def _skip(scheme, target, pruned, found: list[dict], encode: bool, judge, reference: float, qat) -> str | None:
    """Why `scheme` is not built on this model (None: build it)."""
    if scheme.options.get("encode") and not encode:
        return target.fallback("misaligned").reason
    twin = dense_twin(target, scheme)
    if twin is not None and not sparse_eligible(pruned):
        return (f"no kernel holds {SPARSE_STORED:.0%} zeros, the least the converter stores sparse: the file would "
                f"be {twin.name}'s")
    within = _within(found, judge, reference)
    if scheme.kind == "qat":
        if within:
            return f"{within[0]['scheme']} is within the budget: no quantization-aware fine-tune needed"
        if qat is None:
            return "no training data was handed to the exporter for a quantization-aware fine-tune"
    if scheme.kind == "dynamic" and within and convolutional(pruned):
        return (f"{within[0]['scheme']} is within the budget and most of the model's multiply-adds are in "
                "convolutions, which run slower with activations quantized at run time")
    return None


def _write(entry: dict, target, scheme, pruned, calibration, out: Path, judge, qat) -> None:
    """Write the scheme's file, open it as a user would and score it on the budget split."""
    model = pruned
    if scheme.kind == "qat":
        try:
            model = qat(pruned)
        except Exception as exc:  # tfmot refuses some layers and patterns; the other schemes still ship
            entry["skipped"] = f"quantization-aware fine-tune failed: {str(exc).strip().splitlines()[0][:200]}"
            return
    path = out / f".candidate-{scheme.name}-{target.filename('pruned-int8')}"
    target.export(model, path, calibration=calibration, scheme=scheme, sparse=True)
    runner, resolver, note = open_runner_safely(path)
    fallback = _dense_fallback(target, scheme) if resolver != "default" else None
    if fallback:  # the delegate has no kernel for this scheme's sparse tensors: write it dense
        target.export(model, path, calibration=calibration, scheme=scheme, sparse=False)
        runner, resolver, note = open_runner_safely(path)
        entry["storage"] = fallback.instead
        entry["description"] += (f"; written with {entry['storage']}: "
                                 "the default delegate rejects its sparse tensors")
    value = judge.file(runner, "budget").value
    entry.update(path=path, runner=runner, resolver=resolver, delegate_note=note, metric=value, model=model,
                 accuracy=value if judge.is_accuracy else None)


def dense_twin(target, scheme):
    """The target's scheme that writes the same file as `scheme` with dense storage, or None."""
    if not scheme.options.get("encode"):
        return None
    twin = {**scheme.options, "encode": False}
    return next((s for s in target.schemes if s.options == twin and s.kind == scheme.kind), None)


def _dense_fallback(target, scheme):
    """The fallback a scheme whose sparse file the default interpreter rejects is rewritten with
    (dense storage), or None: only where the target names it and no other scheme already is the
    scheme's dense twin (int8-sparse has int8-dense; dynamic-range has none, and is what keeps a
    model's accuracy when full-integer int8 loses it)."""
    if not scheme.options.get("encode") or dense_twin(target, scheme) is not None:
        return None
    return target.fallback("delegate-rejects-sparse")


def sparse_eligible(model) -> bool:
    """Some kernel holds enough zeros that sparse storage changes the file."""
    return any(k.size and np.mean(k == 0) >= SPARSE_STORED for k in keras_kernels(model))


_CONVS = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "Conv2DTranspose",
          "Conv3DTranspose", "DepthwiseConv1D")


def convolutional(model) -> bool:
    """Most of the model's multiply-adds are in convolutions (kernel size times output positions)."""
    conv = other = 0
    for layer in model.layers:
        kernels = [w for w in layer.weights if len(w.shape) >= 2]
        try:
            shape = layer.output_shape[0] if isinstance(layer.output_shape, list) else layer.output_shape
        except (AttributeError, RuntimeError):  # a layer called at several shapes: no one count
            continue
        if not kernels:
            continue
        positions = int(np.prod([d or 1 for d in shape[1:-1]])) if shape else 1
        macs = sum(int(np.prod(w.shape)) for w in kernels) * positions
        if type(layer).__name__ in _CONVS:
            conv += macs
        else:
            other += macs
    return conv > other
