"""Flatten models whose layers are models into one tf-keras functional graph.

The pruning stages see the layers of one graph: a keras.applications backbone nested in a
`Sequential` with a new head would otherwise be one opaque layer, and nothing inside it could be
pruned. Every layer of a nested model (Sequential or functional, any depth) is copied into one
graph with the same weights; it is named by its nested path, `outer.inner.layer` (a dot is legal in
tf-keras, TensorFlow, TFLite and ONNX names, unlike `/`, which TensorFlow reads as a name scope).
A sub-model called more than once (a siamese tower) keeps ONE copy of its layers, called once per
use, so its weights stay shared. The flat model is checked against the nested one on random inputs.
"""
from __future__ import annotations

import numpy as np

from compressor.core._tf import keras, tf
from compressor.core.errors import CompressorError
from compressor.load.bounds import clip

#: Joins the names along a nested path: `mobilenetv2_1.00_32.Conv1`.
SEP = "."

#: Largest difference allowed between the nested and the flat model's outputs, relative to their scale.
_TOLERANCE = 1e-4


class _Repeat:
    """A tensor_dict entry that `Node.map_arguments` may pop any number of times."""

    def __init__(self, tensor):
        self.tensor = tensor

    def pop(self):
        return self.tensor


def flatten_nested(model) -> tuple["keras.Model", list[str]]:
    """Return (model, notes): the model itself when no layer is a model, else one flat graph.

    When a nested model cannot be flattened (a subclassed model, outputs that do not match), the
    nested model is returned with one note naming why its layers stay out of reach.
    """
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not nested:
        return model, []
    names = ", ".join(f"'{clip(m.name)}' ({type(m).__name__})" for m in nested[:4])
    listed = f"nested model{'s' * (len(nested) > 1)} {names}"
    listed += ", ..." if len(nested) > 4 else ""
    flattener = _Flattener()
    try:
        flat = flattener.flatten(model)
        diff = _max_relative_diff(model, flat)
    except Exception as exc:  # noqa: BLE001 - the nested model still runs, only unpruned inside: say why
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return model, [f"{listed} left as sub-models ({why}): the pruning stages cannot prune inside them"]
    if not diff <= _TOLERANCE:
        return model, [(f"{listed} left as sub-models: flattening changed the outputs (max relative diff "
                        f"{diff:.2e}); the pruning stages cannot prune inside them")]
    example = f" (e.g. '{clip(flattener.inner[0])}')" if flattener.inner else ""
    return flat, [(f"flattened {listed} into one graph: {len(flattener.inner)} layers named by nested path"
                   f"{example}; outputs match (max relative diff {diff:.1e})")]


class _Flattener:
    """Copies layers into one graph; one copy per original layer, so shared layers stay shared."""

    def __init__(self):
        self.copies: dict[int, object] = {}
        self.pairs: list[tuple[object, object]] = []
        self.names: set[str] = set()
        self.inner: list[str] = []  # names of the copies that came from inside a nested model

    def flatten(self, model) -> "keras.Model":
        if not model.inputs:
            raise CompressorError(f"model '{clip(model.name)}' was never built on an input shape")
        inputs = [keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=_input_name(t, i))
                  for i, t in enumerate(model.inputs)]
        self.names.update(t.name.split(":")[0] for t in inputs)
        outputs = self.inline(model, inputs, "", None)
        structure = getattr(model, "_nested_outputs", None)
        packed = tf.nest.pack_sequence_as(structure, outputs) if structure is not None else outputs
        flat = keras.Model(inputs if len(inputs) > 1 else inputs[0], packed, name=model.name)
        keras.backend.batch_set_value([(w, v) for original, copy in self.pairs
                                       for w, v in zip(copy.weights, original.get_weights())])
        return flat

    def inline(self, model, inputs: list, prefix: str, training) -> list:
        """The flat output tensors of `model` called on `inputs`, its layers copied under `prefix`."""
        if isinstance(model, keras.Sequential):
            x = inputs[0] if len(inputs) == 1 else inputs
            for layer in model.layers:
                x = self.call(layer, (x,), {}, prefix, training)
            return tf.nest.flatten(x)
        if not getattr(model, "_is_graph_network", False):
            raise CompressorError(f"'{clip(model.name)}' is a subclassed model whose graph cannot be read")
        tensors = {str(id(ref)): _Repeat(new) for ref, new in zip(model.inputs, inputs)}
        for depth in sorted(model._nodes_by_depth, reverse=True):  # noqa: SLF001 - the graph's only map
            for node in model._nodes_by_depth[depth]:  # noqa: SLF001
                if node.is_input or any(i not in tensors for i in node.flat_input_ids):
                    continue
                args, kwargs = node.map_arguments(tensors)
                out = self.call(node.layer, args, kwargs, prefix, training)
                tensors.update({i: _Repeat(t) for i, t in zip(node.flat_output_ids, tf.nest.flatten(out))})
        return [tensors[str(id(ref))].tensor for ref in model.outputs]

    def call(self, layer, args, kwargs, prefix: str, training):
        """Call the copy of `layer` (or inline it, for a model); a `training=` flag the user gave a
        sub-model call (a frozen backbone's batch norm) is handed to each layer inside it."""
        if isinstance(layer, keras.layers.InputLayer):
            return args[0]
        if isinstance(kwargs.get("training"), bool):
            training = kwargs["training"]
        if isinstance(layer, keras.Model):
            given = args[0] if args else kwargs.get("inputs")
            out = self.inline(layer, tf.nest.flatten(given), f"{prefix}{layer.name}{SEP}", training)
            structure = getattr(layer, "_nested_outputs", None)
            if structure is not None and not isinstance(layer, keras.Sequential):
                return tf.nest.pack_sequence_as(structure, out)
            return out[0] if len(out) == 1 else out
        copy = self.copy(layer, prefix)
        if training is not None and "training" not in kwargs and getattr(copy, "_expects_training_arg", False):
            kwargs = {**kwargs, "training": training}
        return copy(*args, **kwargs)

    def copy(self, layer, prefix: str):
        """The one copy of `layer`, built from its config, named by its nested path."""
        if id(layer) in self.copies:
            return self.copies[id(layer)]
        name = self.unique(f"{prefix}{layer.name}")
        config = dict(layer.get_config(), name=name)
        try:
            copy = type(layer).from_config(config)
        except Exception as exc:  # noqa: BLE001 - any class whose config does not round-trip
            raise CompressorError(f"layer '{clip(name)}' ({type(layer).__name__}) cannot be copied: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        self.copies[id(layer)] = copy
        if prefix:
            self.inner.append(name)
        self.pairs.append((layer, copy))
        return copy

    def unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self.names:
            candidate, n = f"{name}_{n}", n + 1
        self.names.add(candidate)
        return candidate


def _input_name(tensor, index: int) -> str:
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "layer", None)
    return getattr(layer, "name", None) or f"input_{index}"


def _max_relative_diff(nested, flat, seed: int = 0) -> float:
    """Largest output difference on random inputs, over the nested outputs' largest magnitude."""
    rng = np.random.default_rng(seed)
    feed = []
    for t in nested.inputs:
        shape = [d or (2 if i == 0 else 8) for i, d in enumerate(t.shape)]  # a fixed batch is kept
        if t.dtype.is_integer or t.dtype.is_bool:
            feed.append(rng.integers(0, 2, size=shape).astype(t.dtype.as_numpy_dtype))
        else:
            feed.append(rng.standard_normal(shape).astype(t.dtype.as_numpy_dtype))
    feed = feed[0] if len(feed) == 1 else feed
    try:
        want = [np.asarray(a, np.float64) for a in tf.nest.flatten(nested(feed, training=False))]
        got = [np.asarray(a, np.float64) for a in tf.nest.flatten(flat(feed, training=False))]
    except Exception as exc:  # noqa: BLE001 - a model that cannot run on random inputs
        raise CompressorError(f"cannot compare outputs on random inputs: {str(exc).splitlines()[0][:200]}") from None
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        return float("inf")
    scale = max([1.0] + [float(np.max(np.abs(a))) for a in want if a.size])
    return max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(want, got)) / scale


__all__ = ["flatten_nested", "SEP"]
