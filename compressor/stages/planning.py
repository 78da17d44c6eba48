"""Planning: which producers lose units together, how many a step may take, and how a removed
unit's signal is folded into the layers that read it.

Before removal (compressor/graph/surgery.py), a removed unit's mean activation is folded into the
consumers' bias ("mean replacement"), which makes removing a constant unit (zero kernel, gamma = 0,
a ReLU that never fires) exact and is the least-squares best guess for any other unit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compressor.core._tf import keras
from compressor.graph import surgery
from compressor.layers import handler_or_default as _handler

# ------------------------------------------------------------------------------------ planning


@dataclass
class Group:
    """Producers that must lose the same units (one residual group, or a single layer)."""

    members: list[str]
    units: int

    @property
    def name(self) -> str:
        return self.members[0]


def groups(model, observable: bool = False) -> list[Group]:
    """Coupled producer groups in which every member is prunable, in model order. `observable`:
    only groups whose units are channels of their outputs (what activity statistics can see)."""
    prunable = surgery.prunable_layers(model)
    out = []
    for members in surgery.coupled_groups(model):
        if members and all(m in prunable for m in members):
            if observable and not all(_handler(model.get_layer(m)).units_on_output for m in members):
                continue
            out.append(Group(list(members), prunable[members[0]]))
    return out


def head_groups(model) -> list[Group]:
    """Attention layers whose heads may be removed (their units are heads, not output channels)."""
    return [g for g in groups(model) if not _handler(model.get_layer(g.name)).units_on_output
            and isinstance(model.get_layer(g.name), keras.layers.MultiHeadAttention)]


def cap(units: int, max_fraction: float, amount: float) -> int:
    """Most units a layer may lose: max_fraction*amount of it, and never the last one."""
    return max(0, min(units - 1, int(math.floor(units * max_fraction * amount + 1e-9))))


def rounded(chosen: list, units: int, round_to: int) -> list:
    """Trim an ordered removal list (cheapest first) so the units kept are a multiple of `round_to`.

    Rounds the kept width *up*, i.e. removes fewer units, which never costs accuracy: CPU kernels
    (onnxruntime's blocked convolutions, XNNPACK) slow down sharply on odd widths.
    """
    if round_to <= 1 or units < round_to:
        return chosen
    keep = units - len(chosen)
    keep = min(units, -(-keep // round_to) * round_to)
    return chosen[: units - keep]


def below(scores: np.ndarray, threshold: float, limit: int) -> list[int]:
    """Indices with score < threshold, lowest first, at most `limit`."""
    order = np.argsort(scores, kind="stable")
    return [int(i) for i in order if scores[i] < threshold][:limit]


def summary(scores: np.ndarray) -> dict:
    return {"min": float(np.min(scores)), "median": float(np.median(scores)), "max": float(np.max(scores))}


# ------------------------------------------------------------------------------------ folding


def fold_into_consumers(model, tr, channels: int, scale: dict[int, float] | None = None,
                        offset: dict[int, float] | None = None) -> bool:
    """In place: multiply the consumer rows that read unit c by scale[c], and add offset[c] times
    those rows (before scaling) to the consumer bias. False, and nothing changed, if impossible.
    `tr` is the producer's observation.Trace (its consumers).

    With offset = mean activation this replaces a removed unit by its mean (exact for a constant
    unit); with a_r ~ s * a_k + t it prepares surgery's unscaled merge of r into k.
    """
    scale, offset = scale or {}, {c: t for c, t in (offset or {}).items() if t != 0.0}
    if tr.consumers is None or (not scale and not offset):
        return tr.consumers is not None
    layers = [model.get_layer(c.name) for c in tr.consumers]
    if offset and any(not getattr(layer, "use_bias", False) for layer in layers):
        return False
    for cons, layer in zip(tr.consumers, layers):
        weights = layer.get_weights()
        kernel = weights[0]
        for c in set(scale) | set(offset):
            if type(layer) is keras.layers.Dense:
                rows = np.arange(cons.outer) * channels + c
                if c in offset:
                    weights[1] += offset[c] * kernel[rows].sum(axis=0)
                kernel[rows] *= scale.get(c, 1.0)
            else:  # conv: exact for 'valid' padding; 'same' borders see zeros instead
                part = kernel[..., c, :]
                if c in offset:
                    weights[1] += offset[c] * part.reshape(-1, part.shape[-1]).sum(axis=0)
                kernel[..., c, :] = part * scale.get(c, 1.0)
        layer.set_weights(weights)
    return True


def layer_details(result, extra: dict[str, dict]) -> dict[str, dict]:
    """Per-producer units before/after from the surgery result, merged with the stage's own notes."""
    out = {}
    for name, info in extra.items():
        row = {"units_before": int(result.units_before.get(name, 0)),
               "units_after": int(result.units_after.get(name, 0))}
        row["removed"] = row["units_before"] - row["units_after"]
        row.update(info)
        if name in result.skipped:
            row["skipped"] = result.skipped[name]
        out[name] = row
    return out
