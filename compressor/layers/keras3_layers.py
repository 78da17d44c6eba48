"""What each Keras 3 layer, activation and `keras.ops` graph node becomes in tf-keras.

How a Keras 3 *layer* class is rebuilt is said by its family's handler in compressor/layers (its
`keras3` entries, built with the helpers here); `keras.ops` nodes, activations and Keras-library
classes are in the tables at the bottom (`OPS`, `ACTIVATIONS`, `LIBRARY_CLASSES`). Types
with no tf-keras counterpart (keras.applications' `LayerScale`/`StochasticDepth`, Keras 3's
`hard_silu`, ...) are rebuilt with the small tf-keras classes and functions defined here: they
compute the same thing with the same weights. Nothing stored in a model file is ever executed;
a file can only name entries of these tables.

This module imports tf-keras only (never Keras 3), so loading a tf-keras file that uses these
classes only needs `import compressor.layers.keras3_layers` (model_io does it).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from compressor.core._tf import keras, tf
from compressor.core.errors import CompressorError

#: Package name our tf-keras classes and functions are registered under ("compressor>LayerScale").
PACKAGE = "compressor"
_register = keras.saving.register_keras_serializable


# --------------------------------------------------------------------------- tf-keras classes


@_register(package=PACKAGE)
class LayerScale(keras.layers.Layer):
    """ConvNeXt's per-channel residual scale: x * gamma, gamma of shape (projection_dim,)."""

    def __init__(self, init_values: float = 1e-6, projection_dim: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.init_values = float(init_values)
        self.projection_dim = int(projection_dim)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma", shape=(self.projection_dim,),
            initializer=keras.initializers.Constant(self.init_values), trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        return inputs * tf.cast(self.gamma, inputs.dtype)

    def get_prunable_weights(self):
        """tfmot wraps every layer it is given; a per-channel scale has nothing to sparsify."""
        return []

    def get_config(self):
        return {**super().get_config(), "init_values": self.init_values, "projection_dim": self.projection_dim}


@_register(package=PACKAGE)
class StochasticDepth(keras.layers.Layer):
    """Drops a residual branch per sample while training (scaled by 1/keep); identity otherwise."""

    def __init__(self, drop_path_rate: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.drop_path_rate = float(drop_path_rate)

    def call(self, inputs, training=None):
        if not training or self.drop_path_rate <= 0:
            return inputs
        keep = 1.0 - self.drop_path_rate
        shape = tf.concat([tf.shape(inputs)[:1], tf.ones([tf.rank(inputs) - 1], tf.int32)], axis=0)
        mask = tf.floor(keep + tf.random.uniform(shape, dtype=inputs.dtype))
        return inputs / keep * mask

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "drop_path_rate": self.drop_path_rate}


@_register(package=PACKAGE)
class ConstantTerm(keras.layers.Layer):
    """x + c, x - c, c - x or x * c with a tensor constant c that a Keras 3 graph stores inline
    (e.g. a positional table computed once at build time), held as a non-trainable weight so it
    is saved with the weights and sliced with its channels when units go, yet never trained,
    as in the Keras 3 model."""

    OPS = {"add": lambda x, c: x + c, "subtract": lambda x, c: x - c,
           "rsubtract": lambda x, c: c - x, "multiply": lambda x, c: x * c}

    def __init__(self, op: str = "add", shape=(1,), value=None, **kwargs):
        super().__init__(**kwargs)
        if op not in self.OPS:
            raise ValueError(f"unknown op {op!r}; one of {sorted(self.OPS)}")
        self.op = op
        self.constant_shape = tuple(int(d) for d in shape)
        self._value = value  # only when first built from a Keras 3 graph; weights carry it after

    def build(self, input_shape):
        init = "zeros" if self._value is None else keras.initializers.Constant(self._value)
        self.constant = self.add_weight(name="constant", shape=self.constant_shape, initializer=init, trainable=False)
        self._value = None
        super().build(input_shape)

    def call(self, inputs):
        return self.OPS[self.op](inputs, tf.cast(self.constant, inputs.dtype))

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "op": self.op, "shape": list(self.constant_shape)}


@_register(package=PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """KerasHub's learned positions: rows start..start+T of a (sequence_length, width) table,
    broadcast over the batch; reads only its input's shape (and passes its mask on)."""

    def __init__(self, sequence_length: int = 1, start_index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = int(sequence_length)
        self.start_index = int(start_index)
        self.supports_masking = True

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.sequence_length, int(input_shape[-1])), initializer="zeros",
            trainable=True)
        super().build(input_shape)

    def call(self, inputs):
        length = inputs.shape[-2] if inputs.shape[-2] is not None else tf.shape(inputs)[-2]
        rows = self.embeddings[self.start_index:self.start_index + length]
        return tf.broadcast_to(tf.cast(rows, inputs.dtype), tf.shape(inputs))

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "sequence_length": self.sequence_length, "start_index": self.start_index}


@_register(package=PACKAGE)
class ClassToken(keras.layers.Layer):
    """ViT's learned class token, (1, 1, width), put before the patch tokens of every sample."""

    def build(self, input_shape):
        self.token = self.add_weight(name="token", shape=(1, 1, int(input_shape[-1])), initializer="zeros",
                                     trainable=True)
        super().build(input_shape)

    def call(self, inputs):
        token = tf.tile(tf.cast(self.token, inputs.dtype), [tf.shape(inputs)[0], 1, 1])
        return tf.concat([token, inputs], axis=1)

    def get_prunable_weights(self):
        return []


# --------------------------------------------------------------------------- activations
# Keras 3 activations that tf-keras lacks or defines differently, with Keras 3's formulas.


@_register(package=PACKAGE, name="hard_sigmoid")
def hard_sigmoid(x):
    """Keras 3 hard_sigmoid, relu6(x + 3) / 6 (tf-keras' own is clip(0.2 x + 0.5))."""
    return tf.nn.relu6(x + 3.0) * (1.0 / 6.0)


@_register(package=PACKAGE, name="hard_silu")
def hard_silu(x):
    """x * hard_sigmoid(x): MobileNetV3's hard-swish."""
    return x * hard_sigmoid(x)


@_register(package=PACKAGE, name="relu6")
def relu6(x):
    return tf.nn.relu6(x)


@_register(package=PACKAGE, name="leaky_relu")
def leaky_relu(x):
    """Keras 3 default slope 0.2."""
    return tf.nn.leaky_relu(x, alpha=0.2)


@_register(package=PACKAGE, name="log_sigmoid")
def log_sigmoid(x):
    return tf.math.log_sigmoid(x)


@_register(package=PACKAGE, name="log_softmax")
def log_softmax(x):
    return tf.nn.log_softmax(x, axis=-1)


@_register(package=PACKAGE, name="hard_tanh")
def hard_tanh(x):
    return tf.clip_by_value(x, -1.0, 1.0)


@_register(package=PACKAGE, name="gelu_tanh")
def gelu_tanh(x):
    """gelu(x, approximate=True), which a tf-keras activation string cannot ask for."""
    return tf.nn.gelu(x, approximate=True)


def _ours(fn: Callable) -> str:
    return keras.saving.get_registered_name(fn)


#: Keras 3 activation name -> tf-keras activation name (builtin or registered here).
ACTIVATIONS: dict[str, str] = {
    "silu": "swish",
    "hard_silu": _ours(hard_silu),
    "hard_swish": _ours(hard_silu),
    "hard_sigmoid": _ours(hard_sigmoid),
    "relu6": _ours(relu6),
    "leaky_relu": _ours(leaky_relu),
    "log_sigmoid": _ours(log_sigmoid),
    "log_softmax": _ours(log_softmax),
    "hard_tanh": _ours(hard_tanh),
}


# --------------------------------------------------------------------------- handler context


@dataclass
class LayerSpec:
    """One Keras 3 layer to rebuild: what a handler's `keras3` rebuild function gets.

    `translate(tf_class, config)` is the importer's generic Keras 3 -> tf-keras config
    translation (dtype policies, activations, initializers, unknown keys dropped with a note).
    """

    name: str
    class_name: str
    module: str
    config: dict
    translate: Callable[[type, dict], dict]
    notes: list[str] = field(default_factory=list)

    def refuse(self, why: str) -> CompressorError:
        return CompressorError(
            f"Keras 3 layer '{self.name}' ({self.class_name}) {why}; save the model without it, "
            "or build and save it with tf-keras"
        )


def same_class(spec: LayerSpec):
    """Default: the tf-keras class of the same name, config translated key by key."""
    tf_cls = getattr(keras.layers, spec.class_name, None)
    if not isinstance(tf_cls, type):
        raise spec.refuse("has no tf-keras equivalent")
    return _build(spec, tf_cls, spec.translate(tf_cls, dict(spec.config)))


def _build(spec: LayerSpec, tf_cls: type, cfg: dict, make: Callable[[dict], Any] | None = None):
    try:
        return (make or tf_cls.from_config)(cfg)
    except Exception as exc:  # noqa: BLE001 - one line naming the layer
        raise spec.refuse(f"cannot be rebuilt in tf-keras ({str(exc).strip().splitlines()[0][:200]})") from None


def renamed(tf_cls: type, keys: dict[str, str]) -> Callable[[LayerSpec], Any]:
    """Same layer, some config keys spelled differently in tf-keras."""

    def handler(spec: LayerSpec):
        cfg = dict(spec.config)
        for old, new in keys.items():
            if old in cfg:
                cfg[new] = cfg.pop(old)
        return _build(spec, tf_cls, spec.translate(tf_cls, cfg))

    return handler


def ours(tf_cls: type) -> Callable[[LayerSpec], Any]:
    """A Keras-library class with no tf-keras counterpart, rebuilt with our class of this module."""

    def handler(spec: LayerSpec):
        return _build(spec, tf_cls, spec.translate(tf_cls, dict(spec.config)))

    return handler


def refused(why: str) -> Callable[[LayerSpec], Any]:
    def handler(spec: LayerSpec):
        raise spec.refuse(why)

    return handler


def layer_normalization(spec: LayerSpec):
    if spec.config.get("rms_scaling"):
        raise spec.refuse("uses rms_scaling, which tf-keras lacks")
    return same_class(spec)


def multi_head_attention(spec: LayerSpec):
    """tf-keras' from_config demands build shapes (query_shape, ...) that Keras 3 does not store;
    the constructor is enough, the layer builds itself on its first call with the same weights."""
    cls = keras.layers.MultiHeadAttention
    return _build(spec, cls, spec.translate(cls, dict(spec.config)), make=lambda cfg: cls(**cfg))


#: Keras 3 classes that tf-keras also names but that cannot be carried over faithfully.
REFUSED: dict[str, str] = {
    "Lambda": "has no tf-keras equivalent: a Lambda runs Python stored with the model, never executed here",
    "TFSMLayer": "has no tf-keras equivalent: it wraps an exported SavedModel",
    "JaxLayer": "has no tf-keras equivalent: it wraps JAX code",
    "FlaxLayer": "has no tf-keras equivalent: it wraps Flax code",
    "TorchModuleWrapper": "has no tf-keras equivalent: it wraps PyTorch code",
}

#: Classes that Keras itself defines outside `keras.layers` (keras.applications' own layers),
#: by defining module: recognised as library classes, not user code.
LIBRARY_CLASSES: dict[str, frozenset[str]] = {
    "keras.src.applications.convnext": frozenset({"LayerScale", "StochasticDepth"}),
}


# --------------------------------------------------------------------------- keras.ops nodes


@dataclass
class OpSpec:
    """One `keras.ops` call recorded in a Keras 3 functional graph: what an OPS handler gets.

    `args`/`kwargs` are the call's arguments with graph tensors already resolved to tf-keras
    tensors; constants stay Python values.
    """

    name: str
    class_name: str
    config: dict
    args: list
    kwargs: dict

    def refuse(self, why: str) -> CompressorError:
        return CompressorError(
            f"Keras 3 operation '{self.name}' (keras.ops {self.class_name}) {why}; express it with "
            "Keras layers and re-save, or build and save the model with tf-keras"
        )


def _is_tensor(value) -> bool:
    return tf.is_tensor(value) or bool(getattr(value, "is_tensor_like", False))


def _scalar(spec: OpSpec, value) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise spec.refuse(f"uses constant {str(value)[:60]!r}; only scalar constants are supported")


def _array_constant(value):
    """The array of a tensor constant stored inline in a Keras 3 graph, or None for anything else."""
    if isinstance(value, dict) and value.get("class_name") in ("__tensor__", "__numpy__"):
        cfg = value.get("config") or {}
        array = np.asarray(cfg.get("value"), dtype=str(cfg.get("dtype") or "float32"))
        return array if array.dtype.kind in "fiu" else None
    return None


def _constant_term(spec: OpSpec, ops: tuple[str, str] | None):
    """tensor op array-constant -> ConstantTerm, `ops` = (op with the tensor first, op with it second)."""
    a, b = spec.args
    first = _is_tensor(a)
    array = _array_constant(b if first else a)
    if array is None or ops is None or ops[0 if first else 1] is None:
        return None
    tensor = a if first else b
    rank = len(tensor.shape)
    if array.ndim > rank or (array.ndim == rank and array.shape[0] != 1):
        raise spec.refuse(f"uses a constant of shape {array.shape} that does not broadcast over the batch")
    layer = ConstantTerm(ops[0 if first else 1], array.shape, value=array.astype("float32"), name=spec.name)
    return layer, [tensor]


def _binary(merge: type | None, tensor_const: Callable[[float], tuple[float, float]] | None,
            const_tensor: Callable[[float], tuple[float, float]] | None = None,
            array_ops: tuple[str | None, str | None] | None = None):
    """x op y: two tensors -> a tf-keras merge layer; tensor and scalar -> Rescaling(scale, offset);
    tensor and array constant -> ConstantTerm (`array_ops`: its op for each order)."""

    def handler(spec: OpSpec):
        if len(spec.args) != 2 or spec.kwargs:
            raise spec.refuse("is called in a form the importer does not know")
        a, b = spec.args
        if _is_tensor(a) != _is_tensor(b):
            term = _constant_term(spec, array_ops)
            if term is not None:
                return term
        if _is_tensor(a) and _is_tensor(b):
            if merge is None:
                raise spec.refuse("combines two tensors, which has no tf-keras layer")
            return merge(name=spec.name), [[a, b]]
        if _is_tensor(a) and tensor_const is not None:
            scale, offset = tensor_const(_scalar(spec, b))
            return keras.layers.Rescaling(scale, offset, name=spec.name), [a]
        if _is_tensor(b) and const_tensor is not None:
            scale, offset = const_tensor(_scalar(spec, a))
            return keras.layers.Rescaling(scale, offset, name=spec.name), [b]
        raise spec.refuse("mixes a tensor and a constant in a form no tf-keras layer computes")

    return handler


def _unary_activation(activation: str, allowed: dict[str, tuple] | None = None):
    """ops.nn.relu(x) and friends: an Activation layer; options only at values we reproduce."""
    allowed = allowed or {}

    def handler(spec: OpSpec):
        options = {k: v for k, v in spec.config.items() if k != "name"}
        unknown = {k: v for k, v in options.items() if v not in allowed.get(k, (None,))}
        if len(spec.args) != 1 or not _is_tensor(spec.args[0]) or spec.kwargs or unknown:
            raise spec.refuse(f"is called with options the importer does not know ({unknown or spec.kwargs})")
        name = ACTIVATIONS.get(activation, activation)
        if activation == "gelu" and options.get("approximate", True):
            name = _ours(gelu_tanh)  # keras.ops.gelu defaults to the tanh approximation
        return keras.layers.Activation(name, name=spec.name), spec.args

    return handler


def _tf_call(fn: Callable, n_tensors: int = 1, options: tuple[str, ...] = ()):
    """A mask-building op (x != 0, cast, zeros_like, expand_dims): the TensorFlow function on the
    tf-keras tensor, which tf-keras records as a TFOpLambda layer; constants must be scalars."""

    def handler(spec: OpSpec):
        tensors, constants = spec.args[:n_tensors], spec.args[n_tensors:]
        if not all(_is_tensor(t) for t in tensors) or spec.kwargs or any(
                not isinstance(c, (numbers.Number, str)) for c in constants):
            raise spec.refuse("is called in a form the importer does not know")
        config = {k: spec.config[k] for k in options if spec.config.get(k) is not None}
        return (lambda *xs: fn(*xs, *constants, **config)), list(tensors)

    return handler


def _index(value):
    """A GetItem key as Keras 3 stores it (__slice__ dicts, ints, None, __ellipsis__) -> Python."""
    if isinstance(value, dict) and value.get("class_name") == "__slice__":
        cfg = value.get("config") or {}
        return slice(cfg.get("start"), cfg.get("stop"), cfg.get("step"))
    if isinstance(value, dict) and value.get("class_name") == "__ellipsis__":
        return Ellipsis
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(str(value)[:60])


def _get_item(spec: OpSpec):
    """x[:, 0, :] (BERT's first-token pooling): a constant index, recorded as a SlicingOpLambda."""
    if len(spec.args) != 2 or not _is_tensor(spec.args[0]) or spec.kwargs:
        raise spec.refuse("is called in a form the importer does not know")
    key = spec.args[1]
    try:
        index = tuple(_index(k) for k in key) if isinstance(key, list) else _index(key)
    except ValueError:
        raise spec.refuse(f"indexes with {str(key)[:60]!r}; only constant ints and slices are supported") from None
    return (lambda x: x[index]), [spec.args[0]]


def _cast(x, dtype):
    return tf.cast(x, dtype)


#: Keras 3 `keras.ops` class name -> handler(OpSpec) -> (tf-keras layer, call args).
OPS: dict[str, Callable[[OpSpec], tuple[Any, list]]] = {
    "Add": _binary(keras.layers.Add, lambda c: (1.0, c), lambda c: (1.0, c), ("add", "add")),
    "Subtract": _binary(keras.layers.Subtract, lambda c: (1.0, -c), lambda c: (-1.0, c), ("subtract", "rsubtract")),
    "Multiply": _binary(keras.layers.Multiply, lambda c: (c, 0.0), lambda c: (c, 0.0), ("multiply", "multiply")),
    "Divide": _binary(None, lambda c: (1.0 / c, 0.0)),
    "TrueDivide": _binary(None, lambda c: (1.0 / c, 0.0)),
    "Maximum": _binary(keras.layers.Maximum, None),
    "Minimum": _binary(keras.layers.Minimum, None),
    "Relu": _unary_activation("relu"),
    "Relu6": _unary_activation("relu6"),
    "Sigmoid": _unary_activation("sigmoid"),
    "Silu": _unary_activation("silu"),
    "Swish": _unary_activation("silu"),
    "HardSigmoid": _unary_activation("hard_sigmoid"),
    "HardSilu": _unary_activation("hard_silu"),
    "Gelu": _unary_activation("gelu", {"approximate": (True, False)}),
    "Tanh": _unary_activation("tanh"),
    "Softmax": _unary_activation("softmax", {"axis": (-1, None)}),
    # padding masks: ids != 0, segment ids of zeros, the mask's dtype and axes
    "NotEqual": _tf_call(tf.math.not_equal),
    "Equal": _tf_call(tf.math.equal),
    "Greater": _tf_call(tf.math.greater),
    "Less": _tf_call(tf.math.less),
    "Cast": _tf_call(_cast, options=("dtype",)),
    "ZerosLike": _tf_call(tf.zeros_like, options=("dtype",)),
    "OnesLike": _tf_call(tf.ones_like, options=("dtype",)),
    "ExpandDims": _tf_call(tf.expand_dims, options=("axis",)),
    "GetItem": _get_item,
}


#: KerasHub classes the importer rebuilds (compressor/layers/hub.py): layers, and backbones whose
#: functional graph is inlined layer by layer. A file naming any other KerasHub class is refused.
HUB_LAYER_CLASSES = frozenset({"ReversibleEmbedding", "PositionEmbedding", "TokenAndPositionEmbedding",
                               "TransformerEncoder", "ViTPatchingAndEmbedding", "ViTEncoder"})
HUB_BACKBONES = frozenset({"BertBackbone", "DistilBertBackbone", "RobertaBackbone", "ViTBackbone"})
#: KerasHub functions a stored layer config may name (activations), rebuilt by name in hub.py.
HUB_FUNCTIONS = frozenset({"gelu_approximate"})


def hub_class(layer_config: dict) -> str | None:
    """The KerasHub class a stored layer names ('keras_hub>TransformerEncoder'), or None."""
    registered = str(layer_config.get("registered_name") or "")
    if registered.startswith("keras_hub>"):
        return registered.split(">", 1)[1]
    if str(layer_config.get("module") or "").startswith("keras_hub."):
        return str(layer_config.get("class_name"))
    return None


def is_op(layer_config: dict) -> bool:
    """True for a `keras.ops` node of a Keras 3 functional graph (not a layer)."""
    return str(layer_config.get("module") or "").startswith("keras.src.ops")


def recognised(layer_config: dict) -> bool:
    """A stored class the tables know: a keras.ops node or a Keras-library class we rebuild."""
    module = str(layer_config.get("module") or "")
    class_name = layer_config.get("class_name")
    if is_op(layer_config):
        return class_name in OPS
    if hub_class(layer_config) is not None:
        return hub_class(layer_config) in HUB_LAYER_CLASSES | HUB_BACKBONES | HUB_FUNCTIONS
    return class_name in LIBRARY_CLASSES.get(module, ())


#: Our tf-keras classes: model_io treats them like tf-keras' own layers.
IMPORT_CLASSES = (LayerScale, StochasticDepth, ConstantTerm, PositionEmbedding, ClassToken)

__all__ = [
    "ACTIVATIONS", "OPS", "REFUSED", "LIBRARY_CLASSES", "IMPORT_CLASSES", "LayerSpec", "OpSpec",
    "LayerScale", "StochasticDepth", "ConstantTerm", "PositionEmbedding", "is_op", "recognised", "same_class",
]
