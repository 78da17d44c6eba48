"""How narrow the search may make each group, and which groups are single-path bottlenecks.

NetAdapt and HALP never cut a layer to one channel: a stem conv at 1 of 16 channels, or the last conv
before the classifier at 1, starves everything after it, and no fine-tune brings it back. So every
group has a floor: `round_units` and at least 8 units (or the group's whole width if narrower), or
the recipe's `min_width` instead (a group of 16 or more still keeps 8), and `min_fraction` of its
width. Without `min_width` a group may go below a `round_units` above 8, to 8, only where the
latency table predicts narrower is faster and it is no bottleneck: the stem (the first weighted
layer after the input), the input of the classifier (the last weighted layer), or a projection
that writes a residual sum (its width is the whole residual chain's).
"""
from __future__ import annotations

import math

from compressor.core._tf import keras
from compressor.graph import surgery

HARD_FLOOR, HARD_FROM = 8, 16  # a group of HARD_FROM units or more never goes below HARD_FLOOR
FASTER = 0.005  # a predicted gain this relative size below round_units counts as "narrower is faster"
_PASSIVE = (keras.layers.BatchNormalization, keras.layers.LayerNormalization, keras.layers.Normalization)


def _weighted(layer) -> bool:
    """A layer that computes with its own weights (normalisation layers only rescale: they pass through)."""
    return bool(layer.weights) and not isinstance(layer, _PASSIVE)


def _reaches(start: str, step, stop, goal) -> bool:
    """Whether a walk from `start` along `step` (name -> next names) through layers not in `stop` meets `goal`."""
    pending, seen = list(step(start)), set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if goal(name):
            return True
        if not stop(name):
            pending.extend(step(name))
    return False


def roles(model, groups) -> dict[str, str]:
    """Per group that is a single-path bottleneck, why: 'stem', 'classifier input' or 'residual'."""
    graph = surgery.model_graph(model)
    layers = {layer.name: layer for layer in graph.order}
    weighted = {name for name, layer in layers.items() if _weighted(layer)}
    outputs = set(graph.outputs)

    def back(name):
        return graph.inbound.get(name, []) + graph.keyword.get(name, [])

    def forward(name):
        return graph.consumers.get(name, [])

    def is_input(name):
        return name not in layers or isinstance(layers[name], keras.layers.InputLayer)

    def stop(name):
        return name in weighted

    last = {w for w in weighted if w in outputs or _reaches(w, forward, stop, lambda n: n in outputs and not stop(n))}
    tests = (("stem", back, lambda n: is_input(n)),
             ("classifier input", forward, lambda n: n in last),
             ("residual", forward, lambda n: isinstance(layers.get(n), keras.layers.Add)))
    found = {}
    for g in groups:
        for role, step, goal in tests:
            if any(_reaches(m, step, stop, goal) for m in g.members):
                found[g.name] = role
                break
    return found


def floors(units: dict[str, int], heads: set[str], roles_of: dict[str, str], cfg, step: int, faster) -> dict[str, int]:
    """The narrowest width each group may reach (`cfg`: the search stage's recipe). `faster(g, narrow, wide)`:
    whether the latency table predicts group `g` at width `narrow` to be faster than at `wide`."""
    out = {}
    for g, u in units.items():
        user = max(1, math.ceil(cfg.min_fraction * u))
        hard = HARD_FLOOR if u >= HARD_FROM else 1
        if g in heads:  # attention heads are counted in heads, not channels: round_units does not apply
            out[g] = min(u, max(user, hard))
            continue
        if cfg.min_width:  # the user's own floor holds as given (a group of 16 or more still keeps 8)
            out[g] = min(u, max(cfg.min_width, user, hard))
            continue
        base = min(u, max(step, user, HARD_FLOOR))
        relaxed = min(base, max(user, HARD_FLOOR))
        narrow = relaxed < base and g not in roles_of and faster(g, relaxed, base)
        out[g] = relaxed if narrow else base
    return out


def narrowest(cfg) -> int:
    """The narrowest width any channel group of more than that may reach under the recipe (`floors`):
    HARD_FLOOR, or a smaller `min_width`. The latency tables measure nothing narrower."""
    return min(cfg.min_width or HARD_FLOOR, HARD_FLOOR)


def lowest(units: dict[str, int], removed: dict[str, int], floor: dict[str, int], max_cut: float) -> dict[str, int]:
    """The narrowest width each group may reach at the next point: its floor, and no more than
    `max_cut` of its current width removed at once."""
    out = {}
    for g, u in units.items():
        keep = u - removed.get(g, 0)
        out[g] = min(keep, max(floor.get(g, 1), math.ceil(keep * (1.0 - max_cut) - 1e-9)))
    return out
