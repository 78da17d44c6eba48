"""Graph surgery: removing units whose outgoing weights are zero must not change the outputs.

Each model gets some units "silenced" by hand (the consumer weights that read them set to zero,
computed here independently of the surgery code), so the smaller model must give the same outputs
while its kernels are really smaller.
"""
import warnings

import numpy as np
import pytest

from compressor.core._tf import keras, tf
from compressor.graph.surgery import (
    SurgeryWarning,
    coupled_groups,
    prunable_layers,
    remove_units,
)

L = keras.layers


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def _outputs(model, x):
    return model(x, training=False).numpy()


def _randomize_batch_norms(model):
    """Non-trivial BN statistics, so that slicing them wrongly would show in the outputs."""
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            layer.set_weights([rng.uniform(0.5, 1.5, shape).astype("float32") for shape in shapes])


def _zero(model, layer_name, weight_index, axis, positions):
    """Zero the given positions of one weight tensor along `axis` (silences what it reads)."""
    layer = model.get_layer(layer_name)
    weights = layer.get_weights()
    index = [slice(None)] * weights[weight_index].ndim
    index[axis] = list(positions)
    weights[weight_index][tuple(index)] = 0.0
    layer.set_weights(weights)


def _flatten_rows(height, width, channels, channel_indices):
    """Rows of the Dense after Flatten of (H, W, C) that read the given channels."""
    return [
        h * width * channels + w * channels + c
        for h in range(height)
        for w in range(width)
        for c in channel_indices
    ]


def _kernel_shape(model, name, weight="kernel"):
    layer = model.get_layer(name)
    return next(tuple(v.shape) for v in layer.weights if weight in v.name.split("/")[-1])


# ------------------------------------------------------------------------------------ models


def _mlp():
    return keras.Sequential(
        [
            L.Flatten(input_shape=(4, 4, 2), name="flat"),
            L.Dense(16, activation="relu", name="d1"),
            L.Dense(12, activation="relu", name="d2"),
            L.Dense(3, activation="softmax", name="out"),
        ]
    )


def _residual_cnn():
    inputs = keras.Input((8, 8, 3), name="input")
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.MaxPooling2D(name="pool")(x)
    branch = L.Conv2D(6, 3, padding="same", name="c2")(x)
    branch = L.BatchNormalization(name="bn2")(branch)
    branch = L.Activation("relu", name="relu2")(branch)
    shortcut = L.Conv2D(6, 1, name="c3")(x)
    added = L.Add(name="add")([branch, shortcut])
    x4 = L.Conv2D(4, 3, padding="same", activation="relu", name="c4")(added)
    x = L.Concatenate(name="cat")([added, x4])  # 6 + 4 channels
    x = L.Flatten(name="flat")(x)  # 4 x 4 x 10
    x = L.Dense(8, activation="relu", name="d1")(x)
    x = L.Dropout(0.5, name="drop")(x)
    outputs = L.Dense(3, name="out")(x)
    model = keras.Model(inputs, outputs, name="residual_cnn")
    _randomize_batch_norms(model)
    return model


def _silence_residual_cnn(model):
    """Plan for the residual CNN plus the zeroing that makes those units carry no signal."""
    _zero(model, "c2", 0, 2, [1, 4])  # c1 -> bn1 -> relu -> pool -> c2 / c3
    _zero(model, "c3", 0, 2, [1, 4])
    _zero(model, "c4", 0, 2, [0, 5])  # Add group {c2, c3} -> c4, and -> cat -> flat -> d1
    _zero(model, "d1", 0, 0, _flatten_rows(4, 4, 10, [0, 5]))
    _zero(model, "d1", 0, 0, _flatten_rows(4, 4, 10, [6 + 2]))  # c4 unit 2 sits at cat offset 6
    _zero(model, "out", 0, 0, [3, 6])  # d1
    return {"c1": [1, 4], "c2": [0, 5], "c4": [2], "d1": [3, 6]}


def _depthwise_separable():
    inputs = keras.Input((8, 8, 3), name="input")
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.SeparableConv2D(6, 3, padding="same", depth_multiplier=2, name="sep1")(x)
    x = L.LeakyReLU(name="leaky")(x)
    x = L.ZeroPadding2D(name="pad")(x)
    x = L.SeparableConv2D(5, 3, activation="elu", name="sep2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, name="out")(x)
    model = keras.Model(inputs, outputs, name="depthwise_separable")
    _randomize_batch_norms(model)
    return model


def _silence_depthwise_separable(model):
    # c1 channels pass dw (multiplier 1) and reach sep1's pointwise rows c*2 + j (multiplier 2).
    _zero(model, "sep1", 1, 2, [c * 2 + j for c in (0, 3, 7) for j in range(2)])
    _zero(model, "sep2", 1, 2, [1, 4])  # sep1 -> sep2 pointwise rows
    _zero(model, "out", 0, 0, [2])  # sep2 -> gap -> out
    return {"c1": [0, 3, 7], "sep1": [1, 4], "sep2": [2]}


def _sequence_model():
    """Sequential with Conv1D, a channel-keeping Reshape and a flattening Reshape."""
    return keras.Sequential(
        [
            L.Conv2D(6, 3, input_shape=(6, 6, 2), name="c2d"),  # (4, 4, 6)
            L.Reshape((16, 6), name="to_sequence"),
            L.Conv1D(5, 3, name="c1d"),  # (14, 5)
            L.MaxPooling1D(name="pool"),  # (7, 5)
            L.Reshape((35,), name="flat"),
            L.Dense(3, name="out"),
        ]
    )


def _silence_sequence_model(model):
    _zero(model, "c1d", 0, 1, [0, 5])
    _zero(model, "out", 0, 0, [t * 5 + 2 for t in range(7)])
    return {"c2d": [0, 5], "c1d": [2]}


def _silence_mlp(model):
    _zero(model, "d2", 0, 0, [1, 5, 7])
    _zero(model, "out", 0, 0, [0, 3])
    return {"d1": [1, 5, 7], "d2": [0, 3]}


CASES = {
    "sequential_mlp": (_mlp, _silence_mlp, {"d1": (32, 13), "d2": (13, 10), "out": (10, 3)}),
    "residual_cnn": (
        _residual_cnn,
        _silence_residual_cnn,
        {
            "c1": (3, 3, 3, 4),
            "c2": (3, 3, 4, 4),
            "c3": (1, 1, 4, 4),
            "c4": (3, 3, 4, 3),
            "d1": (4 * 4 * 7, 6),
            "out": (6, 3),
        },
    ),
    "depthwise_separable": (
        _depthwise_separable,
        _silence_depthwise_separable,
        {"c1": (3, 3, 3, 5), "sep2": (1, 1, 4, 4), "out": (4, 3)},
    ),
    "sequence_reshape": (
        _sequence_model,
        _silence_sequence_model,
        {"c2d": (3, 3, 2, 4), "c1d": (3, 4, 4), "out": (28, 3)},
    ),
}


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES)
def test_removing_silenced_units_keeps_outputs(case):
    build, silence, expected_kernels = CASES[case]
    model = build()
    plan = silence(model)
    x = np.random.default_rng(0).normal(size=(4, *model.input_shape[1:])).astype("float32")

    new_model, result = remove_units(model, plan)

    np.testing.assert_allclose(_outputs(new_model, x), _outputs(model, x), atol=1e-5)
    for name, shape in expected_kernels.items():
        weight = "pointwise_kernel" if name.startswith("sep") else "kernel"
        assert _kernel_shape(new_model, name, weight) == shape, name
    for name, indices in plan.items():
        assert result.units_after[name] == result.units_before[name] - len(indices)
    assert not result.skipped
    assert type(new_model) is type(model)
    assert new_model.input_shape == model.input_shape
    assert [layer.name for layer in new_model.layers] == [layer.name for layer in model.layers]


def test_residual_cnn_side_layers_are_sliced():
    new_model, result = remove_units(_residual_cnn(), {"c1": [1, 4], "c2": [0, 5]})
    assert result.units_after["c3"] == 4  # coupled to c2 through the Add
    assert _kernel_shape(new_model, "bn1", "gamma") == (4,)
    assert _kernel_shape(new_model, "bn2", "moving_variance") == (4,)


def test_depthwise_bias_and_separable_depthwise_kernel_are_sliced():
    new_model, _ = remove_units(_depthwise_separable(), {"c1": [0, 3, 7], "sep1": [1, 4]})
    assert _kernel_shape(new_model, "dw", "depthwise_kernel") == (3, 3, 5, 1)
    assert _kernel_shape(new_model, "dw", "bias") == (5,)
    assert _kernel_shape(new_model, "sep1", "depthwise_kernel") == (3, 3, 5, 2)
    assert _kernel_shape(new_model, "sep1", "pointwise_kernel") == (1, 1, 10, 4)
    assert _kernel_shape(new_model, "sep2", "depthwise_kernel") == (3, 3, 4, 1)


def test_groups_and_prunable_layers():
    model = _residual_cnn()
    assert coupled_groups(model) == [["c1"], ["c2", "c3"], ["c4"], ["d1"], ["out"]]
    assert prunable_layers(model) == {"c1": 6, "c2": 6, "c3": 6, "c4": 4, "d1": 8}


def test_coupled_group_with_different_plans_uses_intersection():
    with pytest.warns(SurgeryWarning, match="intersection"):
        new_model, result = remove_units(_residual_cnn(), {"c2": [0, 5], "c3": [5, 1]})
    assert result.units_after["c2"] == result.units_after["c3"] == 5
    assert "c2" in result.notes and "c3" in result.notes


def test_never_removes_every_unit():
    with pytest.warns(SurgeryWarning, match="kept unit"):
        new_model, result = remove_units(_mlp(), {"d1": range(16)})
    assert result.units_after["d1"] == 1
    assert "d1" in result.notes
    assert _kernel_shape(new_model, "d2") == (1, 12)


def test_merge_folds_identical_units():
    model = _mlp()
    kernel, bias = model.get_layer("d1").get_weights()
    kernel[:, 5], bias[5] = kernel[:, 2], bias[2]  # unit 5 duplicates unit 2
    kernel[:, 9], bias[9] = kernel[:, 2], bias[2]  # and so does unit 9
    model.get_layer("d1").set_weights([kernel, bias])
    x = np.random.default_rng(0).normal(size=(4, 4, 4, 2)).astype("float32")

    new_model, result = remove_units(model, {"d1": [5]}, merge={"d1": {5: 2, 9: 2}})

    assert result.units_after["d1"] == 14
    assert _kernel_shape(new_model, "d2") == (14, 12)
    np.testing.assert_allclose(_outputs(new_model, x), _outputs(model, x), atol=1e-5)


def test_merge_through_batch_norm_warns_it_is_approximate():
    inputs = keras.Input((6,), name="input")
    x = L.Dense(4, name="d1")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    with pytest.warns(SurgeryWarning, match="approximate at 'out'.*'bn'"):
        _, result = remove_units(model, {}, merge={"d1": {1: 0}})
    assert result.units_after["d1"] == 3


def _lambda_model():
    inputs = keras.Input((6,), name="input")
    x = L.Dense(8, activation="relu", name="d1")(inputs)
    x = L.Lambda(lambda t: t * 2.0, name="double")(x)
    x = L.Dense(6, activation="relu", name="d2")(x)
    outputs = L.Dense(2, name="out")(x)
    return keras.Model(inputs, outputs)


def _multiply_model():
    inputs = keras.Input((6,), name="input")
    x = L.Dense(8, name="d1")(inputs)
    gate = L.Dense(8, activation="sigmoid", name="gate")(inputs)
    x = L.Multiply(name="gating")([x, gate])
    x = L.Dense(6, activation="relu", name="d2")(x)
    outputs = L.Dense(2, name="out")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "build, blocker",
    [(_lambda_model, "double")],  # a recurrent consumer prunes its producer: tests/test_recurrent.py
)
def test_unsupported_consumer_skips_producer_only(build, blocker):
    model = build()
    with pytest.warns(SurgeryWarning, match=f"'{blocker}'"):
        new_model, result = remove_units(model, {"d1": [0, 1], "d2": [3]})
    assert blocker in result.skipped["d1"]
    assert result.units_after["d1"] == result.units_before["d1"]
    assert result.units_after["d2"] == 5
    assert _kernel_shape(new_model, "d2")[-1] == 5
    assert "d1" not in prunable_layers(model)
    x = np.random.default_rng(0).normal(size=(2, *model.input_shape[1:])).astype("float32")
    assert _outputs(new_model, x).shape == (2, 2)


def test_multiply_gate_couples_gated_and_gating_units():
    """Squeeze-excite style gating: the gate and the tensor it gates lose the same channels."""
    model = _multiply_model()
    assert ["d1", "gate"] in coupled_groups(model)
    new_model, result = remove_units(model, {"d1": [0, 1]})
    assert result.units_after["gate"] == result.units_after["d1"] == 6
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    zeroed = keras.models.clone_model(model)
    zeroed.set_weights(model.get_weights())
    kernel, bias = zeroed.get_layer("d2").get_weights()
    kernel[[0, 1]] = 0.0  # what d2 sees once units 0 and 1 of the gated product are gone
    zeroed.get_layer("d2").set_weights([kernel, bias])
    np.testing.assert_allclose(_outputs(new_model, x), _outputs(zeroed, x), atol=1e-5)


def test_model_output_and_input_coupling_are_never_pruned():
    inputs = keras.Input((8,), name="input")
    x = L.Dense(8, name="d1")(inputs)
    residual = L.Add(name="add")([inputs, x])  # d1's channels are the input's channels
    outputs = L.Dense(3, name="out")(residual)
    model = keras.Model(inputs, outputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = remove_units(model, {"d1": [0], "out": [1]})
    assert "model output" in result.skipped["out"]
    assert "input" in result.skipped["d1"]
    assert result.units_after == result.units_before
    assert sum(issubclass(w.category, SurgeryWarning) for w in caught) == 2
    assert prunable_layers(model) == {}


def test_plan_errors_are_reported():
    with pytest.raises(ValueError, match="not a layer"):
        remove_units(_mlp(), {"nope": [0]})
    with pytest.raises(ValueError, match="out of range"):
        remove_units(_mlp(), {"d1": [16]})
    with pytest.raises(ValueError, match="Flatten"):
        remove_units(_mlp(), {"flat": [0]})


def test_input_model_unchanged_and_new_model_trainable():
    model = _mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    plan = _silence_mlp(model)
    before = [w.copy() for w in model.get_weights()]

    new_model, _ = remove_units(model, plan)
    x = np.random.default_rng(0).normal(size=(16, 4, 4, 2)).astype("float32")
    y = np.arange(16) % 3
    history = new_model.fit(x, y, epochs=2, batch_size=8, verbose=0)

    after = model.get_weights()
    assert len(after) == len(before)
    assert all(np.array_equal(a, b) for a, b in zip(after, before))
    assert model.get_layer("d1").units == 16
    assert np.isfinite(history.history["loss"]).all()
    assert "accuracy" in history.history
    assert new_model.optimizer is not model.optimizer


def test_surgered_cnn_exports_to_tflite_and_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    tf2onnx = pytest.importorskip("tf2onnx")
    from ai_edge_litert.interpreter import Interpreter

    model = _residual_cnn()
    new_model, _ = remove_units(model, _silence_residual_cnn(model))
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype("float32")
    expected = _outputs(new_model, x)

    tflite_path = tmp_path / "cnn.tflite"
    tflite_path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(new_model).convert())
    interpreter = Interpreter(model_path=str(tflite_path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    tflite_out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(tflite_out, expected, atol=1e-4)

    onnx_path = tmp_path / "cnn.onnx"
    signature = (tf.TensorSpec((None, 8, 8, 3), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(
        new_model, input_signature=signature, opset=17, output_path=str(onnx_path)
    )
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4)


def test_a_rebuilt_model_keeps_the_users_initializers_recurrent_layers_included():
    """Surgery builds with zero initializers (every weight is set right after) and puts the user's back;
    an LSTM's initializers are read-only properties of its cell and stay as they were."""
    inputs = keras.Input((5, 4))
    x = keras.layers.Dense(8, kernel_initializer="he_normal", name="proj")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.LSTM(6, name="lstm")(x))
    model = keras.Model(inputs, outputs)
    pruned, result = remove_units(model, {"proj": [0, 1]})
    assert result.units_after["proj"] == 6
    assert pruned.get_layer("proj").get_config()["kernel_initializer"]["class_name"] == "HeNormal"
    assert pruned.get_layer("lstm").get_config()["kernel_initializer"]["class_name"] == "GlorotUniform"
