"""Distillation from the dense model in every fine-tune (compressor.train.distill)."""
from __future__ import annotations

import numpy as np
import pytest

from compressor.config.recipe import Distill, parse_recipe
from compressor.config.task import Task
from compressor.core._tf import keras, tf
from compressor.core.errors import CompressorError
from compressor.data.sources import Dataset
from compressor.train import distill
from compressor.train.training import clone_with_weights, fit


def _data(n=64, features=6, classes=3, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    return Dataset("tiny", x, y, x[:16], y[:16], x[:16])


def _mlp(seed: int, softmax: bool = False) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.layers.Input((6,)), keras.layers.Dense(8, activation="relu", name="h"),
                             keras.layers.Dense(3, activation="softmax" if softmax else None, name="out")])


def _kl_by_hand(teacher_logits, student_logits, t):
    def softmax(z):
        e = np.exp(z / t - np.max(z / t, axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    p, q = softmax(teacher_logits), softmax(student_logits)
    return t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))


def test_kl_term_equals_the_formula_on_logits_and_on_probabilities():
    teacher = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
    student = np.array([[1.0, 1.0, 0.0], [-1.0, 0.5, 1.5]], np.float32)
    expected = _kl_by_hand(teacher, student, 3.0)
    assert float(distill.kl_term(teacher, student, 3.0, probability=False)) == pytest.approx(expected, rel=1e-5)
    probs = lambda z: tf.nn.softmax(z).numpy()  # noqa: E731 - a softmax output is softened through log p / T
    assert float(distill.kl_term(probs(teacher), probs(student), 3.0, probability=True)) == pytest.approx(expected,
                                                                                                          rel=1e-4)
    assert float(distill.kl_term(teacher, teacher, 3.0, probability=False)) == pytest.approx(0.0, abs=1e-6)


def test_train_step_loss_is_the_blend_of_task_loss_and_kl():
    """One SGD-free step's reported loss: (1 - alpha) * crossentropy + alpha * T^2 * KL, by hand."""
    student, teacher = _mlp(1), _mlp(2)
    x, y = _data().x_train[:8], _data().y_train[:8]
    outputs = distill.plan(student, None, probability=False)
    student.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(True),
                    loss_weights=distill.loss_weights(outputs, 0.3))
    s_logits, t_logits = student(x).numpy(), teacher(x).numpy()
    ce = float(keras.losses.SparseCategoricalCrossentropy(True)(y, s_logits))
    captured = {}
    step = distill.make_train_step(teacher, outputs, 0.3, 2.0)

    def spy(self, data):
        original = self.optimizer.minimize
        self.optimizer.minimize = lambda loss, var_list, tape: captured.setdefault("loss", loss)
        try:
            return step(self, data)
        finally:
            self.optimizer.minimize = original
    spy(student, (tf.constant(x), tf.constant(y)))
    expected = 0.7 * ce + 0.3 * _kl_by_hand(t_logits, s_logits, 2.0)
    assert float(captured["loss"]) == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_trains_exactly_like_plain_fit():
    data, teacher = _data(), _mlp(5)
    plain, taught = _mlp(1), _mlp(1)
    keras.utils.set_random_seed(0)
    fit(plain, data, epochs=2, batch_size=16, learning_rate=1e-2)
    keras.utils.set_random_seed(0)
    fit(taught, data, epochs=2, batch_size=16, learning_rate=1e-2, teacher=teacher,
        distill_cfg=Distill(enabled=True, alpha=0.0))
    for a, b in zip(plain.get_weights(), taught.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    keras.utils.set_random_seed(0)
    other = _mlp(1)
    fit(other, data, epochs=2, batch_size=16, learning_rate=1e-2, teacher=teacher,
        distill_cfg=Distill(enabled=True, alpha=0.9))
    assert not np.allclose(other.get_weights()[0], plain.get_weights()[0])  # the path really distills
    assert "train_step" not in vars(taught)  # the student's own train_step is back


def test_zeros_stay_zero_under_distillation():
    data, teacher = _data(), _mlp(5, softmax=True)
    student = _mlp(1, softmax=True)
    kernel = student.get_layer("h").kernel
    mask = np.random.default_rng(0).random(kernel.shape) < 0.5
    kernel.assign(kernel.numpy() * ~mask)
    fit(student, data, epochs=2, batch_size=16, learning_rate=1e-2, teacher=teacher,
        distill_cfg=Distill(enabled=True, alpha=0.8))
    assert np.all(student.get_layer("h").kernel.numpy()[mask] == 0)
    assert np.count_nonzero(student.get_layer("h").kernel.numpy()[~mask]) == int((~mask).sum())


def test_regression_output_keeps_its_task_loss():
    """Two outputs, one class head, one mse head: only the class head gets the KL term and 1 - alpha."""
    inp = keras.layers.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inp)
    model = keras.Model(inp, [keras.layers.Dense(3, name="cls")(h), keras.layers.Dense(1, name="reg")(h)])
    task = Task(["cls", "reg"], ["sparse_categorical_crossentropy", "mse"], ["accuracy", "mae"], 0, "higher", 0.01,
                [3, 1], ["", ""])
    outputs = distill.plan(model, task)
    assert outputs == [(True, False), (False, False)]
    assert distill.loss_weights(outputs, 0.25) == [0.75, 1.0]
    regression_only = Task(["reg"], ["mse"], ["mae"], 0, "lower", 0.1, [1], [""])
    assert distill.plan(keras.Model(inp, model.outputs[1]), regression_only) == [(False, False)]


def test_teacher_that_is_the_student_is_not_used():
    model = _mlp(1)
    assert not distill.active(model, model, Distill(enabled=True))
    assert not distill.active(model, _mlp(2), Distill(enabled=False))
    assert distill.active(model, clone_with_weights(model), Distill(enabled=True))


@pytest.mark.parametrize("block, fragment", [
    ({"alpha": 1.5}, "distill.alpha"), ({"alpha": -0.1}, "distill.alpha"),
    ({"temperature": 0}, "distill.temperature"), ({"temperature": 1000}, "distill.temperature"),
    ({"alpah": 0.5}, "alpah"),
])
def test_recipe_checks_the_distill_fields(block, fragment):
    with pytest.raises(CompressorError) as err:
        parse_recipe({"distill": block})
    message = str(err.value)
    assert fragment in message and "\n" not in message
    recipe = parse_recipe({"distill": {"alpha": 0.2, "temperature": 2}})
    assert (recipe.distill.enabled, recipe.distill.alpha, recipe.distill.temperature) == (False, 0.2, 2.0)
    assert parse_recipe({"distill": {"enabled": True}}).distill.enabled


def test_two_output_fit_distills_the_class_head_only():
    """alpha = 1: the class head learns only from the teacher, the regression head still from its labels."""
    def two_heads(seed):
        keras.utils.set_random_seed(seed)
        inp = keras.layers.Input((6,))
        h = keras.layers.Dense(8, activation="relu", name="h")(inp)
        return keras.Model(inp, [keras.layers.Dense(3, name="cls")(h), keras.layers.Dense(1, name="reg")(h)])
    base = _data()
    target = base.x_train[:, :1] * 2.0
    data = Dataset("two", base.x_train, [base.y_train, target], base.x_test, [base.y_test, target[:16]], base.x_calib)
    task = Task(["cls", "reg"], ["sparse_categorical_crossentropy", "mse"], ["accuracy", "mae"], 0, "higher", 0.01,
                [3, 1], ["", ""])
    teacher, student = two_heads(7), two_heads(1)
    mse = lambda m: float(np.mean((m.predict(base.x_train, verbose=0)[1] - target) ** 2))  # noqa: E731
    before = mse(student)
    fit(student, data, epochs=10, batch_size=16, learning_rate=3e-2, task=task, teacher=teacher,
        distill_cfg=Distill(enabled=True, alpha=1.0, temperature=1.0))
    assert mse(student) < 0.5 * before
    kl = distill.kl_term(teacher.predict(base.x_train, verbose=0)[0], student.predict(base.x_train, verbose=0)[0],
                         1.0, probability=False)
    assert float(kl) < 0.05
