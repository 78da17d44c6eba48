"""Observation: where a producer's units are seen, what they do on calibration data, and what
each unit is worth by a named criterion (compressor/criteria).

A producer's unit is judged by what the *next* weighted layer sees, so activity is taken after the
pass-through layers that follow it (BatchNormalization, activations, dropout): for Dense+ReLU that
is the Dense output, for Conv -> BN -> ReLU the ReLU output. Attention heads, which are not output
channels, are scored by the loss rise when one is silenced.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from compressor import criteria
from compressor.core import inputs
from compressor.core._tf import keras, tf
from compressor.data.protocol import DataSource
from compressor.graph import surgery
from compressor.layers import handler_or_default as _handler
from compressor.stages import planning
from compressor.stages.recovery import copy

# ------------------------------------------------------------------------------------ graph

def layer_graph(model) -> tuple[dict[str, list[str]], set[str]]:
    """Consumers of each layer (by name) and the names of output layers."""
    graph = surgery.model_graph(model)
    return graph.consumers, set(graph.outputs)



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
    x = inputs.rows(inputs.each(x, np.asarray), slice(0, limit))
    observe = sorted({t.observe for t in traces})
    extractor = keras.Model(model.inputs, [model.get_layer(n).output for n in observe] + list(model.outputs))
    sums = {n: None for n in observe}
    patterns = {n: [] for n in observe}
    taylor = {n: 0.0 for n in observe}
    for start in range(0, inputs.count(x), batch_size):
        outs, grads = _forward(extractor, inputs.rows(x, slice(start, start + batch_size)), len(observe),
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
        if task is None or (task.paired and task.sparse(0)):
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, outs[-1]))
        else:  # the task's loss summed over the model's outputs (the extractor's last outputs)
            fns = task.keras_losses()
            fns, ys = (fns, list(y)) if isinstance(fns, list) else ([fns], [y])
            loss = tf.add_n([_summed(fn, t, p) for fn, t, p in zip(fns, ys, outs[-len(fns):])])
    return outs[:n_observed], tape.gradient(loss, outs[:n_observed])


def _summed(fn, truth, pred):
    """One output's loss summed over the batch, whatever `fn` returns (a Loss object's mean or a
    function's per-sample values), as a float32 scalar; labels shaped like the output where they fit
    ((N,) against (N, 1) broadcast to (N, N) in a per-sample function)."""
    truth = tf.convert_to_tensor(truth)
    if truth.shape.rank == 1 and pred.shape.rank == 2 and pred.shape[-1] == 1:
        truth = tf.reshape(truth, (-1, 1))
    value = tf.cast(fn(truth, pred), tf.float32)
    mean = value.shape.rank == 0
    return tf.reduce_sum(value) * (tf.cast(tf.shape(pred)[0], tf.float32) if mean else 1.0)


def _positions(shape) -> int:
    inner = shape[1:-1]
    return int(math.prod(inner)) if inner else 1


def observe(model, x_calib: np.ndarray, labelled: tuple[np.ndarray, np.ndarray] | None = None, task=None):
    """A working copy of `model`, its prunable groups, each producer's trace and its activity on
    the calibration samples (or, for gradient criteria, on `labelled` (x, y) samples): what every
    activity-based stage starts from."""
    base = copy(model)
    found = planning.groups(base, observable=True)
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



# ------------------------------------------------------------------------------------ scores


def labelled_for(criterion: str, data: DataSource):
    """Labelled calibration samples when the criterion declares it reads gradients, else None."""
    return data.labelled_calibration() if "gradients" in criteria.get(criterion).needs else None


def unit_scores(model, producer: str, activity: Activity, criterion: str) -> np.ndarray:
    """Normalised score in [0, 1] per unit from the named criterion (compressor/criteria); dead units get 0."""
    score = np.array(criteria.get(criterion).scores(model, producer, activity), dtype=np.float64)
    score[dead_units(model, producer) | (activity.mean_abs == 0)] = 0.0
    return score


def head_scores(model, x: np.ndarray, y, task=None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per attention layer, per head: the rise of the task's loss on (x, y) when that head's output
    projection rows are zeroed (the head silenced; everything else as is). Never negative.
    The loss is the one the model is fine-tuned with (regression, multi-output), not a fixed one."""
    found = planning.head_groups(model)
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
