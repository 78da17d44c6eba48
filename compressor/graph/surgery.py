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
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from compressor.core._tf import keras
from compressor.layers import Blocked, Cut, handler_for
from compressor.layers.layout import Layout as _Layout
from compressor.layers.layout import opaque as _opaque

__all__ = [
    "ModelGraph",
    "model_graph",
    "SurgeryResult",
    "SurgeryWarning",
    "prunable_layers",
    "coupled_groups",
    "shrink_reasons",
    "remove_units",
]

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


def _shape_of(shape) -> tuple:
    """A layer's input/output shape as a plain tuple (single-tensor layers only)."""
    if isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return tuple(shape)


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


@dataclass
class ModelGraph:
    """A functional or Sequential model's layer graph, read from its config."""

    order: list  # layers in topological order
    inbound: dict[str, list[str]]  # positional input sources of each layer
    keyword: dict[str, list[str]]  # sources passed as keyword tensors (attention's value/key)
    shared: set[str]  # layers called more than once (inbound then lists every call's sources)
    outputs: list[str]

    @functools.cached_property
    def consumers(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {layer.name: [] for layer in self.order}
        found.setdefault(_MODEL_INPUT, [])
        for layer in self.order:
            for src in self.inbound[layer.name] + self.keyword[layer.name]:
                if layer.name not in found[src]:
                    found[src].append(layer.name)
        return found


def _keyword_sources(entry) -> list[str]:
    kwargs = entry[3] if len(entry) > 3 and isinstance(entry[3], dict) else {}
    return [v[0] for v in kwargs.values() if isinstance(v, (list, tuple)) and len(v) == 3 and isinstance(v[0], str)]


def model_graph(model) -> ModelGraph:
    """The layer graph every analysis walks (surgery, the stages' scoring, the align step)."""
    if not model.built:
        raise ValueError("remove_units needs a built model (give it an input shape first).")
    if isinstance(model, keras.Sequential):
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        sources = [_MODEL_INPUT] + [layer.name for layer in layers[:-1]]
        return ModelGraph(layers, {layer.name: [src] for layer, src in zip(layers, sources)},
                          {layer.name: [] for layer in layers}, set(), [layers[-1].name])

    config = model.get_config()
    by_name = {layer.name: layer for layer in model.layers}
    inbound, keyword, shared = {}, {}, set()
    for layer_config in config["layers"]:
        nodes = layer_config.get("inbound_nodes") or []
        if len(nodes) > 1:
            shared.add(layer_config["name"])
        # A TFOpLambda node is a single entry ["source", 0, 0, {kwargs}] instead of a list of entries.
        entries = [entry for node in nodes for entry in ([node] if isinstance(node[0], str) else node)]
        inbound[layer_config["name"]] = [entry[0] for entry in entries]
        keyword[layer_config["name"]] = [src for entry in entries for src in _keyword_sources(entry)]
    # Topological order (model.layers usually already is; do not rely on it).
    order, done = [], set()
    pending = [layer_config["name"] for layer_config in config["layers"]]
    while pending:
        ready = [name for name in pending if all(src in done for src in inbound[name] + keyword[name])]
        if not ready:
            raise ValueError(f"cannot order the layer graph (cycle near {pending[:3]})")
        for name in ready:
            order.append(by_name[name])
            done.add(name)
            pending.remove(name)
    outputs = [entry[0] for entry in config["output_layers"]]
    return ModelGraph(order, inbound, keyword, shared, outputs)


@dataclass
class _Analysis:
    """Channel spaces of every tensor, their couplings and why blocked ones must keep their units.
    It is the GraphView handlers talk to while propagating layouts."""

    layers: dict[str, object]
    order: list[str]
    producers: dict[str, int] = field(default_factory=dict)  # name -> unit count, in model order
    input_layouts: dict[str, list[_Layout]] = field(default_factory=dict)  # layers the rebuild may cut
    uf: _UnionFind = field(default_factory=_UnionFind)
    blocked: dict[str, str] = field(default_factory=dict)  # space -> reason (naming the blocking layer)
    space_width: dict[str, int] = field(default_factory=dict)  # channels of each space

    def root(self, space: str) -> str:
        return self.uf.find(space)

    # --- GraphView
    def add_producer(self, name: str, units: int) -> None:
        self.producers[name] = units
        self.uf.find(name)
        self.space_width[name] = units

    def block_space(self, space: str, reason: str) -> None:
        self.uf.find(space)
        self.blocked.setdefault(space, reason)

    def couple(self, a: str, b: str) -> None:
        self.uf.union(a, b)

    def fresh_output(self, layer, reason: str) -> _Layout:
        """A fresh space nobody may prune: an output whose channels we do not reason about."""
        space = f"<output {layer.name}>"
        self.block_space(space, f"channels come from '{layer.name}' ({reason})")
        try:
            width = _last_dim(layer.output_shape)
        except (AttributeError, RuntimeError, ValueError, TypeError):
            width = -1
        return _opaque(space, width)

    def block(self, layouts, reason: str) -> None:
        for layout in layouts:
            for space in layout.spaces:
                self.block_space(space, reason)

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
    graph = model_graph(model)
    analysis = _Analysis(layers={layer.name: layer for layer in graph.order},
                         order=[layer.name for layer in graph.order])
    output_layouts: dict[str, _Layout] = {}
    for layer in graph.order:
        output_layouts[layer.name] = _layer_output(analysis, graph, layer, output_layouts)
    for layout in list(output_layouts.values()) + [lay for lays in analysis.input_layouts.values() for lay in lays]:
        for seg in layout.segments:
            analysis.space_width.setdefault(seg.space, seg.length)
    for name in graph.outputs:
        reason = "is a model output" if name in analysis.producers else f"reaches model output '{name}'"
        for space in output_layouts[name].spaces:
            analysis.blocked.setdefault(space, reason)
    return analysis


def _layer_output(analysis: _Analysis, graph: ModelGraph, layer, output_layouts: dict[str, _Layout]) -> _Layout:
    """The layout of one layer's output, from its handler; its inputs blocked where it cannot carry them."""
    name, kind, sources = layer.name, type(layer), graph.inbound[layer.name]
    handler = handler_for(layer)
    if isinstance(layer, keras.layers.InputLayer):
        space = f"<input {name}>"
        analysis.block_space(space, f"channels come from model input '{name}'")
        return _opaque(space, _last_dim(layer.output_shape))
    # Keyword tensors (attention's value/key) are read whole: never cut them.
    analysis.block([output_layouts[src] for src in graph.keyword[name] if src in output_layouts],
                   f"read by '{name}' ({kind.__name__}) as a keyword input")
    if name in graph.shared:
        why, label = "shared layer", f"shared layer '{name}' ({kind.__name__}, called more than once)"
    elif handler is None:
        why, label = "unsupported", f"unsupported layer '{name}' ({kind.__name__})"
    else:
        why = handler.check(layer)
        label = f"'{name}' ({kind.__name__}: {why})"
    if why is not None:
        # Do not even ask for its input shapes: nested or keyword inputs may not have one.
        analysis.block([output_layouts[src] for src in sources if src in output_layouts], f"consumed by {label}")
        return analysis.fresh_output(layer, why)
    input_shapes = layer.input_shape
    if len(sources) == 1:
        input_shapes = [input_shapes]
    input_shapes = [_shape_of(shape) for shape in input_shapes]
    in_layouts = _input_layouts(analysis, name, sources, input_shapes, output_layouts)
    try:
        out = handler.propagate(layer, in_layouts, input_shapes, analysis)
        analysis.input_layouts[name] = in_layouts  # only for layers the rebuild may slice
        return out
    except Blocked as blocked:
        analysis.block(in_layouts, f"consumed by '{name}' ({kind.__name__}: {blocked})")
        return analysis.fresh_output(layer, f"{kind.__name__}: {blocked}")


def _input_layouts(analysis: _Analysis, name: str, sources: list[str], input_shapes: list[tuple],
                   output_layouts: dict[str, _Layout]) -> list[_Layout]:
    """The layouts a layer reads. A derived layout must agree with the real tensor width (it may not,
    e.g. for the 2nd output of a multi-output layer): otherwise that input is an unknown source."""
    layouts = []
    for source, shape in zip(sources, input_shapes):
        if source == _MODEL_INPUT:
            analysis.block_space(_MODEL_INPUT, "channels come from the model input")
            layouts.append(_opaque(_MODEL_INPUT, _last_dim(shape)))
        else:
            layouts.append(output_layouts[source])
    for position, shape in enumerate(input_shapes):
        if layouts[position].width != _last_dim(shape):
            analysis.block([layouts[position]], f"channel layout mismatch at '{name}'")
            space = f"<input {position} of {name}>"
            analysis.block_space(space, f"input {position} of '{name}' is not understood")
            layouts[position] = _opaque(space, _last_dim(shape))
    return layouts


def _last_dim(shape) -> int:
    shape = _shape_of(shape)
    return int(shape[-1]) if shape and shape[-1] is not None else -1


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


def shrink_reasons(model) -> dict[str, dict]:
    """Per producer: the producers it must shrink with, and why it cannot shrink (None if it can).
    The report shows this so a user sees why a layer kept its width."""
    analysis = _analyze(model)
    rows = {}
    for name in analysis.producers:
        group = [s for s in analysis.group_members[analysis.root(name)] if s in analysis.producers and s != name]
        rows[name] = {"coupled_with": group, "kept_because": analysis.block_reason(name)}
    return rows


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


def _check_plan_names(analysis: _Analysis, names: list[str]) -> None:
    for name in names:
        if name not in analysis.layers:
            raise ValueError(f"plan names '{name}', which is not a layer of the model")
        if name not in analysis.producers:
            kind = type(analysis.layers[name]).__name__
            raise ValueError(f"plan names '{name}' ({kind}), which is not a producer of removable units "
                             "(Dense, Conv, SeparableConv, attention heads, Embedding)")


def _plan_groups(
    analysis: _Analysis,
    plan: dict[str, Iterable[int]],
    merge: dict[str, dict[int, int]],
    result: SurgeryResult,
) -> tuple[dict[str, np.ndarray], dict[str, dict[int, int]]]:
    """Per group root: kept channel indices, and {removed: kept} folds to apply at consumers."""
    _check_plan_names(analysis, list(plan) + list(merge))
    requested, folds = _requests(analysis, plan, merge)
    kept_by_root: dict[str, np.ndarray] = {}
    folds_by_root: dict[str, dict[int, int]] = {}
    for root in set(requested) | set(folds):
        members = [s for s in analysis.group_members[root] if s in analysis.producers]
        asked = requested.get(root, {})
        group_folds = folds.get(root, {})
        named = list(asked) + [m for m in merge if analysis.root(m) == root and m not in asked]
        if not group_folds and not any(asked.values()):
            continue  # nothing to remove in this group
        kept = _group_kept(analysis, members, asked, group_folds, named, result)
        if kept is not None:
            kept_by_root[root] = kept
            folds_by_root[root] = group_folds
    return kept_by_root, folds_by_root


def _requests(analysis: _Analysis, plan, merge) -> tuple[dict[str, dict[str, set[int]]], dict[str, dict[int, int]]]:
    """The plan and merge by group root: root -> member -> removal set, and root -> removed -> kept."""
    requested: dict[str, dict[str, set[int]]] = {}
    folds: dict[str, dict[int, int]] = {}
    for name, indices in plan.items():
        units = analysis.producers[name]
        requested.setdefault(analysis.root(name), {})[name] = _as_index_set(name, indices, units)
    for name, pairs in merge.items():
        units = analysis.producers[name]
        group_folds = folds.setdefault(analysis.root(name), {})
        for removed, kept in pairs.items():
            removed, kept = int(removed), int(kept)
            _as_index_set(name, (removed, kept), units)
            if removed == kept:
                raise ValueError(f"merge for '{name}' folds unit {removed} onto itself")
            if group_folds.get(removed, kept) != kept:
                raise ValueError(f"merge folds unit {removed} of group of '{name}' onto two units")
            group_folds[removed] = kept
    return requested, folds


def _group_kept(analysis: _Analysis, members: list[str], asked: dict[str, set[int]], group_folds: dict[int, int],
                named: list[str], result: SurgeryResult) -> np.ndarray | None:
    """The units one coupled group keeps, or None when a member's reason blocks the whole group."""
    units = analysis.producers[members[0]]
    reason = analysis.block_reason(members[0])  # any member's reason blocks the group
    if reason is not None:
        for member in members:
            member_reason = analysis.block_reason(member) or reason
            result.skipped[member] = member_reason
            if member in named:
                warnings.warn(f"surgery: units of '{member}' are kept: {member_reason}", SurgeryWarning, stacklevel=4)
        return None
    removal_sets = list(asked.values())
    removal = set.intersection(*removal_sets) if removal_sets else set()
    if len(removal_sets) > 1 and any(s != removal for s in removal_sets):
        note = f"coupled group {members} got different plans; removed their intersection ({len(removal)} units)"
        for member in members:
            result.notes[member] = note
        warnings.warn(f"surgery: {note}", SurgeryWarning, stacklevel=4)
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
        warnings.warn(f"surgery: {members}: {note}", SurgeryWarning, stacklevel=4)
    return np.array(sorted(set(range(units)) - removal), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Rebuild


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


def _cuts(analysis: _Analysis, kept_of, merges_of, merge_exact: bool = False) -> tuple[dict, dict]:
    """New configs and weights of every layer the plan changes, from each family's handler."""
    new_configs, new_weights = {}, {}
    warned_inexact = set()
    for name, layouts in analysis.input_layouts.items():
        layer = analysis.layers[name]
        handler = handler_for(layer)
        producer = name in analysis.producers
        cut = Cut(layouts, [layout.kept_positions(kept_of) for layout in layouts],
                  layouts[0].merge_pairs(merges_of) if producer and handler.units_on_output else [],
                  kept_of(name) if producer else None, analysis.producers.get(name))
        for _removed, _kept, segment in cut.pairs:
            culprit = segment.touched_by or (None if handler.exact_fold else name)
            if culprit and not merge_exact and (segment.space, name) not in warned_inexact:
                warned_inexact.add((segment.space, name))
                warnings.warn(
                    f"surgery: merging units of '{segment.space}' is approximate at '{name}': "
                    f"channels pass through per-channel parameters of '{culprit}'",
                    SurgeryWarning,
                    stacklevel=3,
                )
        if not cut.changed:
            continue
        config, weights = handler.resize(layer, cut)
        if config is not None:
            new_configs[name] = config
        if weights is not None:
            new_weights[name] = weights
    return new_configs, new_weights


def _zero_initialized(layer, config: dict) -> tuple[dict, dict]:
    """The config with its initializers set to zeros, and the layer's own to restore after the build:
    every weight is overwritten right after, and drawing random kernels for a model of 20 M
    parameters took about half of its rebuild. Only keys the layer keeps as attributes of the same
    name are changed, so what is restored is what the layer's get_config() reads."""
    keys = [key for key, value in config.items()  # a read-only property (an RNN's, read off its cell) is left
            if key.endswith("_initializer") and value is not None and hasattr(layer, key)
            and not isinstance(getattr(type(layer), key, None), property)]
    return {**config, **{key: "zeros" for key in keys}}, {key: getattr(layer, key) for key in keys}


def _rebuilt(model, new_configs: dict, new_weights: dict):
    """A clone of `model` with the new configs, every layer holding its (cut) weights."""

    initializers = {}

    def rebuild_layer(layer):
        try:
            config = new_configs.get(layer.name) or layer.get_config()
            config, initializers[layer.name] = _zero_initialized(layer, config)
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
        for key, initializer in initializers.get(layer.name, {}).items():
            setattr(target, key, initializer)  # the saved model's config names the user's initializers
        target.set_weights(new_weights[layer.name] if layer.name in new_weights else layer.get_weights())
    return new_model


def remove_units(
    model,
    plan: dict[str, Iterable[int]],
    merge: dict[str, dict[int, int]] | None = None,
    *,
    merge_exact: bool = False,
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
    merge_exact: the caller measured the merge relations where the consumer reads the units
        (after BN, as the structured stages do), where surgery cannot see them: they are exact
        there, so no 'approximate' warning is given.

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

    new_configs, new_weights = _cuts(analysis, kept_of, merges_of, merge_exact)
    new_model = _rebuilt(model, new_configs, new_weights)
    _compile_like(new_model, model)
    return new_model, result

