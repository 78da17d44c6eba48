"""Quantization-aware fine-tuning (tfmot), for a model whose post-training int8 misses the budget.

Post-training int8 takes its ranges from calibration samples and rounds the trained weights; a model
with a wide activation range (an outlier input feature, DenseNet121's concatenations: full-integer
0.133 against 0.847 float) loses its accuracy there. A short fine-tune with fake-quant ops in the
graph lets the weights adapt to int8. Pruning-preserving (tfmot's `Default8BitPrunePreserveQuantizeScheme`)
when the kernels hold zeros, so every pruned weight stays zero; plain default 8-bit when they hold
none (structurally pruned units are physically gone already). Layers tfmot has no int8 form for
(a BatchNormalization not folded into a conv, custom layers) stay float in the file.
"""
from __future__ import annotations

from compressor.core._tf import keras
from compressor.train import training

EPOCHS = 1
RATE_SCALE = 0.1  # of the recipe's learning rate: the model is trained already, only the rounding is new


def quantize_aware(model: keras.Model) -> keras.Model:
    """`model`'s copy with fake-quant ops on every layer tfmot can quantize (its weights copied)."""
    import tensorflow_model_optimization as tfmot

    q = tfmot.quantization.keras
    sparse = any(layer.get_weights() and any((w == 0).any() for w in layer.get_weights() if w.ndim >= 2)
                 for layer in model.layers)
    scheme = (tfmot.quantization.keras.collab_opts.Default8BitPrunePreserveQuantizeScheme() if sparse
              else q.default_8bit.Default8BitQuantizeScheme())
    registry = scheme.get_quantize_registry()
    copy = training.clone_with_weights(model)  # tfmot wraps the layer objects it is given

    def annotate(layer):
        return q.quantize_annotate_layer(layer) if registry.supports(layer) else layer

    annotated = keras.models.clone_model(copy, clone_function=annotate)
    with q.quantize_scope():
        return q.quantize_apply(annotated, scheme)


def fine_tune(model: keras.Model, data, task, recipe, progress=None) -> keras.Model:
    """The quantization-aware copy of `model`, fine-tuned EPOCHS on the run's training data with its
    loss, zeros held (the scheme preserves them; `training.fit` re-applies the masks as well)."""
    quantized = quantize_aware(model)
    training.fit(quantized, data, EPOCHS, recipe.batch_size, recipe.learning_rate * RATE_SCALE, task=task,
                 progress=progress, label="quantization-aware fine-tune")
    return quantized
