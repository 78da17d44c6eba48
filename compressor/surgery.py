"""Graph surgery: physically remove units (Dense neurons, Conv filters) from a tf-keras model.

Every structured pruning stage decides *which* units of a producer layer go; this module alone
knows *how* to take them out of the producer and out of everything that reads its channels
(BatchNormalization, pooling, Flatten, DepthwiseConv2D, residual Add, Concatenate, the next
Dense/Conv, ...), so that the smaller model computes the same function when the removed units
carried no signal.

How it works, in three steps:

1. Analysis. The model's layer graph is walked in topological order and every tensor gets a
   *channel layout*: which producer ("space") each position of its last axis comes from.
   Elementwise merges (Add, ...) couple the spaces of their inputs (union-find), Concatenate
   places spaces side by side, Flatten repeats the layout once per spatial position.
   Any space that reaches a layer we cannot reason about, or a model output, is *blocked*.
2. Planning. The caller's plan is normalised per coupled group (members of a residual group lose
   the same indices), blocked groups are skipped with a warning.
3. Rebuild. The model is cloned with adjusted `units`/`filters` (and Reshape targets) and every
   layer gets its old weights sliced to the kept positions; the input model is never touched.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from compressor._tf import keras

__all__ = [
    "SurgeryResult",
    "SurgeryWarning",
    "prunable_layers",
    "coupled_groups",
    "remove_units",
]

_L = keras.layers
_MODEL_INPUT = "<model input>"


class SurgeryWarning(UserWarning):
    """A planned removal was not (fully) carried out; the run continues."""


@dataclass
class SurgeryResult:
    """What `remove_units` did, per producer layer, for the stage's report."""

    units_before: dict[str, int] = field(default_factory=dict)
    units_after: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    # Adjustments that still removed units: plan intersected across a coupled group, last unit kept.
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def removed(self) -> dict[str, int]:
        """Units actually removed per producer (only those that lost any)."""
        return {
            name: self.units_before[name] - self.units_after[name]
            for name in self.units_before
            if self.units_after[name] < self.units_before[name]
        }


# --------------------------------------------------------------------------------------------
# Layer classification. Exact type matches: a user subclass of Dense may change `call`, so it is
# treated as unknown rather than trusted.

_PRODUCERS = {_L.Dense, _L.Conv1D, _L.Conv2D, _L.Conv3D, _L.SeparableConv1D, _L.SeparableConv2D}
_SEPARABLE = {_L.SeparableConv1D, _L.SeparableConv2D}
_DEPTHWISE = {_L.DepthwiseConv1D, _L.DepthwiseConv2D}
# Channel-preserving layer families, shared with the stages' observation rules (stages/scoring.py).
DROPOUT_LAYERS = (
    _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D,
    _L.GaussianNoise, _L.GaussianDropout, _L.AlphaDropout, _L.ActivityRegularization,
)
POOLING_LAYERS = (
    _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D,
    _L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D,
    _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D,
    _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
)
# Layers that act on every channel independently and with no per-channel parameters.
_PASS_THROUGH = {
    *DROPOUT_LAYERS, *POOLING_LAYERS,
    _L.ReLU, _L.LeakyReLU, _L.ELU, _L.ThresholdedReLU,
    _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D,
    _L.Cropping1D, _L.Cropping2D, _L.Cropping3D,
    _L.UpSampling1D, _L.UpSampling2D, _L.UpSampling3D,
    _L.RepeatVector,
}
_ELEMENTWISE_MERGES = {_L.Add, _L.Subtract, _L.Average, _L.Maximum, _L.Minimum}
# Activations that mix units: removing one changes the others.
_CROSS_UNIT_ACTIVATIONS = {"softmax", "log_softmax"}


def _is_known(kind) -> bool:
    return (
        kind in _PRODUCERS
        or kind in _DEPTHWISE
        or kind in _PASS_THROUGH
        or kind in _ELEMENTWISE_MERGES
        or kind
        in {_L.Activation, _L.BatchNormalization, _L.PReLU, _L.Flatten, _L.Reshape, _L.Concatenate}
    )


def _activation_name(layer) -> str:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear"
    return getattr(activation, "__name__", type(activation).__name__)


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


def _is_last_axis(axis, rank: int) -> bool:
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return False
        axis = axis[0]
    return axis == -1 or axis == rank - 1


def _unsupported_reason(layer) -> str | None:
    """Why a layer of a known type cannot be handled in this configuration (None if it can)."""
    kind = type(layer)
    if not _channels_last(layer):
        return "data_format channels_first"
    if kind in _PRODUCERS or kind in _DEPTHWISE:
        if getattr(layer, "groups", 1) != 1:
            return "grouped convolution"
    if kind is _L.Activation and _activation_name(layer) in _CROSS_UNIT_ACTIVATIONS:
        return f"activation {_activation_name(layer)} normalises across channels"
    return None


def _unit_count(layer) -> int:
    return int(layer.units if type(layer) is _L.Dense else layer.filters)


def _shape_of(shape) -> tuple:
    """A layer's input/output shape as a plain tuple (single-tensor layers only)."""
    if isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return tuple(shape)


# --------------------------------------------------------------------------------------------
# Channel layouts


@dataclass(frozen=True)
class _Segment:
    """`length` consecutive channels of one space, each repeated `inner` times in a row
    (DepthwiseConv with depth_multiplier m makes channel c occupy positions c*m..c*m+m-1)."""

    space: str
    length: int
    inner: int = 1
    # A layer with per-channel parameters on the way (BN, depthwise): merging is then inexact.
    touched_by: str | None = None

    @property
    def width(self) -> int:
        return self.length * self.inner


@dataclass(frozen=True)
class _Layout:
    """Last-axis layout: `outer` repetitions (spatial positions after Flatten) of the segments.
    After Flatten of (H, W, C) channel c of position (h, w) sits at (h*W + w)*C + c."""

    segments: tuple[_Segment, ...]
    outer: int = 1

    @property
    def block_width(self) -> int:
        return sum(seg.width for seg in self.segments)

    @property
    def width(self) -> int:
        return self.outer * self.block_width

    @property
    def spaces(self) -> set[str]:
        return {seg.space for seg in self.segments}

    def kept_positions(self, kept_of) -> np.ndarray:
        """Positions of the last axis that survive, given kept channel indices per space."""
        block = []
        offset = 0
        for seg in self.segments:
            kept = np.asarray(kept_of(seg.space), dtype=np.int64)
            block.append(offset + (kept[:, None] * seg.inner + np.arange(seg.inner)).ravel())
            offset += seg.width
        block = np.concatenate(block) if block else np.zeros(0, np.int64)
        return (np.arange(self.outer)[:, None] * self.block_width + block[None, :]).ravel()

    def merge_pairs(self, merges_of) -> list[tuple[int, int, _Segment]]:
        """(removed position, kept position, segment) for every folded unit, in input positions."""
        pairs = []
        offset = 0
        for seg in self.segments:
            for removed, kept in sorted(merges_of(seg.space).items()):
                for repeat in range(self.outer):
                    base = repeat * self.block_width + offset
                    for j in range(seg.inner):
                        removed_at = base + removed * seg.inner + j
                        pairs.append((removed_at, base + kept * seg.inner + j, seg))
            offset += seg.width
        return pairs

    def touched(self, layer_name: str) -> _Layout:
        segments = tuple(
            _Segment(s.space, s.length, s.inner, s.touched_by or layer_name) for s in self.segments
        )
        return _Layout(segments, self.outer)

    def times_inner(self, multiplier: int, layer_name: str) -> _Layout:
        segments = tuple(
            _Segment(s.space, s.length, s.inner * multiplier, s.touched_by or layer_name)
            for s in self.segments
        )
        return _Layout(segments, self.outer)

    def same_structure(self, other: _Layout) -> bool:
        return self.outer == other.outer and [(s.length, s.inner) for s in self.segments] == [
            (s.length, s.inner) for s in other.segments
        ]


def _opaque(space: str, width: int) -> _Layout:
    return _Layout((_Segment(space, max(int(width), 0)),))


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[root_b] = root_a


# --------------------------------------------------------------------------------------------
# Graph analysis


def _layer_graph(model) -> tuple[list, dict[str, list[str]], set[str], list[str]]:
    """Layers in topological order, their inbound layer names, the names of shared layers
    (called more than once: inbound then lists every call's sources) and the output layers."""
    if not model.built:
        raise ValueError("remove_units needs a built model (give it an input shape first).")
    if isinstance(model, keras.Sequential):
        layers = [layer for layer in model.layers if not isinstance(layer, _L.InputLayer)]
        inbound = {}
        previous = _MODEL_INPUT
        for layer in layers:
            inbound[layer.name] = [previous]
            previous = layer.name
        return layers, inbound, set(), [layers[-1].name]

    config = model.get_config()
    by_name = {layer.name: layer for layer in model.layers}
    inbound, shared = {}, set()
    for layer_config in config["layers"]:
        nodes = layer_config.get("inbound_nodes") or []
        if len(nodes) > 1:
            shared.add(layer_config["name"])
        inbound[layer_config["name"]] = [entry[0] for node in nodes for entry in node]
    # Topological order (model.layers usually already is; do not rely on it).
    order, done = [], set()
    pending = [layer_config["name"] for layer_config in config["layers"]]
    while pending:
        ready = [name for name in pending if all(src in done for src in inbound[name])]
        if not ready:
            raise ValueError(f"cannot order the layer graph (cycle near {pending[:3]})")
        for name in ready:
            order.append(by_name[name])
            done.add(name)
            pending.remove(name)
    outputs = [entry[0] for entry in config["output_layers"]]
    return order, inbound, shared, outputs


@dataclass
class _Analysis:
    layers: dict[str, object]
    order: list[str]
    producers: dict[str, int]  # name -> unit count, in model order
    input_layouts: dict[str, list[_Layout]]  # layers understood -> layouts of their inputs
    uf: _UnionFind
    blocked: dict[str, str]  # space -> reason (naming the blocking layer)
    reshape_kind: dict[str, str]  # Reshape layer name -> "keep_last" | "flat"
    space_width: dict[str, int] = field(default_factory=dict)  # channels of each space

    def root(self, space: str) -> str:
        return self.uf.find(space)

    @functools.cached_property
    def group_members(self) -> dict[str, list[str]]:
        """Root -> every space in its group (producers and opaque sources), in model order."""
        members: dict[str, list[str]] = {}
        for space in self.uf.parent:
            members.setdefault(self.root(space), []).append(space)
        rank = {name: i for i, name in enumerate(self.order)}
        for spaces in members.values():
            spaces.sort(key=lambda s: rank.get(s, -1))
        return members

    def block_reason(self, producer: str) -> str | None:
        """Why this producer must keep its units: its own reason, else a coupled member's."""
        if producer in self.blocked:
            return self.blocked[producer]
        root = self.root(producer)
        for space in self.group_members[root]:
            if space in self.blocked:
                return f"coupled with '{space}', whose channels are kept: {self.blocked[space]}"
        return None


def _analyze(model) -> _Analysis:
    layers, inbound, shared, outputs = _layer_graph(model)
    analysis = _Analysis(
        layers={layer.name: layer for layer in layers},
        order=[layer.name for layer in layers],
        producers={},
        input_layouts={},
        uf=_UnionFind(),
        blocked={},
        reshape_kind={},
    )
    output_layouts: dict[str, _Layout] = {}

    def block(layout_list, reason):
        for layout in layout_list:
            for space in layout.spaces:
                analysis.blocked.setdefault(space, reason)

    def input_layout_of(source: str, width: int) -> _Layout:
        if source == _MODEL_INPUT:
            analysis.uf.find(_MODEL_INPUT)
            analysis.blocked.setdefault(_MODEL_INPUT, "channels come from the model input")
            return _opaque(_MODEL_INPUT, width)
        return output_layouts[source]

    for layer in layers:
        name = layer.name
        kind = type(layer)
        sources = inbound[name]

        if kind is _L.InputLayer:
            space = f"<input {name}>"
            analysis.uf.find(space)
            analysis.blocked[space] = f"channels come from model input '{name}'"
            output_layouts[name] = _opaque(space, _last_dim(layer.output_shape))
            continue

        if name in shared:
            # Its weights serve several call sites: do not reason about it.
            block(
                [output_layouts[src] for src in sources if src in output_layouts],
                f"consumed by shared layer '{name}' ({kind.__name__}, called more than once)",
            )
            output_layouts[name] = _opaque_output(analysis, layer, [], "shared layer")
            continue

        if not _is_known(kind):
            # Do not even ask for its input shapes: nested or keyword inputs may not have one.
            block(
                [output_layouts[src] for src in sources if src in output_layouts],
                f"consumed by unsupported layer '{name}' ({kind.__name__})",
            )
            output_layouts[name] = _opaque_output(analysis, layer, [], "unsupported")
            continue

        input_shapes = layer.input_shape
        if len(sources) == 1:
            input_shapes = [input_shapes]
        in_layouts = [
            input_layout_of(src, _last_dim(shape)) for src, shape in zip(sources, input_shapes)
        ]

        # A derived layout must agree with the real tensor width (it may not, e.g. for the 2nd
        # output of a multi-output layer): otherwise treat that input as an unknown source.
        for position, shape in enumerate(input_shapes):
            if in_layouts[position].width != _last_dim(shape):
                block([in_layouts[position]], f"channel layout mismatch at '{name}'")
                space = f"<input {position} of {name}>"
                analysis.uf.find(space)
                analysis.blocked[space] = f"input {position} of '{name}' is not understood"
                in_layouts[position] = _opaque(space, _last_dim(shape))

        reason = _unsupported_reason(layer)
        out = None
        if reason is not None:
            block(in_layouts, f"consumed by '{name}' ({kind.__name__}: {reason})")
        elif kind in _PRODUCERS:
            units = _unit_count(layer)
            analysis.producers[name] = units
            analysis.uf.find(name)
            if _activation_name(layer) in _CROSS_UNIT_ACTIVATIONS:
                analysis.blocked[name] = (
                    f"'{name}' has activation {_activation_name(layer)}, which mixes its units"
                )
            out = _Layout((_Segment(name, units),))
        elif kind in _PASS_THROUGH:
            out = in_layouts[0]
        elif kind is _L.Activation:
            out = in_layouts[0]
        elif kind is _L.BatchNormalization:
            if _is_last_axis(layer.axis, len(input_shapes[0])):
                out = in_layouts[0].touched(name)
            else:
                block(in_layouts, f"consumed by '{name}' (BatchNormalization not on channel axis)")
        elif kind is _L.PReLU:
            out = in_layouts[0].touched(name)
        elif kind in _DEPTHWISE:
            out = in_layouts[0].times_inner(int(layer.depth_multiplier), name)
        elif kind is _L.Flatten:
            out = _flattened(in_layouts[0], input_shapes[0])
            if out is None:
                block(in_layouts, f"consumed by '{name}' (Flatten of unknown spatial size)")
        elif kind is _L.Reshape:
            out, reshape_kind = _reshaped(in_layouts[0], input_shapes[0], layer.target_shape)
            if out is None:
                block(in_layouts, f"consumed by '{name}' (Reshape that moves channels)")
            else:
                analysis.reshape_kind[name] = reshape_kind
        elif kind in _ELEMENTWISE_MERGES:
            first = in_layouts[0]
            if all(first.same_structure(other) for other in in_layouts[1:]):
                for other in in_layouts[1:]:
                    for seg_a, seg_b in zip(first.segments, other.segments):
                        analysis.uf.union(seg_a.space, seg_b.space)
                touched = next(
                    (s.touched_by for lay in in_layouts for s in lay.segments if s.touched_by), None
                )
                out = first.touched(touched) if touched else first
            else:
                block(in_layouts, f"consumed by '{name}' ({kind.__name__} of different layouts)")
        elif kind is _L.Concatenate:
            rank = len(input_shapes[0])
            if _is_last_axis(layer.axis, rank) and all(lay.outer == 1 for lay in in_layouts):
                out = _Layout(tuple(seg for lay in in_layouts for seg in lay.segments))
            else:
                block(in_layouts, f"consumed by '{name}' (Concatenate off the channel axis)")

        if out is None:
            out = _opaque_output(analysis, layer, in_layouts, "unsupported")
        else:
            analysis.input_layouts[name] = in_layouts  # only for layers the rebuild may slice
        output_layouts[name] = out

    for layout in list(output_layouts.values()) + [
        lay for lays in analysis.input_layouts.values() for lay in lays
    ]:
        for seg in layout.segments:
            analysis.space_width.setdefault(seg.space, seg.length)
    for name in outputs:
        reason = "is a model output" if name in analysis.producers else (
            f"reaches model output '{name}'"
        )
        for space in output_layouts[name].spaces:
            analysis.blocked.setdefault(space, reason)
    return analysis


def _last_dim(shape) -> int:
    shape = _shape_of(shape)
    return int(shape[-1]) if shape and shape[-1] is not None else -1


def _opaque_output(analysis: _Analysis, layer, in_layouts, why: str) -> _Layout:
    """A fresh space nobody may prune: the output of a layer we do not understand."""
    space = f"<output {layer.name}>"
    analysis.uf.find(space)
    analysis.blocked[space] = f"channels come from '{layer.name}' ({why})"
    try:
        width = _last_dim(layer.output_shape)
    except (AttributeError, RuntimeError, ValueError, TypeError):
        width = -1
    return _opaque(space, width)


def _flattened(layout: _Layout, input_shape) -> _Layout | None:
    spatial = _shape_of(input_shape)[1:-1]
    if any(dim is None for dim in spatial):
        return None
    return _Layout(layout.segments, layout.outer * math.prod(spatial))


def _reshaped(layout: _Layout, input_shape, target_shape) -> tuple[_Layout | None, str]:
    """Reshape keeps the channel mapping if it keeps the last axis, or flattens everything."""
    in_dims = _shape_of(input_shape)[1:]
    target = tuple(target_shape)
    if layout.outer == 1 and len(target) >= 1 and target[-1] == in_dims[-1]:
        return layout, "keep_last"
    if len(target) == 1:
        flat = _flattened(layout, input_shape)
        return flat, "flat"
    return None, ""


# --------------------------------------------------------------------------------------------
# Public inspection API


def prunable_layers(model) -> dict[str, int]:
    """Producer layers whose units can be removed (every consumer path supported, not feeding a
    model output directly or through shape-preserving layers), name -> unit count.

    A stage should only score these; anything else would be skipped by `remove_units`.
    """
    analysis = _analyze(model)
    return {
        name: units
        for name, units in analysis.producers.items()
        if analysis.block_reason(name) is None
    }


def coupled_groups(model) -> list[list[str]]:
    """Groups of producer layer names whose channels are coupled (through a residual Add etc.) and
    must lose the same indices, in model order. Singletons included; blocked producers too (use
    `prunable_layers` to know which groups may shrink)."""
    analysis = _analyze(model)
    groups = []
    for spaces in analysis.group_members.values():
        producers = [space for space in spaces if space in analysis.producers]
        if producers:
            groups.append(producers)
    rank = {name: i for i, name in enumerate(analysis.order)}
    groups.sort(key=lambda group: rank[group[0]])
    return groups


# --------------------------------------------------------------------------------------------
# Planning


def _as_index_set(name: str, indices: Iterable[int], units: int) -> set[int]:
    result = set()
    for index in indices:
        index = int(index)
        if not 0 <= index < units:
            raise ValueError(f"unit index {index} out of range for '{name}' ({units} units)")
        result.add(index)
    return result


def _plan_groups(
    analysis: _Analysis,
    plan: dict[str, Iterable[int]],
    merge: dict[str, dict[int, int]],
    result: SurgeryResult,
) -> tuple[dict[str, np.ndarray], dict[str, dict[int, int]]]:
    """Per group root: kept channel indices, and {removed: kept} folds to apply at consumers."""
    for name in list(plan) + list(merge):
        if name not in analysis.layers:
            raise ValueError(f"plan names '{name}', which is not a layer of the model")
        if name not in analysis.producers:
            kind = type(analysis.layers[name]).__name__
            raise ValueError(
                f"plan names '{name}' ({kind}), which is not a Dense/Conv/SeparableConv producer"
            )

    requested: dict[str, dict[str, set[int]]] = {}  # root -> member -> removal set
    folds: dict[str, dict[int, int]] = {}  # root -> removed -> kept
    for name, indices in plan.items():
        units = analysis.producers[name]
        requested.setdefault(analysis.root(name), {})[name] = _as_index_set(name, indices, units)
    for name, pairs in merge.items():
        units = analysis.producers[name]
        root = analysis.root(name)
        group_folds = folds.setdefault(root, {})
        for removed, kept in pairs.items():
            removed, kept = int(removed), int(kept)
            _as_index_set(name, (removed, kept), units)
            if removed == kept:
                raise ValueError(f"merge for '{name}' folds unit {removed} onto itself")
            if group_folds.get(removed, kept) != kept:
                raise ValueError(f"merge folds unit {removed} of group of '{name}' onto two units")
            group_folds[removed] = kept

    kept_by_root: dict[str, np.ndarray] = {}
    folds_by_root: dict[str, dict[int, int]] = {}
    for root in set(requested) | set(folds):
        members = [s for s in analysis.group_members[root] if s in analysis.producers]
        units = analysis.producers[members[0]]
        asked = requested.get(root, {})
        group_folds = folds.get(root, {})
        named = list(asked) + [m for m in merge if analysis.root(m) == root and m not in asked]
        if not group_folds and not any(asked.values()):
            continue  # nothing to remove in this group

        reason = analysis.block_reason(members[0])  # any member's reason blocks the group
        if reason is not None:
            for member in members:
                member_reason = analysis.block_reason(member) or reason
                result.skipped[member] = member_reason
                if member in named:
                    warnings.warn(
                        f"surgery: units of '{member}' are kept: {member_reason}",
                        SurgeryWarning,
                        stacklevel=3,
                    )
            continue

        removal_sets = list(asked.values())
        removal = set.intersection(*removal_sets) if removal_sets else set()
        if len(removal_sets) > 1 and any(s != removal for s in removal_sets):
            note = (
                f"coupled group {members} got different plans; removed their intersection "
                f"({len(removal)} units)"
            )
            for member in members:
                result.notes[member] = note
            warnings.warn(f"surgery: {note}", SurgeryWarning, stacklevel=3)
        removal |= set(group_folds)
        bad_targets = sorted(kept for kept in group_folds.values() if kept in removal)
        if bad_targets:
            raise ValueError(f"merge targets {bad_targets} of '{members[0]}' are removed too")
        if len(removal) >= units:
            survivor = min(removal)
            removal.discard(survivor)
            note = f"plan removed all {units} units; kept unit {survivor}"
            for member in members:
                result.notes[member] = note
            warnings.warn(f"surgery: {members}: {note}", SurgeryWarning, stacklevel=3)
        kept_by_root[root] = np.array(sorted(set(range(units)) - removal), dtype=np.int64)
        folds_by_root[root] = group_folds
    return kept_by_root, folds_by_root


# --------------------------------------------------------------------------------------------
# Rebuild


def _take(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    if len(positions) == array.shape[axis] and np.array_equal(positions, np.arange(len(positions))):
        return array
    return np.take(array, positions, axis=axis)


def _expand(positions: np.ndarray, multiplier: int) -> np.ndarray:
    """Input positions -> rows of a tensor with `multiplier` entries per input channel."""
    return (positions[:, None] * multiplier + np.arange(multiplier)).ravel()


def _fold_rows(kernel: np.ndarray, pairs, axis: int, multiplier: int = 1) -> np.ndarray:
    """Add the rows that read a removed unit onto the rows that read its kept twin."""
    if not pairs:
        return kernel
    kernel = np.moveaxis(kernel.copy(), axis, 0)
    for removed, kept, _segment in pairs:
        for j in range(multiplier):
            kernel[kept * multiplier + j] += kernel[removed * multiplier + j]
    return np.moveaxis(kernel, 0, axis)


def _short_name(variable) -> str:
    return variable.name.split("/")[-1].split(":")[0]


def _sliced_weights(layer, in_positions, in_pairs, out_kept) -> list[np.ndarray]:
    """The layer's weights restricted to the kept input positions and output units."""
    kind = type(layer)
    new_weights = []
    for variable in layer.weights:
        value = variable.numpy()
        short = _short_name(variable)
        if kind in _PRODUCERS and kind not in _SEPARABLE:
            if short == "kernel":
                value = _fold_rows(value, in_pairs, axis=-2)
                value = _take(value, in_positions, axis=-2)
                value = _take(value, out_kept, axis=-1)
            elif short == "bias":
                value = _take(value, out_kept, axis=0)
        elif kind in _SEPARABLE:
            multiplier = int(layer.depth_multiplier)
            if short == "depthwise_kernel":
                value = _take(value, in_positions, axis=-2)
            elif short == "pointwise_kernel":
                value = _fold_rows(value, in_pairs, axis=-2, multiplier=multiplier)
                value = _take(value, _expand(in_positions, multiplier), axis=-2)
                value = _take(value, out_kept, axis=-1)
            elif short == "bias":
                value = _take(value, out_kept, axis=0)
        elif kind in _DEPTHWISE:
            multiplier = int(layer.depth_multiplier)
            if short == "depthwise_kernel":
                value = _take(value, in_positions, axis=-2)
            elif short == "bias":
                value = _take(value, _expand(in_positions, multiplier), axis=0)
        elif kind is _L.BatchNormalization:
            value = _take(value, in_positions, axis=0)
        elif kind is _L.PReLU:
            if value.shape[-1] != 1:
                value = _take(value, in_positions, axis=-1)
        new_weights.append(value)
    return new_weights


def _compile_like(new_model, model) -> None:
    """Compile with a fresh copy of the original optimizer, its loss and metrics (best effort)."""
    if getattr(model, "optimizer", None) is None or getattr(model, "compiled_loss", None) is None:
        return
    optimizer = type(model.optimizer).from_config(model.optimizer.get_config())
    compiled_metrics = getattr(model, "compiled_metrics", None)

    def fresh(metrics):
        if metrics is None:
            return None
        if isinstance(metrics, (list, tuple)):
            return [fresh(m) for m in metrics]
        if isinstance(metrics, dict):
            return {k: fresh(m) for k, m in metrics.items()}
        if isinstance(metrics, keras.metrics.Metric):
            return type(metrics).from_config(metrics.get_config())
        return metrics

    metrics = fresh(getattr(compiled_metrics, "_user_metrics", None))
    weighted = fresh(getattr(compiled_metrics, "_user_weighted_metrics", None))
    new_model.compile(
        optimizer=optimizer,
        loss=model.loss,
        metrics=metrics,
        weighted_metrics=weighted,
        loss_weights=getattr(model.compiled_loss, "_user_loss_weights", None),
    )


def remove_units(
    model,
    plan: dict[str, Iterable[int]],
    merge: dict[str, dict[int, int]] | None = None,
) -> tuple[keras.Model, SurgeryResult]:
    """Return a NEW model without the planned units; the input model is not modified.

    plan: producer layer name -> indices of units to remove (last axis of a Dense/Conv kernel;
        for SeparableConv the pointwise filters). Members of a coupled group (residual Add) lose
        the same indices: a set named for one member applies to all, different sets are
        intersected (noted in `result.notes`).
    merge: optional producer -> {removed_unit: kept_unit}. Before removal the removed unit's
        consumer input weights are added onto the kept unit's, which preserves the output when
        both units' activations are equal at the consumer. Removed units in `merge` are removed
        even if not in `plan`. Exact only when nothing with per-channel parameters (BN,
        DepthwiseConv, SeparableConv's depthwise step) sits between them and the consumer;
        otherwise a SurgeryWarning says it is an approximation.

    Producers that cannot shrink (unsupported consumer, model output, coupled to the input) keep
    their units; they are listed in `result.skipped` and a SurgeryWarning names the blocking
    layer. At least one unit of every layer is kept. If `model` was compiled, the new model is
    compiled with a fresh optimizer of the same config, the same loss and metrics; otherwise
    compiling is left to the caller.
    """
    merge = dict(merge or {})
    analysis = _analyze(model)
    result = SurgeryResult()
    kept_by_root, folds_by_root = _plan_groups(analysis, dict(plan), merge, result)

    def kept_of(space: str) -> np.ndarray:
        root = analysis.root(space)
        if root in kept_by_root:
            return kept_by_root[root]
        return np.arange(analysis.space_width[space], dtype=np.int64)

    def merges_of(space: str) -> dict[int, int]:
        return folds_by_root.get(analysis.root(space), {})

    for name, units in analysis.producers.items():
        result.units_before[name] = units
        result.units_after[name] = len(kept_of(name))

    new_configs, new_weights = {}, {}
    warned_inexact = set()
    for name in analysis.order:
        layer = analysis.layers[name]
        kind = type(layer)
        has_channel_weights = kind in _PRODUCERS | _DEPTHWISE | {_L.BatchNormalization, _L.PReLU}
        if not has_channel_weights or name not in analysis.input_layouts:
            continue
        layout = analysis.input_layouts[name][0]
        in_positions = layout.kept_positions(kept_of)
        in_pairs = layout.merge_pairs(merges_of) if kind in _PRODUCERS else []
        out_kept = kept_of(name) if kind in _PRODUCERS else None
        for _removed, _kept, segment in in_pairs:
            culprit = segment.touched_by or (name if kind in _SEPARABLE else None)
            if culprit and (segment.space, name) not in warned_inexact:
                warned_inexact.add((segment.space, name))
                warnings.warn(
                    f"surgery: merging units of '{segment.space}' is approximate at '{name}': "
                    f"channels pass through per-channel parameters of '{culprit}'",
                    SurgeryWarning,
                    stacklevel=2,
                )
        changed = len(in_positions) != layout.width or in_pairs or (
            out_kept is not None and len(out_kept) != analysis.producers[name]
        )
        if not changed:
            continue
        new_weights[name] = _sliced_weights(layer, in_positions, in_pairs, out_kept)
        if kind in _PRODUCERS:
            config = layer.get_config()
            config["units" if kind is _L.Dense else "filters"] = len(out_kept)
            new_configs[name] = config

    for name, reshape_kind in analysis.reshape_kind.items():
        layout = analysis.input_layouts[name][0]
        new_width = len(layout.kept_positions(kept_of))
        if new_width == layout.width:
            continue
        config = analysis.layers[name].get_config()
        target = list(config["target_shape"])
        if reshape_kind == "keep_last":
            target[-1] = new_width
        elif target[0] != -1:
            spatial = math.prod(_shape_of(analysis.layers[name].input_shape)[1:-1])
            target[0] = spatial * new_width
        config["target_shape"] = tuple(target)
        new_configs[name] = config

    def rebuild_layer(layer):
        try:
            config = new_configs.get(layer.name) or layer.get_config()
            rebuilt = type(layer).from_config(config)
        except Exception as error:  # any failure here is the layer's config round trip
            raise ValueError(
                f"surgery cannot rebuild layer '{layer.name}' ({type(layer).__name__}) from its "
                f"config: {error}. Give the layer a get_config() that round-trips."
            ) from error
        if rebuilt.name != layer.name:
            # A custom get_config without `name`: keep the name, stages find layers by it.
            rebuilt._name = layer.name
        return rebuilt

    new_model = keras.models.clone_model(model, clone_function=rebuild_layer)
    if not new_model.built:
        new_model.build(model.input_shape)
    for layer in model.layers:
        target = new_model.get_layer(layer.name)
        if layer.name in new_weights:
            target.set_weights(new_weights[layer.name])
        else:
            target.set_weights(layer.get_weights())
    _compile_like(new_model, model)
    return new_model, result

