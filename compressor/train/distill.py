"""Knowledge distillation from the dense model into every fine-tune (Hinton et al. 2015).

A pruned model recovers more of the dense model's accuracy when it learns the dense model's softened
outputs as well as the labels: for each classification output the loss is
`(1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`.
Outputs trained on anything but (sparse) categorical crossentropy (regression, multi-label, custom
losses) keep their task loss alone. An output that is already a softmax probability is softened
through its log-probabilities (log p / T), which equals softening its logits.

The student's own `train_step` is replaced for the duration of one `fit` (an instance attribute, removed
afterwards), so `fit`'s callbacks (the zero masks, tfmot's pruning step) still see the student itself.
"""
from __future__ import annotations

import contextlib
import types

from compressor.core._tf import tf

CATEGORICAL = ("sparse_categorical_crossentropy", "categorical_crossentropy")
_EPS = 1e-7


def soften(output, temperature: float, probability: bool):
    """Log-softmax of `output / T` over the last axis; a probability output goes through log p first."""
    logits = tf.math.log(tf.clip_by_value(output, _EPS, 1.0)) if probability else output
    return tf.nn.log_softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)


def kl_term(teacher_out, student_out, temperature: float, probability: bool):
    """T^2 * KL(teacher || student) on softened outputs, averaged over the batch (and any other axes)."""
    log_t = soften(teacher_out, temperature, probability)
    log_s = soften(student_out, temperature, probability)
    kl = tf.reduce_sum(tf.exp(log_t) * (log_t - log_s), axis=-1)
    return temperature * temperature * tf.reduce_mean(kl)


def plan(model, task, probability: bool = False) -> list[tuple[bool, bool]]:
    """Per output: (distilled, output is a probability). Without a task: top-1 classification, the output
    a probability when `probability` (training.output_is_probability)."""
    outputs = model.outputs if getattr(model, "outputs", None) else [None]
    if task is None:
        return [(True, probability)] * len(outputs)
    result = []
    for i, name in enumerate(task.losses):
        width = outputs[i].shape[-1] if i < len(outputs) and outputs[i] is not None else None
        wide = width is None or width >= 2  # softmax over a single unit carries nothing
        result.append((name in CATEGORICAL and wide, task.activations[i] == "softmax"))
    return result


def loss_weights(outputs: list[tuple[bool, bool]], alpha: float) -> list[float]:
    """The compiled task loss's weight per output: 1 - alpha where the KL term takes alpha, else 1."""
    return [1.0 - alpha if distilled else 1.0 for distilled, _ in outputs]


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def make_train_step(teacher, outputs: list[tuple[bool, bool]], alpha: float, temperature: float):
    """A `train_step` for the student: tf-keras's own (task loss with `loss_weights` from above, plus the
    model's added losses) plus alpha times the KL terms, scaled per replica like Keras scales its losses."""
    from tf_keras.src.engine import data_adapter
    from tf_keras.src.utils import losses_utils

    def train_step(self, data):
        x, y, sample_weight = data_adapter.unpack_x_y_sample_weight(data)
        soft = _as_list(teacher(x, training=False))
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            terms = [kl_term(tf.stop_gradient(t), s, temperature, probability)
                     for t, s, (distilled, probability) in zip(soft, _as_list(y_pred), outputs) if distilled]
            if terms:
                loss = loss + losses_utils.scale_loss_for_distribution(alpha * tf.add_n(terms))
        self._validate_target_and_loss(y, loss)
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    return train_step


@contextlib.contextmanager
def attached(student, teacher, outputs, alpha: float, temperature: float):
    """Within the block `student.fit` trains with distillation; afterwards its own train_step is back."""
    student.train_step = types.MethodType(make_train_step(teacher, outputs, alpha, temperature), student)
    student.train_function = None  # a cached step would skip the new one
    try:
        yield student
    finally:
        del student.train_step
        student.train_function = None


def active(model, teacher, settings) -> bool:
    """Distill when asked, a teacher is given, and it is not the student itself (the loaded model
    fine-tuned in place would teach itself)."""
    return (settings is not None and settings.enabled and teacher is not None and teacher is not model
            and len(_as_list(teacher.outputs if getattr(teacher, "outputs", None) else [None]))
            == len(_as_list(model.outputs if getattr(model, "outputs", None) else [None])))
