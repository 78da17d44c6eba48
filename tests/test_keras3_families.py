"""The architectures people ship, built by Keras 3 (keras.applications, a transformer encoder),
import into tf-keras with the same outputs; what cannot be imported is named in one line."""
from __future__ import annotations

import numpy as np
import pytest

from compressor.core._tf import keras, tf
from compressor.core.errors import CompressorError
from compressor.layers.keras3_layers import LayerScale
from compressor.load.model_io import load_model, unsupported_layers

keras3 = pytest.importorskip("keras")
A, L3 = keras3.applications, keras3.layers

# Logits (no softmax) so that a wrong weight or constant cannot hide behind a saturated output.
_COMMON = {"input_shape": (32, 32, 3), "weights": None, "classes": 10, "classifier_activation": None}
FAMILIES = {
    "MobileNetV2": lambda: A.MobileNetV2(alpha=0.35, **_COMMON),
    "MobileNetV3Small": lambda: A.MobileNetV3Small(alpha=0.75, **_COMMON),
    "EfficientNetB0": lambda: A.EfficientNetB0(**_COMMON),
    "EfficientNetV2B0": lambda: A.EfficientNetV2B0(**_COMMON),
    "ResNet50": lambda: A.ResNet50(**_COMMON),
    "ResNet50V2": lambda: A.ResNet50V2(**_COMMON),
    "DenseNet121": lambda: A.DenseNet121(**_COMMON),
    "ConvNeXtTiny": lambda: A.ConvNeXtTiny(**_COMMON),
}
# MobileNetV3 .h5: Keras 3 cannot read back the keras.ops nodes it wrote there (x + 3, x * 1/6);
# the importer labels them from its table. ConvNeXt .h5: see test_layer_scale_... below.
# ResNet50V2 only from .h5 (same layer types as ResNet50 .keras): keeps the file near two minutes.
CASES = [(name, ".keras") for name in FAMILIES if name != "ResNet50V2"] + [
    ("MobileNetV2", ".h5"), ("MobileNetV3Small", ".h5"), ("ResNet50V2", ".h5"),
]
# Imported models whose tf-keras rebuild uses our classes / activations (LayerScale, hard_silu):
# what the pipeline saves after the import (pruned.keras) must load again.
ROUND_TRIP = {"MobileNetV3Small"}  # LayerScale: test_layer_scale_... below


def _vary(model, seed=0):
    """Random BN statistics, LayerScale gammas and biases: a missed copy or a wrong formula shows."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if len(w.shape) != 1 and "bias" not in w.path:
            continue  # kernels are random already; attention biases are (heads, head_dim)
        value = rng.uniform(0.5, 1.5, tuple(w.shape)) if "variance" in w.path or "gamma" in w.path \
            else rng.normal(0.0, 0.3, tuple(w.shape))
        w.assign(value.astype("float32"))
    for layer in model.layers:
        if isinstance(layer, L3.Normalization):
            layer.finalize_state()  # Keras 3 reads assigned mean/variance only from here on
    return model


def _images(n=2, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


def _assert_same(k3_model, tf_model, feed):
    ref = np.asarray(k3_model(feed, training=False))
    got = np.asarray(tf_model(feed, training=False))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
    assert np.abs(ref).max() > 1e-3  # a dead (all-zero) output would prove nothing


def _import_note(loaded) -> str:
    notes = [w for w in loaded.warnings if w.startswith("imported from Keras 3")]
    assert len(notes) == 1 and "outputs match Keras 3" in notes[0]
    return notes[0]


@pytest.mark.parametrize("family, ext", CASES, ids=[f"{n}{e}" for n, e in CASES])
def test_keras_applications_import_with_matching_outputs(tmp_path, family, ext):
    k3_model = _vary(FAMILIES[family]())
    path = tmp_path / f"{family}{ext}"
    k3_model.save(path)

    loaded = load_model(path)

    assert loaded.format == f"Keras 3 {ext} (imported)"
    _import_note(loaded)
    assert unsupported_layers(loaded.model) == []
    assert not [w for w in loaded.warnings if "left unpruned" in w or "dropped" in w]
    _assert_same(k3_model, loaded.model, _images())
    if family in ROUND_TRIP:
        loaded.model.save(tmp_path / "tfk.keras")
        again = load_model(tmp_path / "tfk.keras")
        assert again.format == "tf-keras .keras" and again.warnings == []
        _assert_same(k3_model, again.model, _images(seed=2))


def test_hard_swish_rebuilt_as_activation_and_h5_limit_named(tmp_path):
    """tf-keras' .h5 reader cannot read registered activation functions back: said in one line."""
    inp = L3.Input((5,))
    out = L3.Activation("hard_sigmoid")(L3.Dense(6, activation="hard_silu", name="hs")(inp))
    k3_model = _vary(keras3.Model(inp, out), seed=7)
    k3_model.save(tmp_path / "hs.keras")
    imported = load_model(tmp_path / "hs.keras").model
    assert imported.get_layer("hs").activation.__name__ == "hard_silu"
    x = np.random.default_rng(0).normal(0, 3, (16, 5)).astype("float32")
    _assert_same(k3_model, imported, x)
    imported.save(tmp_path / "tfk.h5")
    with pytest.raises(CompressorError, match=r"activation function .*read back from \.h5; save the model as \.keras"):
        load_model(tmp_path / "tfk.h5")


def test_layer_scale_and_stochastic_depth_are_rebuilt_by_our_classes(tmp_path):
    from keras.src.applications.convnext import LayerScale as K3LayerScale
    from keras.src.applications.convnext import StochasticDepth as K3StochasticDepth

    inp = L3.Input((6, 6, 4))
    branch = K3LayerScale(0.5, 4, name="scale")(L3.Conv2D(4, 3, padding="same")(inp))
    out = L3.Add()([inp, K3StochasticDepth(0.2, name="drop_path")(branch)])
    k3_model = _vary(keras3.Model(inp, out), seed=3)
    k3_model.save(tmp_path / "blocks.keras")

    loaded = load_model(tmp_path / "blocks.keras")

    scale = loaded.model.get_layer("scale")
    assert isinstance(scale, LayerScale)
    np.testing.assert_array_equal(scale.get_weights()[0], k3_model.get_layer("scale").get_weights()[0])
    assert unsupported_layers(loaded.model) == []
    x = np.random.default_rng(0).normal(size=(64, 6, 6, 4)).astype("float32")
    _assert_same(k3_model, loaded.model, x)
    for ext in (".keras", ".h5"):  # saved again by tf-keras (the pipeline's pruned.keras)
        loaded.model.save(tmp_path / f"tfk{ext}")
        again = load_model(tmp_path / f"tfk{ext}")
        assert again.warnings == [] and isinstance(again.model.get_layer("scale"), LayerScale)
        _assert_same(k3_model, again.model, x)
    trained = np.asarray(loaded.model.get_layer("drop_path")(np.ones((64, 3), "float32"), training=True))
    assert set(np.unique(trained)) <= {0.0, 1.25} and 0 < (trained == 0).mean() < 0.5  # dropped and rescaled

    # .h5 does not record a class's module, so keras.applications' LayerScale cannot be told from
    # user code of the same name: refused, in one line, naming the class.
    k3_model.save(tmp_path / "blocks.h5")
    with pytest.raises(CompressorError) as info:
        load_model(tmp_path / "blocks.h5")
    assert "'LayerScale'" in str(info.value) and "\n" not in str(info.value)


def _encoder(tokens: bool, ops_add: bool):
    """2 blocks, d_model 32, 4 heads, GELU FFN 64, learned positions fed as a position-index input."""
    positions = L3.Input((28,), dtype="int32", name="positions")
    if tokens:
        inp = L3.Input((28,), dtype="int32", name="tokens")
        x = L3.Embedding(50, 32, name="token_emb")(inp)
    else:
        inp = L3.Input((28, 28), name="rows")
        x = L3.Dense(32, name="row_proj")(inp)
    pos = L3.Embedding(28, 32, name="pos_emb")(positions)
    x = x + pos if ops_add else L3.Add(name="add_pos")([x, pos])
    for i in range(2):
        att = L3.MultiHeadAttention(4, 8, dropout=0.1, name=f"mha_{i}")(x, x)
        x = L3.LayerNormalization(epsilon=1e-6)(L3.Add()([x, L3.Dropout(0.1)(att)]))
        ffn = L3.Dense(32)(L3.Dense(64, activation="gelu")(x))
        x = L3.LayerNormalization(epsilon=1e-6)(L3.Add()([x, L3.Dropout(0.1)(ffn)]))
    out = L3.Dense(10, activation="softmax")(L3.GlobalAveragePooling1D()(x))
    return _vary(keras3.Model([inp, positions], out), seed=4)


@pytest.mark.parametrize(
    "tokens, ops_add, ext",
    [(False, False, ".keras"), (False, False, ".h5"), (True, True, ".keras")],
    ids=["rows-add_layer.keras", "rows-add_layer.h5", "tokens-ops_add.keras"],
)
def test_transformer_encoder_imports(tmp_path, tokens, ops_add, ext):
    k3_model = _encoder(tokens, ops_add)
    path = tmp_path / f"encoder{ext}"
    k3_model.save(path)

    loaded = load_model(path)

    _import_note(loaded)
    assert unsupported_layers(loaded.model) == []
    mha = loaded.model.get_layer("mha_1")
    assert isinstance(mha, keras.layers.MultiHeadAttention) and mha.get_config()["num_heads"] == 4
    rng = np.random.default_rng(5)
    first = rng.integers(0, 50, (3, 28)).astype("int32") if tokens else rng.normal(size=(3, 28, 28)).astype("float32")
    feed = [first, np.tile(np.arange(28, dtype="int32"), (3, 1))]
    _assert_same(k3_model, loaded.model, feed)


def test_tf_keras_applications_load_without_warnings(tmp_path):
    """The same families saved by tf-keras itself; its MobileNetV3 writes x + 3 and x * (1/6) as
    TFOpLambda layers, which the layer table knows as elementwise ops: no warning."""
    common = {"input_shape": (32, 32, 3), "weights": None, "classes": 10}
    for name, build, ext in [
        ("mobilenet_v2", lambda: keras.applications.MobileNetV2(alpha=0.35, **common), ".keras"),
        ("mobilenet_v3", lambda: keras.applications.MobileNetV3Small(alpha=0.75, **common), ".h5"),
    ]:
        model = build()
        model.save(tmp_path / f"{name}{ext}")
        loaded = load_model(tmp_path / f"{name}{ext}")
        assert loaded.format == f"tf-keras {ext}"
        assert loaded.warnings == []
        x = _images(seed=6)
        np.testing.assert_allclose(np.asarray(loaded.model(x)), np.asarray(model(x)), atol=1e-5)


def test_unsupported_keras_ops_call_is_named_in_one_line(tmp_path):
    inp = L3.Input((4, 6))
    out = keras3.ops.matmul(inp, keras3.ops.transpose(inp, (0, 2, 1)))
    keras3.Model(inp, L3.Flatten()(out)).save(tmp_path / "matmul.keras")
    with pytest.raises(CompressorError) as info:
        load_model(tmp_path / "matmul.keras")
    message = str(info.value)
    assert "\n" not in message and "Keras 3 operation" in message and "keras.ops" in message
    assert "Transpose" in message or "Matmul" in message


def test_preprocessing_layers_and_scalar_ops_import(tmp_path):
    """EfficientNet's ImageNet preprocessing (per-channel Rescaling, fixed and inverted Normalization)
    and keras.ops calls on graph tensors (x - c, c - x, x / c, c * x, relu, gelu, hard_silu)."""
    ops = keras3.ops
    inp = L3.Input((4, 4, 3))
    x = L3.Rescaling(1.0 / 255.0)(inp)
    x = L3.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.052, 0.050, 0.051])(x)
    x = L3.Rescaling([1.0 / 0.229, 1.0 / 0.224, 1.0 / 0.225])(x)
    x = L3.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.5, 2.0, 2.5], invert=True)(x)
    a = ops.relu(x - 0.5) + (1.0 - x) / 4.0
    b = ops.hard_silu(2.0 * x) * ops.gelu(x)
    out = L3.Flatten()(ops.maximum(a, b) + ops.sigmoid(x))
    k3_model = keras3.Model(inp, out)
    k3_model.save(tmp_path / "prep.keras")

    loaded = load_model(tmp_path / "prep.keras")

    assert unsupported_layers(loaded.model) == []
    _assert_same(k3_model, loaded.model, np.random.default_rng(0).uniform(0, 255, (4, 4, 4, 3)).astype("float32"))


def test_unsupported_layers_are_reported_once_per_class(tmp_path):
    """A model can hold dozens of one unsupported kind (here TensorFlow ops the layer table does not
    know as elementwise, recorded as TFOpLambda layers): one line for all of them."""
    inp = keras.Input((8,))
    x = inp
    for _ in range(6):
        x = tf.math.cumsum(x, axis=-1)
    model = keras.Model(inp, keras.layers.Dense(2)(x))
    model.save(tmp_path / "ops.keras")

    loaded = load_model(tmp_path / "ops.keras")

    assert len(unsupported_layers(loaded.model)) == 6
    notes = [w for w in loaded.warnings if "left unpruned" in w]
    assert len(notes) == 1 and notes[0].startswith("6 TFOpLambda layers (") and ", ...)" in notes[0]


def test_inline_tensor_constants_import_and_shrink_with_their_channels(tmp_path):
    """A learned position table applied to ops.arange at build time is stored as an inline tensor
    constant of `x + c`; with `x - c`, `c - x` and `x * c` it becomes ConstantTerm: same outputs,
    saved again by tf-keras, and sliced with the channels surgery removes through it."""
    from compressor.graph.surgery import remove_units
    from compressor.layers.keras3_layers import ConstantTerm

    ops = keras3.ops
    inp = L3.Input((5, 4))
    x = L3.Dense(8, name="proj")(inp) + L3.Embedding(5, 8)(ops.arange(5))
    rng = np.random.default_rng(7)
    x = ops.multiply(ops.subtract(x, rng.normal(size=(8,)).astype("float32")),
                     rng.normal(size=(1, 5, 8)).astype("float32"))
    x = ops.subtract(rng.normal(size=(5, 8)).astype("float32"), x)
    k3_model = keras3.Model(inp, L3.Dense(3, name="head")(L3.Flatten()(x)))
    k3_model.save(tmp_path / "const.keras")

    loaded = load_model(tmp_path / "const.keras")

    terms = [layer for layer in loaded.model.layers if isinstance(layer, ConstantTerm)]
    assert sorted(t.op for t in terms) == ["add", "multiply", "rsubtract", "subtract"]
    assert all(not t.trainable_weights for t in terms)
    assert unsupported_layers(loaded.model) == []
    feed = rng.normal(size=(4, 5, 4)).astype("float32")
    _assert_same(k3_model, loaded.model, feed)
    loaded.model.save(tmp_path / "tfk.keras")
    _assert_same(k3_model, load_model(tmp_path / "tfk.keras").model, feed)

    removed, kept = [1, 4, 5], [0, 2, 3, 6, 7]
    pruned, result = remove_units(loaded.model, {"proj": removed})
    assert pruned.get_layer("proj").units == 5 and not result.skipped
    for term in terms:
        np.testing.assert_array_equal(pruned.get_layer(term.name).constant.numpy(),
                                      np.take(term.constant.numpy(), kept, axis=-1))
