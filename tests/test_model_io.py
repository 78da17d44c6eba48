"""Model loading (tf-keras and Keras 3 import), unsupported-layer listing, atomic saving."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from compressor.core._tf import keras, tf
from compressor.core.errors import CompressorError
from compressor.load.model_io import (
    LoadedModel,
    file_sha256,
    load_model,
    save_model_atomic,
    unsupported_layers,
)

keras3 = pytest.importorskip("keras")
L3 = keras3.layers


# ----------------------------------------------------------------------------- helpers


def _randomize_k3(model, seed=0):
    """Non-trivial weights (incl. BN statistics) so that a wrong weight copy would show."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        value = rng.standard_normal(tuple(w.shape)).astype("float32") * 0.3
        if "variance" in w.path:
            value = np.abs(value) + 0.5
        w.assign(value)
    return model


def _k3_cnn():
    inp = L3.Input((12, 12, 3), name="image")
    x = L3.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inp)
    x = L3.BatchNormalization(name="bn_a")(x)
    y = L3.Conv2D(8, 3, padding="same", name="conv_b")(x)
    y = L3.BatchNormalization(name="bn_b")(y)
    x = L3.Add(name="residual")([x, y])
    x = L3.GlobalAveragePooling2D(name="gap")(x)
    out = L3.Dense(5, activation="softmax", name="probs")(x)
    return _randomize_k3(keras3.Model(inp, out, name="k3_cnn"))


def _k3_mlp():
    model = keras3.Sequential(
        [
            L3.Input((6, 6)),
            L3.Flatten(),
            L3.Dense(16, activation="relu"),
            L3.Dense(4, activation="softmax"),
        ],
        name="k3_mlp",
    )
    return _randomize_k3(model, seed=1)


def _tfk_mlp():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)],
        name="tfk_mlp",
    )


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _predict(model, x):
    return np.asarray(model(x, training=False))


def _error(path) -> str:
    with pytest.raises(CompressorError) as info:
        load_model(path)
    message = str(info.value)
    assert not message.startswith("error:") and "\n" not in message  # the CLI adds the prefix
    return message


@pytest.fixture(scope="module")
def k3_cnn_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("k3cnn")
    model = _k3_cnn()
    paths = {}
    for ext in (".keras", ".h5"):
        paths[ext] = folder / f"cnn{ext}"
        model.save(paths[ext])
    return model, paths


# ----------------------------------------------------------------------------- Keras 3 import


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_keras3_functional_cnn_imports_with_matching_outputs(k3_cnn_files, ext):
    k3_model, paths = k3_cnn_files
    path = paths[ext]
    before = file_sha256(path)
    mtime = os.stat(path).st_mtime_ns

    loaded = load_model(path)

    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, keras.Model)  # tf-keras, what tfmot needs
    assert "Keras 3" in loaded.format and ext in loaded.format and "imported" in loaded.format
    assert loaded.source == str(path)
    assert any("imported from Keras 3" in w for w in loaded.warnings)
    assert [layer.name for layer in loaded.model.layers if not isinstance(layer, keras.layers.InputLayer)] == [
        "conv_a", "bn_a", "conv_b", "bn_b", "residual", "gap", "probs",
    ]
    x = _x((4, 12, 12, 3), seed=7)
    np.testing.assert_allclose(_predict(loaded.model, x), _predict(k3_model, x), atol=1e-5)
    assert unsupported_layers(loaded.model) == []
    assert file_sha256(path) == before
    assert os.stat(path).st_mtime_ns == mtime


def test_keras3_sequential_mlp(tmp_path):
    k3_model = _k3_mlp()
    path = tmp_path / "mlp.keras"
    k3_model.save(path)

    loaded = load_model(path)

    assert loaded.format == "Keras 3 .keras (imported)"
    assert isinstance(loaded.model, keras.Sequential)
    x = _x((3, 6, 6), seed=3)
    np.testing.assert_allclose(_predict(loaded.model, x), _predict(k3_model, x), atol=1e-5)


def test_keras3_many_layer_types_shared_layer_and_nested_model(tmp_path):
    """One graph touching most translated configs: LeakyReLU slope, dtype policies, wrappers."""
    inner = keras3.Sequential([L3.Input((10,)), L3.Dense(10, activation="tanh")], name="inner")
    inp = L3.Input((10, 10, 2))
    x = L3.Rescaling(0.5, offset=0.1)(inp)
    x = L3.ZeroPadding2D(1)(x)
    x = L3.Conv2D(4, 3, kernel_regularizer="l2", kernel_constraint="max_norm")(x)
    x = L3.DepthwiseConv2D(3, padding="same")(x)
    x = L3.SeparableConv2D(4, 3, padding="same")(x)
    x = L3.LeakyReLU(negative_slope=0.2)(x)
    x = L3.MaxPooling2D()(x)
    x = L3.AveragePooling2D(2)(x)
    a = L3.GlobalMaxPooling2D()(x)
    b = L3.Flatten()(x)
    x = L3.Concatenate()([a, b])
    x = L3.LayerNormalization()(x)
    x = L3.Dropout(0.3)(x)
    x = L3.Dense(10, activation="silu")(x)
    shared = L3.Dense(10, name="shared")
    x = L3.Multiply()([shared(x), shared(inner(x))])  # shared layer: two inbound nodes
    x = L3.ReLU(max_value=6.0)(x)
    x = L3.Reshape((2, 5))(x)
    seq = L3.Conv1D(3, 2, activation="gelu")(x)
    x = L3.Activation("softmax")(L3.Flatten()(seq))
    out = L3.Softmax()(x)
    k3_model = _randomize_k3(keras3.Model(inp, out), seed=2)
    path = tmp_path / "zoo.h5"
    k3_model.save(path)

    loaded = load_model(path)

    x = _x((2, 10, 10, 2), seed=4)
    np.testing.assert_allclose(_predict(loaded.model, x), _predict(k3_model, x), atol=1e-5)
    leaky = [layer for layer in loaded.model.layers if isinstance(layer, keras.layers.LeakyReLU)][0]
    assert leaky.alpha == pytest.approx(0.2)


def test_keras3_lstm_model_loads_and_lstm_is_reported(tmp_path):
    inp = L3.Input((7,), dtype="int32")
    x = L3.Embedding(20, 4)(inp)
    x = L3.LSTM(5, return_sequences=True, name="the_lstm")(x)
    x = L3.GRU(3, name="the_gru")(x)
    out = L3.Dense(2, activation="softmax")(x)
    k3_model = _randomize_k3(keras3.Model(inp, out), seed=5)
    path = tmp_path / "rnn.keras"
    k3_model.save(path)

    loaded = load_model(path)

    tokens = np.random.default_rng(0).integers(0, 20, size=(3, 7)).astype("int32")
    np.testing.assert_allclose(_predict(loaded.model, tokens), _predict(k3_model, tokens), atol=1e-5)
    names = unsupported_layers(loaded.model)
    assert "'the_lstm' (LSTM)" in names and "'the_gru' (GRU)" in names
    assert any("the_lstm" in w and "unpruned" in w for w in loaded.warnings)


def test_tf_keras_lstm_is_reported(tmp_path):
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.LSTM(4, name="rec"), keras.layers.Dense(2)])
    path = tmp_path / "lstm.keras"
    model.save(path)
    loaded = load_model(path)
    assert loaded.format == "tf-keras .keras"
    assert unsupported_layers(loaded.model) == ["'rec' (LSTM)"]


def test_parity_check_names_the_diverging_layer():
    from compressor.load.keras3_import import _Importer, check_parity

    k3_model = _k3_cnn()
    importer = _Importer([])
    tf_model = importer.rebuild(k3_model)
    importer.copy_weights(k3_model, tf_model)
    assert check_parity(k3_model, tf_model) <= 1e-4
    bad = tf_model.get_layer("conv_b")
    bad.set_weights([w + 1.0 for w in bad.get_weights()])
    with pytest.raises(CompressorError, match=r"differ from Keras 3 .*'conv_b' \(Conv2D"):
        check_parity(k3_model, tf_model)


def test_keras3_layer_without_tf_keras_equivalent(tmp_path):
    inp = L3.Input((4,))
    out = L3.Dense(3, activation="sparsemax", name="fancy")(inp)
    path = tmp_path / "hs.keras"
    keras3.Model(inp, out).save(path)
    message = _error(path)
    assert "'fancy'" in message and "sparsemax" in message and "tf-keras" in message

    keras3.Model(inp, L3.RMSNormalization(name="rms")(inp)).save(tmp_path / "rms.h5")
    message = _error(tmp_path / "rms.h5")
    assert "Keras 3 layer 'rms' (RMSNormalization) has no tf-keras equivalent" in message
    assert "save the model without it" in message

    out = L3.UnitNormalization(name="unitnorm")(inp)
    keras3.Model(inp, L3.Lambda(lambda t: t * 2, name="lam")(out)).save(tmp_path / "lam.keras")
    message = _error(tmp_path / "lam.keras")
    assert "'lam' (Lambda) has no tf-keras equivalent" in message and "save the model without it" in message


def test_keras3_custom_class_is_named(tmp_path):
    class Doubler(L3.Layer):
        def call(self, x):
            return x * 2

    inp = L3.Input((4,))
    keras3.Model(inp, Doubler(name="dbl")(inp)).save(tmp_path / "custom.keras")
    message = _error(tmp_path / "custom.keras")
    assert "layer 'dbl' has custom class 'Doubler'" in message
    assert "pass a tf-keras model" in message and "register" in message


# ----------------------------------------------------------------------------- tf-keras round trips


@pytest.mark.parametrize(
    "name, fmt",
    [("m.keras", "tf-keras .keras"), ("m.h5", "tf-keras .h5"), ("saved_dir", "SavedModel")],
)
def test_tf_keras_round_trips(tmp_path, name, fmt):
    model = _tfk_mlp()
    path = tmp_path / name
    model.save(path)
    before = file_sha256(path)

    loaded = load_model(path)

    assert loaded.format == fmt
    assert isinstance(loaded.model, keras.Model)
    assert loaded.warnings == []
    x = _x((3, 5))
    np.testing.assert_allclose(_predict(loaded.model, x), _predict(model, x), atol=1e-6)
    assert file_sha256(path) == before


def test_tf_keras_custom_class_is_named(tmp_path):
    class Twice(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    model = keras.Sequential([keras.Input((3,)), Twice(name="twice")])
    model.save(tmp_path / "c.h5")
    message = _error(tmp_path / "c.h5")
    assert "custom class 'Twice'" in message and "register" in message


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    message = _error(tmp_path / "nope.keras")
    assert "not found" in message and "nope.keras" in message


def test_corrupt_keras_file(tmp_path):
    path = tmp_path / "junk.keras"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    message = _error(path)
    assert "file is not a Keras zip archive (corrupt or truncated?)" in message
    assert "re-save it with model.save('junk.keras')" in message


def test_truncated_zip(tmp_path):
    full = tmp_path / "full.keras"
    _tfk_mlp().save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _error(cut)


def test_damaged_member_inside_intact_zip(tmp_path):
    path = tmp_path / "bitrot.keras"
    _tfk_mlp().save(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("model.weights.h5")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 100, start + 140):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    message = _error(path)
    assert "model.weights.h5" in message and "corrupt" in message


def test_truncated_h5(tmp_path):
    full = tmp_path / "full.h5"
    _tfk_mlp().save(full)
    data = full.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    assert "damaged HDF5 file" in _error(tmp_path / "cut.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    assert "not an HDF5 file (corrupt or truncated?)" in _error(tmp_path / "text.h5")


def test_unknown_extension(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00")
    message = _error(path)
    assert "unknown extension '.onnx'" in message and ".keras or .h5" in message


def test_directory_that_is_not_a_savedmodel(tmp_path):
    message = _error(tmp_path)
    assert "not a SavedModel" in message


def test_savedmodel_without_keras_metadata(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "plain"))
    message = _error(tmp_path / "plain")
    assert "has no Keras metadata" in message and "model.save(" in message


def test_model_without_layers(tmp_path):
    keras3.Sequential(name="empty").save(tmp_path / "empty.keras")
    assert "has no layers" in _error(tmp_path / "empty.keras")


def test_weights_only_h5(tmp_path):
    model = _tfk_mlp()
    model.save_weights(tmp_path / "w.h5")
    assert "weights-only" in _error(tmp_path / "w.h5")


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("name", ["out.keras", "out.h5", "out_savedmodel"])
def test_save_model_atomic_leaves_only_final_file(tmp_path, name):
    model = _tfk_mlp()
    folder = tmp_path / "run"
    final = folder / name

    save_model_atomic(model, final)
    save_model_atomic(model, final)  # overwrite an existing file / directory

    assert sorted(p.name for p in folder.iterdir()) == [name]
    x = _x((2, 5))
    np.testing.assert_allclose(_predict(load_model(final).model, x), _predict(model, x), atol=1e-6)


def test_save_model_atomic_failure_keeps_old_file_and_no_temp(tmp_path):
    model = _tfk_mlp()
    final = tmp_path / "m.keras"
    save_model_atomic(model, final)
    before = file_sha256(final)

    class Exploding:
        def save(self, path):
            with open(path, "wb") as fh:
                fh.write(b"half a model")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_model_atomic(Exploding(), final)
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]
    assert file_sha256(final) == before


def test_file_sha256_of_directory_tracks_content(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(b"a")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"b")
    first = file_sha256(tmp_path / "d")
    assert first == file_sha256(tmp_path / "d")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"B")
    assert file_sha256(tmp_path / "d") != first
