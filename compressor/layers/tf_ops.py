"""tf-keras wraps plain TensorFlow calls on Keras tensors (`x + 3.0`, `x * (1/6)`, `tf.nn.relu6(x)`)
in TFOpLambda layers; MobileNetV3's hard-swish is built this way. An elementwise op with scalar
constants keeps every channel's identity; the same op on two tensors couples their channels like
an Add. Anything else (a per-channel constant, a reduction, a transpose) is unknown territory."""
from __future__ import annotations

import numpy as np

from compressor.core._tf import keras
from compressor.layers.base import register
from compressor.layers.merge import Elementwise

try:  # the classes are not exported publicly by tf-keras
    from tf_keras.src.layers.core.tf_op_layer import SlicingOpLambda, TFOpLambda
except ImportError:  # pragma: no cover - other tf-keras layouts
    TFOpLambda = type("TFOpLambdaUnavailable", (keras.layers.Layer,), {})
    SlicingOpLambda = type("SlicingOpLambdaUnavailable", (keras.layers.Layer,), {})

ELEMENTWISE_OPS = frozenset({
    "__operators__.add", "math.add", "math.subtract", "math.multiply", "math.truediv", "math.divide",
    "math.maximum", "math.minimum", "nn.relu", "nn.relu6", "nn.silu", "nn.swish", "nn.gelu", "nn.elu",
    "nn.leaky_relu", "math.sigmoid", "math.tanh", "nn.sigmoid", "nn.tanh", "math.abs", "math.negative",
    "math.square", "math.exp",
})

#: Ops that build a padding mask from token ids (ids != 0, its dtype and axes, zero segment ids) or pick
#: tokens (BERT's x[:, 0, :]): no channels of a producer pass through in a way we reason about.
MASK_OPS = frozenset({
    "math.not_equal", "math.equal", "math.greater", "math.less", "cast", "expand_dims", "zeros_like",
    "ones_like", "math.minimum", "__operators__.getitem",
})


def _tensor(value) -> bool:
    return hasattr(value, "_keras_history") or type(value).__name__ == "KerasTensor"


@register
class TFOp(Elementwise):
    """Propagates like an elementwise merge: one tensor passes through, two are coupled."""

    kinds = (TFOpLambda, SlicingOpLambda)
    family = "tf op"
    observe_through = True

    def check(self, layer):
        if layer.symbol in MASK_OPS and layer.symbol not in ELEMENTWISE_OPS:
            return None
        if layer.symbol not in ELEMENTWISE_OPS:
            return f"TensorFlow op {layer.symbol} is not a known elementwise op"
        constants = [v for v in (*layer.inbound_nodes[0].call_args, *layer.inbound_nodes[0].call_kwargs.values())
                     if not _tensor(v) and v is not None and not isinstance(v, str)]
        if any(np.ndim(c) != 0 for c in constants) or len(layer.inbound_nodes) != 1:
            return f"TensorFlow op {layer.symbol} with a non-scalar constant"
        return None

    def propagate(self, layer, ins, shapes, graph):
        if layer.symbol in MASK_OPS and layer.symbol not in ELEMENTWISE_OPS:
            for layout in ins:
                for space in layout.spaces:
                    graph.block_space(space, f"read by TensorFlow op '{layer.name}' ({layer.symbol})")
            return graph.fresh_output(layer, f"TensorFlow op {layer.symbol}")
        return super().propagate(layer, ins, shapes, graph)
