"""Multiply-accumulate counts (MACs) of a tf_keras model at batch size 1.

Pruning removes weights, but what a reader cares about is work per inference, so the report
shows dense MACs and the MACs left if every zero weight were skipped (`nonzero_only=True`).
Only layers whose cost is dominated by weight multiplies are counted (Dense, the Conv family,
attention); everything else (activations, pooling, normalisation, bias adds) counts as 0. Each
layer family's handler (compressor/layers) says how many MACs one call costs: for Dense and convs
`positions * kernel_entries`, where `positions` is how many times the kernel is applied (output
elements divided by output channels), which covers Dense on 2-D or 3-D inputs, strides, padding,
groups and TimeDistributed.
"""
from __future__ import annotations

from compressor.core._tf import keras
from compressor.layers import Handler, handler_for

__all__ = ["layer_macs", "model_macs"]

_L = keras.layers


def _node_indices(model, layer) -> list[int]:
    """Indices of the calls of `layer` that belong to `model`'s graph.

    A layer shared by several models keeps every call it was part of; counting only this
    model's calls avoids double counting, and counts a layer shared inside the model once per
    call. Falls back to all calls where the model does not track its nodes.
    """
    n = len(getattr(layer, "inbound_nodes", []) or [])
    keys = getattr(model, "_network_nodes", None)
    if keys:
        idx = [i for i in range(n) if f"{layer.name}_ib-{i}" in keys]
        if idx:
            return idx
    return list(range(n))


def _shape(shape, layer, what: str) -> tuple[int, ...]:
    """Shape without the batch dim, as ints; MACs need every other dim known."""
    if isinstance(shape, list):  # single-input layers sometimes report [shape]
        if len(shape) != 1:
            raise ValueError(f"layer {layer.name!r}: expected one {what}, got {len(shape)}")
        shape = shape[0]
    dims = tuple(shape)[1:]
    if any(d is None for d in dims):
        raise ValueError(
            f"layer {layer.name!r}: {what} shape {tuple(shape)} has unknown non-batch dims; "
            "MACs need a fixed input shape")
    return tuple(int(d) for d in dims)


def _core(layer):
    """The layer doing the maths: unwraps keras Wrappers (TimeDistributed, pruning wrappers)."""
    while isinstance(layer, _L.Wrapper):
        layer = layer.layer
    return layer


def _walk(model, nonzero_only: bool, prefix: str, repeat: int, out: dict) -> None:
    for layer in model.layers:
        name = prefix + layer.name
        if isinstance(layer, keras.Model):
            calls = max(1, len(_node_indices(model, layer)))
            _walk(layer, nonzero_only, name + "/", repeat * calls, out)
            continue
        core = _core(layer)
        handler = handler_for(core, exact=False)  # a subclass of Dense costs what Dense costs
        if handler is None or type(handler).macs is Handler.macs:
            out[name] = 0
            continue
        total = 0
        nodes = _node_indices(model, layer)
        if not nodes:
            raise ValueError(f"layer {name!r} has never been called; build the model first")
        for i in nodes:
            in_shape = _shape(layer.get_input_shape_at(i), layer, "input")
            out_shape = _shape(layer.get_output_shape_at(i), layer, "output")
            total += handler.macs(core, in_shape, out_shape, nonzero_only)
        out[name] = out.get(name, 0) + total * repeat


def layer_macs(model, nonzero_only: bool = False) -> dict[str, int]:
    """MACs per layer name at batch 1, in model order; layers inside nested models are keyed
    "outer/inner". With `nonzero_only`, kernel entries equal to 0 are not counted."""
    if not getattr(model, "built", False):
        raise ValueError("model is not built; give it an input shape or call it first")
    out: dict[str, int] = {}
    _walk(model, nonzero_only, "", 1, out)
    return out


def model_macs(model, nonzero_only: bool = False) -> int:
    """Total MACs at batch 1 (sum of `layer_macs`)."""
    return int(sum(layer_macs(model, nonzero_only).values()))
