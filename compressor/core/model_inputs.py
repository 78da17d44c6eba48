"""A model's input, one array or several: a multi-input model's samples are a dict keyed by its
input names (in the model's input order), which Keras models, LiteRT signatures and ONNX input
names all take, so no step needs to know the order in which a file lists its inputs.

Every step that slices, counts or casts samples goes through these helpers, so a single-input
model's samples stay a plain array.
"""
from __future__ import annotations

import numpy as np


def is_multi(x) -> bool:
    return isinstance(x, dict)


def count(x) -> int:
    """Samples in `x`."""
    return len(next(iter(x.values()))) if is_multi(x) else len(x)


def rows(x, index):
    """Rows `index` (a slice or an index array) of every input."""
    return {k: v[index] for k, v in x.items()} if is_multi(x) else x[index]


def each(x, fn):
    """`fn` applied to every input array."""
    return {k: fn(v) for k, v in x.items()} if is_multi(x) else fn(x)


def parts(x) -> list:
    """The input arrays, in order."""
    return list(x.values()) if is_multi(x) else [x]


def names(model) -> list[str]:
    """The model's input names (Keras input layer names), in its input order."""
    return [str(t.name).split(":")[0] for t in model.inputs]


def shapes(model):
    """Per-sample input shape: a tuple, or {input name: shape} for a multi-input model (what data binds to)."""
    if len(model.inputs) == 1:
        return tuple(model.input_shape[1:])
    return {n: tuple(t.shape[1:]) for n, t in zip(names(model), model.inputs)}


def zeros(shape, batch: int = 1, dtype=np.float32):
    """A batch of zeros for a shape as `shapes` gives it."""
    if isinstance(shape, dict):
        return {k: np.zeros((batch, *s), dtype) for k, s in shape.items()}
    return np.zeros((batch, *shape), dtype)
