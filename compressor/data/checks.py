"""Label checks shared by in-memory and streamed data: labels must be what each model output is
trained on (integer classes below the output width, or values shaped like the output), and every
problem is one line naming the data, the labels and the fix.
"""
from __future__ import annotations

import numpy as np

from compressor.core.errors import CompressorError

SPLIT_SEED = 1234  # fixed seed of every train/test split and calibration sample (arrays and streams)


LARGEST_CLASS = 2**31 - 1  # no classifier has more outputs; larger "labels" are ids or hashes (and overflow int64)
NUMBER_KINDS = "biuf"  # numpy dtype kinds training can take: bool, int, uint, float


def numeric_inputs(name: str, key: str, x) -> np.ndarray:
    """An input array as float32, refused in one line when it is not an array of samples of numbers."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise CompressorError(f"data '{name}': {key} is a single value (a 0-d array), not samples; save an array "
                              f"with one row per sample, shape (samples, features...)")
    if x.dtype.kind not in NUMBER_KINDS:
        raise CompressorError(f"data '{name}': {key} holds {_kind(x)} (dtype {x.dtype}) where real numbers "
                              "are needed; encode text or categories as numeric features and save float32 inputs")
    return x.astype(np.float32)


def numeric_labels(name: str, key: str, y: np.ndarray) -> None:
    """Labels must be numbers with a sample axis (strings are class names: map them to class ids)."""
    if y.ndim == 0:
        raise CompressorError(f"data '{name}': {key} is a single value (a 0-d array); save one label per sample")
    if y.dtype.kind in "USO":
        raise CompressorError(f"data '{name}': {key} holds {_kind(y)} (dtype {y.dtype}), not numbers; map class "
                              "names to ids 0..classes-1, e.g. numpy.unique(y, return_inverse=True)[1]")
    if y.dtype.kind not in NUMBER_KINDS:
        raise CompressorError(f"data '{name}': {key} holds {_kind(y)} (dtype {y.dtype}); save integer class "
                              "labels or float targets")


def _kind(a: np.ndarray) -> str:
    return {"U": "strings", "S": "byte strings", "O": "Python objects", "c": "complex numbers",
            "M": "dates", "m": "time spans", "V": "raw records"}.get(a.dtype.kind, f"{a.dtype} values")


def class_labels(name: str, key: str, y: np.ndarray) -> None:
    """Integer class ids in 0..LARGEST_CLASS, checked before any cast (a cast of 1e30 or of a uint64
    near 2**64 to int64 wraps to a negative number and hid the real cause)."""
    numeric_labels(name, key, y)
    y = y.reshape(len(y)) if y.ndim == 2 and y.shape[1] == 1 else y  # (N, 1): one class id per row
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
        raise CompressorError(
            f"data '{name}': {key} must be a 1-D array of integer class labels (got shape {y.shape}, "
            f"dtype {y.dtype}); convert one-hot labels with y.argmax(axis=1)"
        )
    if len(y) and y.min() < 0:
        raise CompressorError(f"data '{name}': {key} has negative labels; labels must be 0..classes-1")
    if len(y) and float(y.max()) > LARGEST_CLASS:
        raise CompressorError(f"data '{name}': {key} has label {_number(y.max())}, out of range for class labels; "
                              "labels must be class ids 0..classes-1 (map ids or hashes to 0..classes-1)")


def _number(v) -> str:
    return f"{int(v)}" if float(v).is_integer() and abs(float(v)) < 1e15 else f"{float(v):.4g}"


def check_label_count(name: str, count: int, task) -> None:
    outputs = task.output_names
    if count != len(outputs):
        raise CompressorError(
            f"data '{name}' has {count} label array(s) but the model has {len(outputs)} outputs "
            f"({', '.join(outputs)}); "
            "give one label array per output (y_train_0, y_train_1, ... in an .npz; a tuple in a function)")


def check_labels(name: str, key: str, y: np.ndarray, task, i: int) -> np.ndarray:
    """One output's labels against what the output produces; returns them in the dtype training needs."""
    units = task.units[i]
    if task.sparse(i):
        y = y.reshape(len(y)) if y.ndim == 2 and y.shape[1] == 1 else y
        class_labels(name, key, y)
        top = int(y.max()) if len(y) else 0
        if top >= units:
            raise CompressorError(
                f"data '{name}': label {top} is out of range for a model with {units} outputs; "
                f"labels must be 0..{units - 1}"
            )
        return y.astype(np.int64)
    per_sample = int(np.prod(y.shape[1:]))
    if task.binary(i):
        return _binary_labels(name, key, y)
    if per_sample != units:
        raise CompressorError(
            f"data '{name}': {key} has {per_sample} value(s) per sample but output '{task.output_names[i]}' has "
            f"{units}; give labels shaped like the output (or set the recipe's loss for class labels)")
    y = y.astype(np.float32)
    if not np.all(np.isfinite(y)):
        raise CompressorError(f"data '{name}': {key} contains NaN/inf values; clean or impute them first")
    return y


def _binary_labels(name: str, key: str, y: np.ndarray) -> np.ndarray:
    """0/1 labels of a one-unit sigmoid output, (N,) or (N, 1), as (N, 1) float32 like the output."""
    numeric_labels(name, key, y)
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise CompressorError(f"data '{name}': {key} has shape {y.shape} but the model's output is one unit "
                              "(binary): give one 0/1 label per sample, shape (N,) or (N, 1)")
    y = y.reshape(len(y), 1).astype(np.float32)
    if len(y) and (not np.all(np.isfinite(y)) or y.min() < 0 or y.max() > 1):
        raise CompressorError(f"data '{name}': {key} holds values outside 0..1 but the model's output is one "
                              "sigmoid unit (binary classification): labels must be 0 or 1; for more classes "
                              "give the model one output unit per class")
    return y


def check_model(model) -> None:
    """What the pipeline cannot take, refused in one line before the model meets the data:
    a layer of zero width, nothing to prune, NaN/Inf weights (a damaged file or a diverged
    training; fine-tuning from it ends in a NaN loss and was blamed on the recipe's epochs)."""
    layers = list(_all_layers(model))
    for layer in layers:
        for weight in layer.weights:
            if 0 in tuple(weight.shape):
                raise CompressorError(f"model layer '{layer.name}' has a weight of shape {tuple(weight.shape)} "
                                      "(0 units): a zero-width layer passes nothing on; rebuild the model with at "
                                      "least one unit")
    if not any(len(w.shape) >= 2 for w in model.weights):
        kinds = ", ".join(dict.fromkeys(type(layer).__name__ for layer in layers)) or "none"
        raise CompressorError(f"the model has no layer with a kernel (Dense, Conv, ...) to prune (its layers: "
                              f"{kinds}); compress a model with Dense or convolution layers")
    for layer in layers:
        for weight in layer.weights:
            value = np.asarray(weight.numpy())
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                bad = int(value.size - np.count_nonzero(np.isfinite(value)))
                raise CompressorError(f"model layer '{layer.name}' holds {bad} NaN/Inf value(s) in its weight "
                                      f"'{weight.name.split('/')[-1].split(':')[0]}'; the file is damaged or its "
                                      "training diverged: retrain the model or restore a good copy")


def _all_layers(model):
    """Every layer, nested models' layers included (each weight is checked where it lives)."""
    for layer in model.layers:
        sub = getattr(layer, "layers", None)
        if sub:
            yield from _all_layers(layer)
        else:
            yield layer
