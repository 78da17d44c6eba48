"""Training helpers: the source article's reference model, accuracy, and fine-tuning that keeps zeros.

Fine-tuning after a structural change would regrow every pruned weight (the source article's
mistake); `fit` re-applies the zero masks after every batch so the weight stage's sparsity
survives the later stages.
"""
from __future__ import annotations

import contextlib

import numpy as np

from compressor.core._tf import keras, tf
from compressor.core.errors import CompressorError
from compressor.data.sources import Dataset
from compressor.train import distill, distribute


def reference_model(input_shape=(784,), classes: int = 10, hidden: int = 128) -> keras.Model:
    """The source article's model: Flatten -> Dense(128, relu) -> Dense(10, softmax)."""
    return keras.Sequential(
        [
            keras.layers.Flatten(input_shape=input_shape, name="flatten"),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(classes, activation="softmax", name="classifier"),
        ],
        name="reference_mlp",
    )


def output_is_probability(model: keras.Model) -> bool:
    """True when the last layer applies softmax, so the loss must not apply it again."""
    last = model.layers[-1]
    last = getattr(last, "layer", last)  # see through tfmot's PruneLowMagnitude wrapper
    act = getattr(last, "activation", None)
    return getattr(act, "__name__", "") == "softmax" or type(last).__name__ == "Softmax"


def compile_for_training(model: keras.Model, learning_rate: float, task=None, loss_weights=None) -> keras.Model:
    """Adam with the task's loss (compressor/config/task.py); without a task, top-1 classification.
    `loss_weights` (one per output) scale the task losses (distillation gives the rest to its KL term)."""
    if task is None:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not output_is_probability(model))
        metrics = ["accuracy"]
    else:
        loss, metrics = task.keras_losses(), task.compile_metrics()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics, loss_weights=loss_weights)
    return model


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    pred = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(pred.reshape(len(x), -1), axis=1) == y))


def predictions(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return model.predict(x, batch_size=batch_size, verbose=0)


def kernel_masks(model: keras.Model) -> dict[tuple[str, int], np.ndarray]:
    """Where each kernel is zero now; these zeros must stay zero. Keyed by (layer name, index among its
    trainable weights), not by the weight's name: a model rebuilt from its config (the depth stage's
    trials) can name every kernel `kernel:0`, and masks keyed by that name landed on the wrong weight
    (ResNet50V2: a 3x3x512x512 mask on the 2048x10 classifier)."""
    masks = {}
    for layer in model.layers:
        for i, weight in enumerate(layer.trainable_weights):
            if len(weight.shape) >= 2:
                value = weight.numpy()
                if np.any(value == 0):
                    masks[(layer.name, i)] = value != 0
    return masks


class HoldZeros(keras.callbacks.Callback):
    """Re-apply fixed masks after every training batch so pruned weights never regrow."""

    def __init__(self, masks: dict[tuple[str, int], np.ndarray]):
        super().__init__()
        self.masks = masks
        self._targets: list = []

    def on_train_begin(self, logs=None):
        layers = {layer.name: layer for layer in self.model.layers}
        self._targets = []
        for (name, i), mask in self.masks.items():
            weights = layers[name].trainable_weights if name in layers else []
            if i < len(weights) and tuple(weights[i].shape) == mask.shape:
                self._targets.append((weights[i], tf.constant(mask, dtype=weights[i].dtype)))
        self._apply()

    def on_train_batch_end(self, batch, logs=None):
        self._apply()

    def _apply(self):
        for weight, mask in self._targets:
            weight.assign(weight * mask)


class StopOnNonFinite(keras.callbacks.Callback):
    """End a fine-tune at the first NaN/Inf loss (checked per batch) or NaN/Inf weight (per epoch), in
    one line naming the fine-tune and the epoch. Keras trains on silently: the weights turn NaN and
    the run later failed on a symptom ("weight stage reached only 0% ...; raise weight.epochs")."""

    def __init__(self, label: str, epochs: int):
        super().__init__()
        self.label, self.epochs, self._epoch = label, epochs, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self._diverged(f"the training loss became {float(loss)} (batch {batch + 1})")

    def on_epoch_end(self, epoch, logs=None):
        bad = [w.name.split(":")[0] for w in self.model.trainable_weights
               if not bool(tf.reduce_all(tf.math.is_finite(w)))]
        if bad:
            loss = (logs or {}).get("loss")
            self._diverged(f"the weights became NaN/Inf ({bad[0]}" + (f"; loss {float(loss):.3g})" if loss is not None
                                                                      else ")"))

    def _diverged(self, what: str):
        raise CompressorError(f"{self.label}: {what} in epoch {self._epoch}/{self.epochs}: the fine-tune diverged "
                              "(NaN/Inf); scale the inputs to a small range (about -1..1) or lower the recipe's "
                              "learning_rate")


def fit(model: keras.Model, data: Dataset, epochs: int, batch_size: int, learning_rate: float,
        callbacks: list | None = None, hold_zeros: bool = True, progress=None, task=None,
        label: str | None = None, teacher: keras.Model | None = None, distill_cfg=None) -> keras.Model:
    """Fine-tune `model` in place on the data's training arrays or stream (`data.fit_args`); existing
    kernel zeros are held when `hold_zeros`. A NaN/Inf loss ends it with an error naming `label`
    (the stage's fine-tune; default: the progress bar's label).

    Under a recipe's `distribute:` strategy a copy built in its scope trains (global batch
    `batch_size` split over the replicas) and its weights are copied back (compressor.train.distribute).
    With `teacher` and the recipe's `distill` settings (`distill_cfg`) the loss adds the teacher's softened
    outputs (compressor.train.distill)."""
    if epochs <= 0:
        return model
    trained = model
    if distribute.strategy() is not None and not distribute.built_in_scope(model):
        with distribute.scope():
            trained = clone_with_weights(model)
    step = _distillation(trained, teacher, distill_cfg, task)
    with distribute.scope():
        compile_for_training(trained, learning_rate, task, step[0] if step else None)
    cbs = list(callbacks or [])
    cbs.append(StopOnNonFinite(label or getattr(progress, "label", None) or "fine-tune", epochs))
    if hold_zeros:
        masks = kernel_masks(trained)
        if masks:
            cbs.append(HoldZeros(masks))
    if progress is not None:
        if hasattr(progress, "samples_per_epoch"):  # progress.py's EpochBar shows samples/s
            progress.samples_per_epoch = data.known_count("train")  # None for a stream of unknown size
        cbs.append(progress)
    with data.errors(), (distill.attached(trained, *step[1:]) if step else contextlib.nullcontext()):
        trained.fit(**data.fit_args(batch_size), epochs=epochs, verbose=0, callbacks=cbs)
    if trained is not model:
        model.set_weights(trained.get_weights())
    if not any(isinstance(layer, keras.layers.Wrapper) for layer in model.layers):  # tfmot: after strip_pruning
        recalibrate_batchnorm(model, data, batch_size)
    return model


def _distillation(student: keras.Model, teacher, cfg, task):
    """(loss weights, teacher, per-output plan, alpha, T) when this fine-tune distills, else None. Under a
    strategy the teacher is copied into its scope like the student, so every replica reads its weights."""
    if not distill.active(student, teacher, cfg):
        return None
    outputs = distill.plan(student, task, output_is_probability(student))
    if not any(distilled for distilled, _ in outputs):
        return None
    if distribute.strategy() is not None and not distribute.built_in_scope(teacher):
        with distribute.scope():
            teacher = clone_with_weights(teacher)
    return distill.loss_weights(outputs, cfg.alpha), teacher, outputs, cfg.alpha, cfg.temperature


def recalibrate_batchnorm(model: keras.Model, data, batch_size: int = 32, batches: int = 50) -> None:
    """Re-estimate BatchNormalization's moving statistics after fine-tuning, weights frozen.

    A short fine-tune moves the weights faster than the moving averages follow (keras.applications
    uses momentum 0.999: 1,000 steps leave a third of the old statistics), so a pruned MobileNetV2
    can test at chance although it trains well. Like AdaBN and NNCF's BatchNorm adaptation, run up to
    `batches` training batches (`data.train_inputs`) in training mode with the momentum set so that
    each moving statistic becomes the plain average of the batch statistics.
    """
    layers = [layer for layer in model.layers if type(layer) is keras.layers.BatchNormalization]
    if not layers:
        return
    saved = {layer: layer.momentum for layer in layers}
    try:
        for step, x in enumerate(data.train_inputs(batch_size, batches)):
            for layer in layers:
                layer.momentum = step / (step + 1.0)  # cumulative average: the first batch replaces the old value
            model(x, training=True)
    finally:
        for layer, momentum in saved.items():
            layer.momentum = momentum


def train_reference(data: Dataset, epochs: int = 10, seed: int = 0, progress=None) -> keras.Model:
    """Train the article's MLP on `data` (the demo's starting point)."""
    keras.utils.set_random_seed(seed)
    model = reference_model(input_shape=data.input_shape, classes=data.num_classes)
    fit(model, data, epochs=epochs, batch_size=32, learning_rate=1e-3, hold_zeros=False, progress=progress)
    return model


def clone_with_weights(model: keras.Model) -> keras.Model:
    """An independent copy: tfmot wraps layer objects in place, so the baseline must be cloned first."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def count_params(model: keras.Model) -> tuple[int, int]:
    """(all weights, non-zero weights) over every weight of the model."""
    total = nonzero = 0
    for w in model.weights:
        value = w.numpy()
        total += value.size
        nonzero += int(np.count_nonzero(value))
    return total, nonzero
