"""The interface every layer-family handler implements, and the helpers they share.

A handler is everything the tool knows about one family of tf-keras layer types: how the layer's
channels are coupled to its inputs and outputs (`propagate`, read by surgery's graph analysis and
by the stages' scoring), how to cut its weights and config when units go (`resize`), how many
multiply-adds it costs (`macs`) and how its Keras 3 config maps to tf-keras (`keras3_config`).
A family that is not registered is unknown: surgery keeps every channel around it. A handler
class joins the table with the `@register` decorator at the end of this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from compressor.core._tf import tf
from compressor.core.errors import CompressorError
from compressor.core.registry import Registry
from compressor.layers.layout import Layout


class Blocked(Exception):
    """The layer cannot carry its inputs' channels in this configuration; the message says why."""


class GraphView(Protocol):
    """What a handler may ask of (and tell) surgery's analysis while propagating layouts."""

    def add_producer(self, name: str, units: int) -> None: ...
    def block_space(self, space: str, reason: str) -> None: ...
    def couple(self, a: str, b: str) -> None: ...
    def fresh_output(self, layer, reason: str) -> Layout: ...


@dataclass
class Cut:
    """What surgery decided for one layer: kept positions of each input's last axis, folded pairs
    of the first input, and (for producers) the kept units."""

    layouts: list[Layout]
    positions: list[np.ndarray]
    pairs: list = field(default_factory=list)
    out_kept: np.ndarray | None = None
    units: int | None = None  # units before, for producers

    @property
    def changed(self) -> bool:
        narrowed = any(len(p) != lay.width for p, lay in zip(self.positions, self.layouts))
        shrunk = self.out_kept is not None and len(self.out_kept) != self.units
        return bool(narrowed or self.pairs or shrunk)


class Handler:
    """Defaults describe a layer with no per-channel weights that maps each input channel to the
    same output channel (activations, dropout, pooling, padding)."""

    kinds: tuple[type, ...] = ()
    family: str = ""
    # Per-channel and unit-preserving: a producer's activity may be observed after it (BN, ReLU).
    observe_through: bool = False
    # Keeps a channel's identity between the observation point and the consumer (dropout, pooling).
    route_through: bool = False
    # A consumer whose input rows can absorb a removed unit's mean or twin (Dense, Conv).
    foldable: bool = False
    # The weight tfmot's magnitude pruning masks, or None if the weight stage leaves the layer.
    magnitude_kernel: str | None = None
    # Producers whose units are channels of their output (False: attention heads, internal).
    units_on_output: bool = True
    # Known, but its weights stay as they are (recurrent, transposed conv): reported as unpruned.
    left_whole: bool = False
    # Folding a removed unit's rows onto its twin is exact here (False: a per-channel step first).
    exact_fold: bool = True

    def check(self, layer) -> str | None:
        """Why this layer cannot be reasoned about in its configuration (None if it can)."""
        if getattr(layer, "data_format", "channels_last") not in (None, "channels_last"):
            return "data_format channels_first"
        return None

    def propagate(self, layer, ins: list[Layout], shapes: list[tuple], graph: GraphView) -> Layout:
        return ins[0]

    def units(self, layer) -> int | None:
        """Removable units if the layer is a producer, else None."""
        return None

    def unit_kernel(self, layer):
        """The weight whose last axis are the producer's units (dead-unit test, magnitude scores)."""
        return getattr(layer, "kernel", None)

    def unit_sq(self, layer):
        """Squared L2 norm of each unit's weights and bias, as a differentiable tensor: the groups of
        the group-lasso penalty, and (evaluated) the magnitude score and the dead-unit test."""
        kernel = self.unit_kernel(layer)
        sq = tf.reduce_sum(tf.square(tf.reshape(kernel, (-1, kernel.shape[-1]))), axis=0)
        bias = getattr(layer, "bias", None) if getattr(layer, "use_bias", False) else None
        return sq if bias is None else sq + tf.square(bias)

    def unit_norms(self, layer) -> np.ndarray:
        return np.sqrt(np.asarray(self.unit_sq(layer), dtype=np.float64))

    def resize(self, layer, cut: Cut) -> tuple[dict | None, list[np.ndarray] | None]:
        """New config (None: unchanged) and weights (None: unchanged) for the cut."""
        return None, None

    def macs(self, layer, in_shape: tuple, out_shape: tuple, nonzero_only: bool) -> int:
        return 0

    def export_form(self, layer, input_shapes: list[tuple], call_kwargs: dict):
        """A static-shape stand-in for the converters (compressor/layers/export_forms.py), or None
        when the layer's own code converts without run-time shape arithmetic."""
        return None

    # Keras 3 class name -> rebuild(LayerSpec) -> tf-keras layer, for classes whose config or class
    # differs from tf-keras' (the importer uses the tf-keras class of the same name otherwise).
    keras3: dict = {}


# ------------------------------------------------------------------------------------ helpers


def size(weight, nonzero_only: bool) -> int:
    """Kernel entries, or only the non-zero ones."""
    if nonzero_only:
        return int(np.count_nonzero(np.asarray(weight)))
    return int(np.prod(weight.shape))


def positions(shape: tuple[int, ...], channels: int) -> int:
    """How many times a kernel producing `channels` values is applied to give `shape`."""
    total = int(np.prod(shape))
    if channels <= 0 or total % channels:
        raise ValueError(f"shape {shape} is not a multiple of {channels} channels")
    return total // channels


def take(array: np.ndarray, kept: np.ndarray, axis: int) -> np.ndarray:
    if len(kept) == array.shape[axis] and np.array_equal(kept, np.arange(len(kept))):
        return array
    return np.take(array, kept, axis=axis)


def expand(kept: np.ndarray, multiplier: int) -> np.ndarray:
    """Input positions -> rows of a tensor with `multiplier` entries per input channel."""
    return (kept[:, None] * multiplier + np.arange(multiplier)).ravel()


def fold_rows(kernel: np.ndarray, pairs, axis: int, multiplier: int = 1) -> np.ndarray:
    """Add the rows that read a removed unit onto the rows that read its kept twin."""
    if not pairs:
        return kernel
    kernel = np.moveaxis(kernel.copy(), axis, 0)
    for removed, kept, _segment in pairs:
        for j in range(multiplier):
            kernel[kept * multiplier + j] += kernel[removed * multiplier + j]
    return np.moveaxis(kernel, 0, axis)


def short_name(variable) -> str:
    return variable.name.split("/")[-1].split(":")[0]


def map_weights(layer, rule: Callable[[str, np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Every weight of the layer through rule(short name, value)."""
    return [rule(short_name(v), v.numpy()) for v in layer.weights]


def is_last_axis(axis, rank: int) -> bool:
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return False
        axis = axis[0]
    return axis == -1 or axis == rank - 1


def activation_name(layer) -> str:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear"
    return getattr(activation, "__name__", type(activation).__name__)


# Activations that mix units: removing one changes the others.
CROSS_UNIT_ACTIVATIONS = frozenset({"softmax", "log_softmax"})


# ------------------------------------------------------------------------------------ the table


def _handler_key(handler: Handler) -> str:
    return f"{type(handler).__module__}.{type(handler).__qualname__}"


#: Every registered handler (one instance per class), in registration order.
HANDLERS: Registry[Handler] = Registry("layer handler", key=_handler_key)
BY_TYPE: dict[type, Handler] = {}  # layer type -> its handler, kept in step with HANDLERS


def register(cls: type[Handler]) -> type[Handler]:
    """Class decorator: the handler answers for the layer types in its `kinds`. A user's module
    (given with --custom-objects or the API's custom_objects) may register one for its own layer
    class, as tfmot's PrunableLayer allows; each layer type has one handler."""
    handler = cls()
    key = _handler_key(handler)
    taken = [kind.__name__ for kind in handler.kinds if kind in BY_TYPE and _handler_key(BY_TYPE[kind]) != key]
    if taken:
        raise CompressorError(f"layer handler {cls.__name__} claims {', '.join(taken)}, which already "
                              f"{'has' if len(taken) == 1 else 'have'} a handler; register it for your own layer class")
    previous = HANDLERS.get(key)
    for kind in previous.kinds if previous is not None else ():
        BY_TYPE.pop(kind, None)
    HANDLERS.register(handler)
    BY_TYPE.update({kind: handler for kind in handler.kinds})
    return cls
