"""Models built from models (a backbone inside a Sequential with a new head, blocks nested two
levels deep, a siamese tower, Keras 3 files) load as ONE flat graph with the same outputs, so the
stages prune inside the backbone and the report names its layers by nested path."""
from __future__ import annotations

import json

import numpy as np
import pytest

from compressor.api import compress
from compressor.config.recipe import parse_recipe
from compressor.core._tf import keras
from compressor.data.sources import load_dataset
from compressor.load.flatten import flatten_nested
from compressor.load.model_io import load_model

L = keras.layers


def _vary(model, seed=0):
    """Random biases and batch-norm statistics: a weight that was not copied shows in the outputs."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if len(w.shape) == 1:
            low = 0.5 if "variance" in w.name or "gamma" in w.name else -0.5
            w.assign(rng.uniform(low, low + 1.0, tuple(w.shape)).astype("float32"))
    return model


def _flat_and_same(model, path, feed, **call):
    """Save, load, and check that no layer is a model and the outputs are the nested model's."""
    model.save(path)
    loaded = load_model(path)
    flat = loaded.model
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    np.testing.assert_allclose(np.asarray(flat(feed, **call)), np.asarray(model(feed, **call)), rtol=1e-5, atol=1e-5)
    assert any(n.startswith("flattened nested model") for n in loaded.warnings), loaded.warnings
    return flat


def test_sequential_in_functional(tmp_path):
    block = keras.Sequential([L.Dense(12, activation="relu", name="fc"), L.BatchNormalization(name="bn")],
                             name="block")
    inp = keras.Input((6,), name="x")
    out = L.Dense(3, name="head")(block(L.Dense(8, name="stem")(inp)))
    model = _vary(keras.Model(inp, out, name="outer"))
    flat = _flat_and_same(model, tmp_path / "m.keras", np.random.default_rng(1).normal(size=(4, 6)))
    assert [layer.name for layer in flat.layers] == ["x", "stem", "block.fc", "block.bn", "head"]


def test_functional_in_sequential_two_levels_deep(tmp_path):
    """Sequential > functional > Sequential: names carry the whole path; .h5 too."""
    inner = keras.Sequential([L.Conv2D(4, 3, padding="same", name="conv"), L.BatchNormalization(name="bn")],
                             name="inner")
    x_in = keras.Input((8, 8, 2))
    x = inner(L.Conv2D(4, 1, name="pre")(x_in))
    mid = keras.Model(x_in, L.Add(name="add")([x, L.Conv2D(4, 1, name="skip")(x_in)]), name="mid")
    model = _vary(keras.Sequential([keras.Input((8, 8, 2)), mid, L.GlobalAveragePooling2D(name="gap"),
                                    L.Dense(5, name="out")]))
    feed = np.random.default_rng(2).normal(size=(3, 8, 8, 2)).astype("float32")
    for ext in (".keras", ".h5"):
        flat = _flat_and_same(model, tmp_path / f"m{ext}", feed)
        names = {layer.name for layer in flat.layers}
        assert {"mid.pre", "mid.inner.conv", "mid.inner.bn", "mid.skip", "mid.add", "gap", "out"} <= names


def test_shared_tower_keeps_one_copy_of_its_weights(tmp_path):
    """A siamese tower called twice stays ONE set of layers called twice: its weights stay shared."""
    t_in = keras.Input((5,))
    tower = keras.Model(t_in, L.Dense(4, name="d")(L.Dense(6, activation="relu", name="h")(t_in)), name="tower")
    a, b = keras.Input((5,), name="a"), keras.Input((5,), name="b")
    model = _vary(keras.Model([a, b], L.Dense(2, name="cls")(L.Concatenate(name="cat")([tower(a), tower(b)]))))
    rng = np.random.default_rng(3)
    flat = _flat_and_same(model, tmp_path / "siamese.keras", [rng.normal(size=(4, 5)), rng.normal(size=(4, 5))])
    assert sorted(layer.name for layer in flat.layers if layer.name.startswith("tower.")) == ["tower.d", "tower.h"]
    assert len(flat.get_layer("tower.d").inbound_nodes) == 2
    assert flat.count_params() == model.count_params()


def test_frozen_backbone_call_keeps_its_inference_mode():
    """`backbone(x, training=False)` (the transfer-learning idiom): its batch norms stay in inference
    mode in the flat graph even while the model trains."""
    b_in = keras.Input((4,))
    backbone = keras.Model(b_in, L.BatchNormalization(name="bn")(L.Dense(6, name="fc")(b_in)), name="bb")
    inp = keras.Input((4,))
    model = _vary(keras.Model(inp, L.Dense(2, name="head")(backbone(inp, training=False))))
    flat, notes = flatten_nested(model)
    assert flat is not model and notes
    feed = np.random.default_rng(4).normal(size=(8, 4)).astype("float32")
    np.testing.assert_allclose(flat(feed, training=True), model(feed, training=True), rtol=1e-5, atol=1e-5)


def test_subclassed_sub_model_is_left_nested_with_a_note():
    class Block(keras.Model):
        def __init__(self):
            super().__init__(name="custom_block")
            self.fc = L.Dense(3)

        def call(self, x):
            return self.fc(x)

    inp = keras.Input((4,))
    model = keras.Model(inp, L.Dense(2)(Block()(inp)))
    same, notes = flatten_nested(model)
    assert same is model
    assert len(notes) == 1 and "'custom_block'" in notes[0] and "subclassed" in notes[0], notes


def test_keras3_nested_file_imports_flat(tmp_path):
    keras3 = pytest.importorskip("keras")
    K = keras3.layers
    b_in = keras3.Input((8, 8, 3))
    x = K.Conv2D(6, 3, padding="same", name="conv")(b_in)
    x = K.BatchNormalization(name="bn")(x)
    backbone = keras3.Model(b_in, K.ReLU(name="relu")(x), name="backbone")
    head = keras3.Sequential([K.Dense(7, activation="relu", name="fc"), K.Dense(3, name="logits")], name="head")
    model = keras3.Sequential([keras3.Input((8, 8, 3)), backbone, K.GlobalAveragePooling2D(name="gap"), head])
    _vary_k3(model)
    model.save(tmp_path / "k3.keras")
    loaded = load_model(tmp_path / "k3.keras")
    flat = loaded.model
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert {"backbone.conv", "backbone.bn", "head.fc", "head.logits"} <= {layer.name for layer in flat.layers}
    feed = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(flat(feed)), np.asarray(model(feed, training=False)), rtol=1e-4, atol=1e-4)


def _vary_k3(model, seed=6):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if len(w.shape) == 1:
            low = 0.5 if "variance" in w.path or "gamma" in w.path else -0.5
            w.assign(rng.uniform(low, low + 1.0, tuple(w.shape)).astype("float32"))


def _digit_images(n_train: int = 256):
    """The bundled digits as 32x32x3 images (each pixel a 4x4 patch), so an applications backbone fits."""
    d = load_dataset("digits")

    def img(x):
        return np.repeat(np.kron(x.reshape(-1, 8, 8, 1), np.ones((1, 4, 4, 1))), 3, axis=-1).astype("float32")

    return img(d.x_train[:n_train]), d.y_train[:n_train], img(d.x_test[:120]), d.y_test[:120]


def test_mobilenetv2_backbone_in_sequential_is_pruned_inside(tmp_path):
    """The transfer-learning pattern: a structured stage removes units inside the backbone, the
    report and the exported ONNX name them by nested path."""
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    model = keras.Sequential([backbone, L.GlobalAveragePooling2D(), L.Dense(10, activation="softmax")])
    x_train, y_train, x_test, y_test = _digit_images()
    model.save(tmp_path / "mnv2.keras")  # untrained: mean_abs still finds idle units, and no fit to wait for
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    recipe = parse_recipe({
        "targets": ["onnxruntime"], "max_accuracy_drop": 1.0, "bench": {"runs": 200, "warmup": 5, "batch": [1]},
        "stages": [{"name": "activation", "criterion": "mean_abs", "threshold": 0.3, "epochs": 0}]})
    report = compress(str(tmp_path / "mnv2.keras"), str(tmp_path / "d.npz"), tmp_path / "out", recipe, quiet=True)
    prefix = f"{backbone.name}."
    layers = report["stages"][0]["details"]["layers"]
    cut = [name for name, info in layers.items() if name.startswith(prefix) and info["removed"] > 0]
    assert len(cut) >= 5, layers.keys()
    assert report["stages"][0]["params_after"] < report["stages"][0]["params_before"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any(name.startswith(prefix) for name in json.dumps(saved["layers"]).split('"'))
    import onnx  # noqa: PLC0415 - only this test reads the exported graph

    nodes = [n.name for n in onnx.load(str(tmp_path / "out" / "pruned.onnx")).graph.node]
    assert any(f"{prefix}Conv1" in n for n in nodes), nodes[:5]


def test_model_object_given_to_compress_is_flattened_too(tmp_path, digits):
    """The Python API takes a model object without load_model: it is flattened the same way."""
    keras.utils.set_random_seed(0)
    body = keras.Sequential([keras.Input((64,)), L.Dense(64, activation="relu", name="hidden")], name="body")
    model = keras.Sequential([keras.Input((64,)), body, L.Dense(10, activation="softmax", name="classifier")])
    recipe = parse_recipe({
        "targets": ["onnxruntime"], "max_accuracy_drop": 1.0, "bench": {"runs": 200, "warmup": 5, "batch": [1]},
        "stages": [{"name": "activation", "criterion": "mean_abs", "threshold": 0.3, "epochs": 0}]})
    report = compress(model, digits, tmp_path / "out", recipe, quiet=True)
    assert any(n.startswith("flattened nested model 'body'") for n in report["model"]["load_notes"])
    assert report["stages"][0]["details"]["layers"]["body.hidden"]["removed"] > 0
    assert isinstance(model.layers[0], keras.Model)  # the caller's model is left as it was
