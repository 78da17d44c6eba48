"""KerasHub models (BertBackbone and ViTBackbone classifiers, keras.io's TokenAndPositionEmbedding +
TransformerEncoder text classifier) import into tf-keras as built-in layers with the same outputs, and their attention
heads and feed-forward widths are prunable; KerasHub classes without a rebuild are named in one line."""
from __future__ import annotations

import sys

import keras as keras3  # Keras 3 beside tf-keras; keras-hub is in the dev extra, so these tests never skip
import keras_hub
import numpy as np
import pytest

from compressor.core import export_form
from compressor.core._tf import keras
from compressor.core.errors import CompressorError
from compressor.graph import surgery
from compressor.load.model_io import load_model, unsupported_layers

L3 = keras3.layers
SEQ, VOCAB = 12, 40


def _ids(n=4, seed=0):
    """Token ids with padding (0) at the end of most rows, as a tokenizer writes them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (n, SEQ)).astype("int32")
    for row, length in enumerate(rng.integers(4, SEQ + 1, n)):
        ids[row, length:] = 0
    return ids


def _vary(model, seed=3):
    """Non-trivial biases and norm parameters: a weight copied to the wrong part shows in the outputs."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if len(w.shape) == 1 or "bias" in w.path:
            w.assign(rng.normal(0.3, 0.3, tuple(w.shape)).astype("float32"))
    return model


def _text_classifier():
    """keras.io's pattern: token + position embedding (padding masked), two encoders (post- and pre-norm),
    mean pooling."""
    ids = L3.Input((SEQ,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(VOCAB, SEQ, 16, mask_zero=True, name="embed")(ids)
    for i in range(2):
        x = keras_hub.layers.TransformerEncoder(32, 4, activation="gelu", normalize_first=bool(i), name=f"enc{i}")(x)
    return _vary(keras3.Model(ids, L3.Dense(3)(L3.GlobalAveragePooling1D()(x))))


def _bert_classifier():
    """A BertBackbone from a tiny config (no preset), token ids in: padding mask and segment ids computed."""
    backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=SEQ, name="bert_backbone")
    ids = L3.Input((SEQ,), dtype="int32", name="token_ids")
    out = backbone({"token_ids": ids, "padding_mask": keras3.ops.not_equal(ids, 0),
                    "segment_ids": keras3.ops.zeros_like(ids)})
    return _vary(keras3.Model(ids, L3.Dense(3)(out["pooled_output"])))


def _assert_same(k3_model, tf_model, ids):
    """The import and the form handed to the converters (static-shape attention with the padding mask
    applied explicitly) both compute the Keras 3 model."""
    expected = np.asarray(k3_model(ids, training=False))
    for model in (tf_model, export_form(tf_model)):
        np.testing.assert_allclose(np.asarray(model(ids, training=False)), expected, atol=1e-4, rtol=1e-4)


def test_text_classifier_imports_as_builtin_layers_with_prunable_heads_and_ffn(tmp_path):
    k3_model = _text_classifier()
    k3_model.save(tmp_path / "text.keras")

    loaded = load_model(tmp_path / "text.keras")

    model = loaded.model
    assert unsupported_layers(model) == []
    attention = model.get_layer("enc0.self_attention")
    assert isinstance(attention, keras.layers.MultiHeadAttention) and attention.get_config()["num_heads"] == 4
    _assert_same(k3_model, model, _ids())
    prunable = surgery.prunable_layers(model)
    assert prunable["enc1.self_attention"] == 4
    assert prunable["enc1.feedforward_intermediate_dense"] == 32
    plan = {"enc0.self_attention": [1], "enc0.feedforward_intermediate_dense": [0, 5]}
    pruned, result = surgery.remove_units(model, plan)
    assert result.units_after["enc0.feedforward_intermediate_dense"] == 30
    assert pruned.get_layer("enc0.self_attention").get_config()["num_heads"] == 3
    assert np.isfinite(np.asarray(pruned(_ids(), training=False))).all()


def test_bert_backbone_classifier_imports_with_its_padding_mask(tmp_path):
    k3_model = _bert_classifier()
    k3_model.save(tmp_path / "bert.keras")

    loaded = load_model(tmp_path / "bert.keras")

    model = loaded.model
    assert unsupported_layers(model) == []
    names = {layer.name for layer in model.layers}
    assert {"bert_backbone.transformer_layer_1.self_attention", "bert_backbone.pooled_dense"} <= names
    ids = _ids(seed=1)
    _assert_same(k3_model, model, ids)
    ids[:, 3:] = 0  # mostly padding: the mask decides the output
    _assert_same(k3_model, model, ids)
    prunable = surgery.prunable_layers(model)
    assert prunable["bert_backbone.transformer_layer_0.feedforward_intermediate_dense"] == 32
    assert prunable["bert_backbone.transformer_layer_1.self_attention"] == 2


def test_kerashub_class_without_a_rebuild_is_named_in_one_line(tmp_path):
    ids = L3.Input((SEQ,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(VOCAB, SEQ, 16)(ids)
    x = keras_hub.layers.FNetEncoder(32)(x)
    keras3.Model(ids, L3.Dense(3)(L3.GlobalAveragePooling1D()(x))).save(tmp_path / "fnet.keras")
    with pytest.raises(CompressorError) as info:
        load_model(tmp_path / "fnet.keras")
    message = str(info.value)
    assert "\n" not in message and "FNetEncoder" in message and "KerasHub" in message


def test_kerashub_model_without_kerashub_installed_says_how_to_install(tmp_path, monkeypatch):
    _text_classifier().save(tmp_path / "text.keras")
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub now raises ImportError
    with pytest.raises(CompressorError) as info:
        load_model(tmp_path / "text.keras")
    assert "\n" not in str(info.value) and "keras-hub" in str(info.value)


def test_sequential_with_kerashub_layers_imports(tmp_path):
    k3_model = _vary(keras3.Sequential([
        L3.Input((SEQ,), dtype="int32"), keras_hub.layers.TokenAndPositionEmbedding(VOCAB, SEQ, 8, mask_zero=True),
        keras_hub.layers.TransformerEncoder(16, 2), L3.GlobalAveragePooling1D(), L3.Dense(3)]))
    k3_model.save(tmp_path / "seq.keras")
    loaded = load_model(tmp_path / "seq.keras")
    assert unsupported_layers(loaded.model) == []
    _assert_same(k3_model, loaded.model, _ids(seed=2))


def test_vit_backbone_classifier_imports_with_prunable_heads_and_mlp(tmp_path):
    backbone = keras_hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=4, num_layers=1, num_heads=2,
                                            hidden_dim=16, mlp_dim=32, name="vit")
    images = L3.Input((16, 16, 3))
    k3_model = _vary(keras3.Model(images, L3.Dense(3)(backbone(images)[:, 0, :])))
    k3_model.save(tmp_path / "vit.keras")
    loaded = load_model(tmp_path / "vit.keras")
    assert unsupported_layers(loaded.model) == []
    _assert_same(k3_model, loaded.model, np.random.default_rng(4).uniform(0, 1, (3, 16, 16, 3)).astype("float32"))
    prunable = surgery.prunable_layers(loaded.model)
    assert prunable["vit.vit_encoder.block_0.mha"] == 2 and prunable["vit.vit_encoder.block_0.mlp.dense_1"] == 32
