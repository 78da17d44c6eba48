import numpy as np

from compressor.core._tf import keras
from compressor.stages import weight
from compressor.stages.base import StageContext
from compressor.train.training import HoldZeros, accuracy, fit, kernel_masks


def _run(model, digits, recipe):
    return weight.apply(model, recipe.stages[0], StageContext(recipe, digits))


def test_reaches_target_with_executable_blocks_and_leaves_input_alone(small_mlp, digits, fast_recipe):
    before = [w.copy() for w in small_mlp.get_weights()]
    recipe = fast_recipe(targets=["tflite"])
    outcome = _run(small_mlp, digits, recipe)
    kernel = outcome.model.get_layer("hidden").kernel.numpy()  # (in, out)
    assert abs(np.mean(kernel == 0) - 0.8) < 0.02
    # (4, 1) blocks: 4 consecutive input weights of one output unit are zero together
    blocks = (kernel.reshape(16, 4, 64) == 0)
    assert np.all(blocks.all(axis=1) == blocks.any(axis=1))
    assert np.all(outcome.model.get_layer("classifier").kernel.numpy() != 0)  # classifier left dense
    assert all(np.array_equal(a, b) for a, b in zip(before, small_mlp.get_weights()))
    assert (accuracy(outcome.model, digits.x_test, digits.y_test)
            > accuracy(small_mlp, digits.x_test, digits.y_test) - 0.05)


def test_int8_target_uses_16x1_blocks_and_onnx_only_is_unstructured(small_mlp, digits, fast_recipe):
    kernel = _run(small_mlp, digits, fast_recipe(targets=["tflite-int8"])).model.get_layer("hidden").kernel.numpy()
    zero = kernel.reshape(4, 16, 64) == 0
    assert np.all(zero.all(axis=1) == zero.any(axis=1))
    assert fast_recipe(targets=["onnxruntime"]).dense_block() == (1, 1)


def test_masks_hold_during_fine_tuning(small_mlp, digits, fast_recipe):
    pruned = _run(small_mlp, digits, fast_recipe()).model
    zeros_before = pruned.get_layer("hidden").kernel.numpy() == 0
    fit(pruned, digits, epochs=2, batch_size=32, learning_rate=1e-2)
    after = pruned.get_layer("hidden").kernel.numpy()
    assert np.all(after[zeros_before] == 0)
    assert np.any(after[~zeros_before] != 0)


def test_without_hold_zeros_they_regrow(small_mlp, digits, fast_recipe):
    """The trap the source article fell into: retraining without masks regrows pruned weights."""
    pruned = _run(small_mlp, digits, fast_recipe()).model
    zeros_before = pruned.get_layer("hidden").kernel.numpy() == 0
    fit(pruned, digits, epochs=1, batch_size=32, learning_rate=1e-2, hold_zeros=False)
    assert np.any(pruned.get_layer("hidden").kernel.numpy()[zeros_before] != 0)


def test_hold_zeros_callback_reapplies_masks():
    model = keras.Sequential([keras.layers.Dense(3, input_shape=(2,))])
    w, b = model.get_weights()
    w[0, :] = 0
    model.set_weights([w, b])
    masks = kernel_masks(model)
    model.compile("sgd", "mse")
    model.fit(np.ones((8, 2)), np.ones((8, 3)), epochs=2, verbose=0, callbacks=[HoldZeros(masks)])
    assert np.all(model.get_weights()[0][0] == 0)


def test_zeros_of_every_kernel_are_held_in_a_model_the_depth_stage_rebuilt():
    """A model rebuilt from its config can name every kernel `kernel:0`: masks keyed by weight name then
    held one kernel's zeros at most, or put a mask on a weight of another shape (ResNet50V2's run)."""
    from compressor.stages.depth import residual_blocks, without_blocks

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10)
    trial = without_blocks(model, residual_blocks(model)[:1])
    zeroed = ("Conv1", "block_16_project", "predictions")
    for name in zeroed:
        layer = trial.get_layer(name)
        kernel, *rest = layer.get_weights()
        kernel[..., :2] = 0
        layer.set_weights([kernel, *rest])
    masks = kernel_masks(trial)
    assert {name for name, _ in masks} == set(zeroed)
    trial.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    trial.fit(rng.random((32, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, 32), epochs=1, verbose=0,
              callbacks=[HoldZeros(masks)])
    for name in zeroed:
        assert np.all(trial.get_layer(name).get_weights()[0][..., :2] == 0), name
