"""The shared basics that both packages import, and the only part of `compressor` that `exporters`
may import: TensorFlow with tf-keras as `tf.keras`, the one error type the CLI turns into a
one-line message, the registration pattern of every table (`Registry`), stderr quieting for
native libraries, and the enumeration of Keras kernels that the pruning stages zero and
verification counts in the files (they must agree).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compressor.core import model_inputs as inputs  # one array or several (a dict by input name): see there
from compressor.core.errors import CompressorError
from compressor.core.quiet import quiet_stderr
from compressor.core.registry import Registry

if TYPE_CHECKING:  # at run time `keras` comes from __getattr__, so TensorFlow loads only on use
    from compressor.core._tf import keras

__all__ = ["CompressorError", "Registry", "export_form", "inputs", "keras", "keras_kernels", "kernel_zeros",
           "quiet_stderr", "tf"]


def __getattr__(name: str):
    """`tf` and `keras` on first use: `compressor bench`/`inspect` on an .onnx file never pay for
    importing TensorFlow (a deferred import, PEP 562)."""
    if name in ("tf", "keras"):
        from compressor.core import _tf

        return getattr(_tf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export_form(model: keras.Model) -> keras.Model:
    """The model as the converters receive it: the same function with static-shape forms of layers
    whose tf-keras code computes shapes at run time (compressor/layers/export_forms.py); the model
    itself when it has none. Both exporters and verification use it, through the target registry."""
    from compressor import layers

    return layers.export_form(model)


def keras_kernels(model: keras.Model) -> list[np.ndarray]:
    """Kernels (rank >= 2 weights) of every layer: what the pruning stages zero.

    Depthwise kernels (h, w, in, multiplier) are returned as (h, w, in * multiplier) so that the
    last axis is the output channel, the axis int8 per-channel scales run along.
    """
    kernels = []
    for layer in model.layers:
        for w in layer.weights:
            if len(w.shape) >= 2 and not _recurrent_bias(layer, w):
                value = w.numpy()
                if "depthwise_kernel" in w.name and value.ndim == 4:
                    value = value.reshape(value.shape[0], value.shape[1], -1)
                kernels.append(value)
    return kernels


def _recurrent_bias(layer, weight) -> bool:
    """A GRU's bias is (2, 3 units) with reset_after: a bias, not a kernel (tf2onnx stores it as one
    row, and nothing prunes it), though it has two axes."""
    from compressor.core._tf import keras

    recurrent = isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional))
    return recurrent and weight.name.split("/")[-1].startswith("bias")


def kernel_zeros(model: keras.Model) -> tuple[int, int]:
    """(zeros, size) over the kernels: what verification compares with the files."""
    kernels = keras_kernels(model)
    return int(sum(k.size - np.count_nonzero(k) for k in kernels)), int(sum(k.size for k in kernels))
