"""Shared machinery of the structured stages: where to observe a unit, what it does on calibration
data, and how to fold a removed unit's signal into the layers that read it.

A producer's unit is judged by what the *next* weighted layer sees, so activity is taken after the
pass-through layers that follow it (BatchNormalization, activations, dropout): for Dense+ReLU that
is the Dense output, for Conv -> BN -> ReLU the ReLU output. Removal then goes through
`compressor.graph.surgery`; before it, a removed unit's mean activation is folded into the consumers'
bias ("mean replacement"), which makes removing a constant unit (zero kernel, gamma = 0, a ReLU
that never fires) exact and is the least-squares best guess for any other unit.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from compressor.graph import surgery
from compressor.core._tf import keras, tf
from compressor.layers import Handler, handler_for
from compressor.train.training import clone_with_weights, fit



# ------------------------------------------------------------------------------------ graph


def layer_graph(model) -> tuple[dict[str, list[str]], set[str]]:
    """Consumers of each layer (by name) and the names of output layers."""
    graph = surgery.model_graph(model)
    return graph.consumers, set(graph.outputs)


def _handler(layer):
    return handler_for(layer) or Handler()  # unknown layers: nothing to observe or route through


@dataclass
class Consumer:
    """A weighted layer that reads the producer's channels; `outer` = repetitions after Flatten."""

    name: str
    outer: int = 1


@dataclass
class Trace:
    """Where a producer's units are observed and which layers read them."""

    producer: str
    observe: str  # layer whose output is the units' activity
    chain: list[str] = field(default_factory=list)  # pass-through layers between producer and observe
    consumers: list[Consumer] | None = None  # None: a route we cannot fold into (merge, concat, output...)
    batch_norm: str | None = None  # first BatchNormalization in the chain (network slimming's gamma)


def trace(model, producer: str, graph=None) -> Trace:
    """Follow single-consumer pass-through layers to the observation point, then find the consumers."""
    consumers, outputs = graph or layer_graph(model)
    current, chain, bn = producer, [], None
    while current not in outputs and len(consumers[current]) == 1:
        nxt = model.get_layer(consumers[current][0])
        if not _handler(nxt).observe_through:
            break
        chain.append(nxt.name)
        if bn is None and type(nxt) is keras.layers.BatchNormalization:
            bn = nxt.name
        current = nxt.name
    return Trace(producer, current, chain, _route(model, current, consumers, outputs), bn)


def _route(model, start: str, consumers, outputs) -> list[Consumer] | None:
    found, frontier = [], [(start, 1)]
    while frontier:
        name, outer = frontier.pop()
        if name in outputs:
            return None
        for nxt_name in consumers[name]:
            layer = model.get_layer(nxt_name)
            handler = _handler(layer)
            if handler.foldable:
                if type(layer) is not keras.layers.Dense and outer != 1:
                    return None
                found.append(Consumer(nxt_name, outer))
            elif handler.route_through:
                frontier.append((nxt_name, outer))
            elif type(layer) is keras.layers.Flatten:
                spatial = tuple(layer.input_shape[1:-1])
                if any(d is None for d in spatial):
                    return None
                frontier.append((nxt_name, outer * int(math.prod(spatial))))
            else:
                return None
    return found


# ------------------------------------------------------------------------------------ activity


@dataclass
class Activity:
    """Per-unit statistics of one observation point over the calibration samples."""

    mean: np.ndarray  # (C,) mean activation
    mean_abs: np.ndarray  # (C,) mean |activation|
    apoz: np.ndarray  # (C,) fraction of outputs <= 0 (Average Percentage of Zeros after ReLU)
    std: np.ndarray  # (C,) standard deviation over all positions
    patterns: np.ndarray  # (N, C) per-sample activation (spatial mean for conv maps)
    taylor: np.ndarray | None = None  # (C,) mean |activation x dloss/dactivation|, when gradients were asked for
    batch_norm: str | None = None  # the BatchNormalization right after the producer, if any


def collect(model, x: np.ndarray, traces: list[Trace], batch_size: int = 128, limit: int = 500,
            labels: np.ndarray | None = None, task=None) -> dict[str, Activity]:
    """Run `model` on up to `limit` calibration samples; activity of every traced producer. With
    `labels`, the gradient of the loss (the task's, compressor/config/task.py) w.r.t. each observed
    activation is gathered too (Taylor)."""
    x = np.asarray(x)[:limit]
    observe = sorted({t.observe for t in traces})
    extractor = keras.Model(model.inputs, [model.get_layer(n).output for n in observe] + list(model.outputs))
    sums = {n: None for n in observe}
    patterns = {n: [] for n in observe}
    taylor = {n: 0.0 for n in observe}
    for start in range(0, len(x), batch_size):
        outs, grads = _forward(extractor, x[start:start + batch_size], len(observe),
                               None if labels is None else _label_rows(labels, slice(start, start + batch_size)), task)
        for name, out, grad in zip(observe, outs, grads):
            a = out.numpy().astype(np.float64)
            flat = a.reshape(-1, a.shape[-1])
            stats = np.stack([flat.sum(0), np.abs(flat).sum(0), (flat <= 0).sum(0), (flat ** 2).sum(0)])
            sums[name] = stats if sums[name] is None else sums[name] + stats
            patterns[name].append(a.reshape(len(a), -1, a.shape[-1]).mean(axis=1))
            if grad is not None:  # first-order Taylor: |a * g| summed over positions, per sample
                taylor[name] = taylor[name] + np.abs((a * grad.numpy()).reshape(len(a), -1, a.shape[-1]).sum(1)).sum(0)
    result = {}
    for name in observe:
        per_sample = np.concatenate(patterns[name]).astype(np.float32)
        n_pos = _positions(model.get_layer(name).output_shape) * len(per_sample)
        s, sa, zeros, sq = sums[name] / n_pos
        result[name] = Activity(s, sa, zeros, np.sqrt(np.maximum(sq - s ** 2, 0.0)), per_sample,
                                None if labels is None else taylor[name] / len(per_sample))
    return {t.producer: dataclasses.replace(result[t.observe], batch_norm=t.batch_norm) for t in traces}


def _label_rows(labels, index):
    return tuple(np.asarray(a)[index] for a in labels) if isinstance(labels, tuple) else np.asarray(labels)[index]


def _forward(extractor, x, n_observed: int, y, task=None):
    """Observed activations, and with labels their loss gradients (else Nones)."""
    if y is None:
        outs = extractor(x, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return outs[:n_observed], [None] * n_observed
    with tf.GradientTape() as tape:
        outs = extractor(x, training=False)
        if task is None or task.paired:
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, outs[-1]))
        else:  # the task's loss summed over the model's outputs (the extractor's last outputs)
            fns = task.keras_losses()
            fns, ys = (fns, list(y)) if isinstance(fns, list) else ([fns], [y])
            loss = tf.add_n([tf.reduce_sum(fn(t, p)) for fn, t, p in zip(fns, ys, outs[-len(fns):])])
    return outs[:n_observed], tape.gradient(loss, outs[:n_observed])


def _positions(shape) -> int:
    inner = shape[1:-1]
    return int(math.prod(inner)) if inner else 1


def observe(model, x_calib: np.ndarray, labelled: tuple[np.ndarray, np.ndarray] | None = None, task=None):
    """A working copy of `model`, its prunable groups, each producer's trace and its activity on
    the calibration samples (or, for gradient criteria, on `labelled` (x, y) samples): what every
    activity-based stage starts from."""
    base = copy(model)
    found = groups(base, observable=True)
    if not found:
        return base, [], {}, {}
    graph = layer_graph(base)
    traces = {m: trace(base, m, graph) for g in found for m in g.members}
    x, y = labelled if labelled is not None else (x_calib, None)
    return base, found, traces, collect(base, x, list(traces.values()), labels=y, task=task)


def unit_kernel(layer):
    """The kernel whose last axis is the layer's units: SeparableConv2D's units are its pointwise filters."""
    return _handler(layer).unit_kernel(layer)


def dead_units(model, producer: str) -> np.ndarray:
    """Units whose whole incoming kernel is zero (e.g. after weight pruning): a constant output."""
    layer = model.get_layer(producer)
    kernel = unit_kernel(layer)
    if kernel is None:  # units that are not kernel columns (attention heads): all their weights zero
        return _handler(layer).unit_norms(layer) == 0
    kernel = kernel.numpy()
    return np.all(kernel.reshape(-1, kernel.shape[-1]) == 0, axis=0)


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


def head_scores(model, x: np.ndarray, y, task=None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per attention layer, per head: the rise of the task's loss on (x, y) when that head's output
    projection rows are zeroed (the head silenced; everything else as is). Never negative.
    The loss is the one the model is fine-tuned with (regression, multi-output), not a fixed one."""
    found = head_groups(model)
    if not found:
        return {}
    loss = _loss_of(task)

    def current() -> float:
        return loss(y, model.predict(x, batch_size=batch_size, verbose=0))

    reference, out = current(), {}
    for g in found:
        kernel = model.get_layer(g.name)._output_dense.kernel
        saved = kernel.numpy()
        rises = []
        for head in range(saved.shape[0]):
            silenced = saved.copy()
            silenced[head] = 0.0
            kernel.assign(silenced)
            rises.append(max(current() - reference, 0.0) + 1e-6)
        kernel.assign(saved)
        out[g.name] = np.asarray(rises)
    return out


def _loss_of(task):
    """Mean loss of predictions: the task's losses (logits-aware) summed over outputs, else sparse CE."""
    if task is None:
        return lambda y, pred: float(np.mean(keras.losses.sparse_categorical_crossentropy(y, pred).numpy()))
    fns = task.keras_losses()
    many = isinstance(fns, list)

    def total(y, pred) -> float:
        pairs = zip(fns if many else [fns], list(y) if many else [y], pred if many else [pred])
        return float(sum(np.mean(fn(t, p).numpy()) for fn, t, p in pairs))  # loss objects or per-sample functions
    return total


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


def fold_into_consumers(model, tr: Trace, channels: int, scale: dict[int, float] | None = None,
                        offset: dict[int, float] | None = None) -> bool:
    """In place: multiply the consumer rows that read unit c by scale[c], and add offset[c] times
    those rows (before scaling) to the consumer bias. False, and nothing changed, if impossible.

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


def remove(model, plan: dict[str, list[int]], merge: dict[str, dict[int, int]] | None = None):
    """surgery.remove_units, silencing its 'merge is approximate' warning: our merge relations are
    measured after BN, where surgery cannot see them, so they are exact there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*merging units of.*", category=surgery.SurgeryWarning)
        return surgery.remove_units(model, plan, merge or {})


def finetune(model, ctx, epochs: int, label: str, learning_rate: float | None = None):
    """Fine-tune with the weight stage's zeros held (training.fit's HoldZeros), distilled from `ctx.teacher`."""
    if epochs > 0:
        progress = ctx.epoch_progress(label, epochs) if ctx.epoch_progress else None
        fit(model, ctx.data, epochs=epochs, batch_size=ctx.recipe.batch_size,
            learning_rate=learning_rate or ctx.recipe.learning_rate, progress=progress, task=ctx.task, label=label,
            teacher=ctx.teacher, distill_cfg=ctx.recipe.distill)
    return model


def recover(model, ctx, limit: int, task, baseline: float, label: str) -> tuple[float, int]:
    """The metric of a just fine-tuned `model` after up to `limit` more epochs, one at a time, spent
    only while it is over the budget and still improving; and the epochs spent. A model that lost a
    residual block or half its heads often heals with a little more training than its step's own
    fine-tune (the encoder without its second attention block: 0.774 after 2 epochs, 0.805 after 6,
    dense 0.814); a hopeless one stops at the first epoch that does not help."""
    value, extra = task.keras(model).value, 0
    while extra < limit and not task.within(baseline, value):
        finetune(model, ctx, 1, f"{label} (recovery)")
        extra += 1
        after = task.keras(model).value
        improved = task.drop(value, after) < 0
        value = after
        if not improved:
            break
    return value, extra


def layer_details(result, extra: dict[str, dict]) -> dict[str, dict]:
    """Per-producer units before/after from the surgery result, merged with the stage's own notes."""
    out = {}
    for name, info in extra.items():
        row = {"units_before": int(result.units_before.get(name, 0)), "units_after": int(result.units_after.get(name, 0))}
        row["removed"] = row["units_before"] - row["units_after"]
        row.update(info)
        if name in result.skipped:
            row["skipped"] = result.skipped[name]
        out[name] = row
    return out


def copy(model):
    return clone_with_weights(model)
