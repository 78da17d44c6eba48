"""KerasHub's layers, rebuilt as the tf-keras layers they are made of.

A KerasHub `TransformerEncoder` is attention, two layer norms and a feed-forward pair inside one
Python class; rebuilt as one opaque tf-keras class nothing in it could be pruned. So each KerasHub
class here is a *rebuild*: called like the Keras 3 layer, it adds its parts to the tf-keras graph
as built-in layers named `<layer>.<part>` (MultiHeadAttention, Dense, LayerNormalization, ...),
which the layer table already prunes (heads, FFN widths). Only the classes listed in `HUB_LAYERS`
are rebuilt, from their stored config; their weights come from the live Keras 3 layer, by the
attribute names KerasHub gives its parts (`weights`). The positions table is our
`PositionEmbedding` (keras3_layers), with a handler here.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from compressor.core._tf import keras, tf
from compressor.layers.base import Cut, Handler, register, take
from compressor.layers.keras3_layers import ACTIVATIONS, ClassToken, LayerSpec, PositionEmbedding, gelu_tanh

_L = keras.layers
#: KerasHub functions a stored activation may name, and the tf-keras activation computing them.
HUB_ACTIVATIONS = {"gelu_approximate": keras.saving.get_registered_name(gelu_tanh)}


def _activation(value, spec: LayerSpec):
    names = [value.get("registered_name"), value.get("config")] if isinstance(value, dict) else [value]
    registered = next((n for n in names if isinstance(n, str) and n.startswith("keras_hub>")), None)
    if registered is not None:
        name = registered.split(">", 1)[1]
        if name not in HUB_ACTIVATIONS:
            raise spec.refuse(f"uses KerasHub activation '{name[:40]}', which has no tf-keras rebuild")
        return HUB_ACTIVATIONS[name]
    if isinstance(value, dict) and isinstance(value.get("config"), str):
        value = value["config"]
    return ACTIVATIONS.get(value, value) if isinstance(value, str) else value


def _vars(layer) -> list[np.ndarray]:
    return [np.asarray(w) for w in layer.weights]


class HubLayer:
    """One KerasHub layer as tf-keras layers: built once, called once per node of the Keras 3 graph."""

    def __init__(self, spec: LayerSpec):
        self.spec = spec
        self.name = spec.name
        self.parts: dict[str, keras.layers.Layer] = {}
        # Keras' implicit padding mask, made explicit: the tf-keras graph holds no implicit masks, which
        # the exported files would lose. Set by the importer before a call (input), by the call (output).
        self.input_mask = None
        self.output_mask = None

    def part(self, key: str, cls: type, **config):
        """A tf-keras layer of this rebuild, named `<layer>.<key>`; config translated like any Keras 3 one."""
        if key not in self.parts:
            cfg = self.spec.translate(cls, {**config, "name": f"{self.name}.{key}"})
            self.parts[key] = cls(**cfg)
        return self.parts[key]

    def weights(self, k3_layer) -> dict[str, list[np.ndarray]]:
        """tf-keras part name -> the Keras 3 layer's weights for it."""
        raise NotImplementedError


class ReversibleEmbedding(HubLayer):
    """Forward use only (token ids -> vectors): a tf-keras Embedding on the same table."""

    def __call__(self, ids, **kwargs):
        cfg = self.spec.config
        if kwargs.get("reverse"):
            raise self.spec.refuse("is called in reverse (tied output projection), which has no tf-keras rebuild")
        self.output_mask = _padding_mask(ids) if cfg.get("mask_zero") else None
        return self.part("embedding", _L.Embedding, input_dim=cfg["input_dim"], output_dim=cfg["output_dim"])(ids)

    def weights(self, k3_layer):
        return {"embedding": [np.asarray(k3_layer.embeddings)]}


class HubPositionEmbedding(HubLayer):
    def __call__(self, x, start_index=0, positions=None):
        if positions is not None or not isinstance(start_index, int):
            raise self.spec.refuse("is called with explicit positions, which has no tf-keras rebuild")
        return self.part("table", PositionEmbedding, sequence_length=self.spec.config["sequence_length"],
                         start_index=start_index)(x)

    def weights(self, k3_layer):
        return {"table": [np.asarray(k3_layer.position_embeddings)]}


def _padding_mask(ids):
    """Keras' mask_zero: token id 0 is padding."""
    return tf.math.not_equal(ids, 0)


class TokenAndPositionEmbedding(HubLayer):
    """Token table + positions table, added (the token mask, with mask_zero, passes on)."""

    def __call__(self, ids, start_index=0, positions=None):
        cfg = self.spec.config
        if positions is not None or not isinstance(start_index, int):
            raise self.spec.refuse("is called with explicit positions, which has no tf-keras rebuild")
        self.output_mask = _padding_mask(ids) if cfg.get("mask_zero") else None
        tokens = self.part("token_embedding", _L.Embedding, input_dim=cfg["vocabulary_size"],
                           output_dim=cfg["embedding_dim"])(ids)
        where = self.part("position_embedding", PositionEmbedding, sequence_length=cfg["sequence_length"],
                          start_index=start_index)(tokens)
        return self.part("add", _L.Add)([tokens, where])

    def weights(self, k3_layer):
        return {"token_embedding": [np.asarray(k3_layer.token_embedding.embeddings)],
                "position_embedding": [np.asarray(k3_layer.position_embedding.position_embeddings)]}


class TransformerEncoder(HubLayer):
    """Self-attention and a feed-forward pair, each with a residual Add and a LayerNormalization
    (after it by default, before it with normalize_first), as KerasHub's `call` computes them."""

    def __call__(self, x, padding_mask=None, attention_mask=None, training=None, return_attention_scores=False):
        cfg = self.spec.config
        if return_attention_scores:
            raise self.spec.refuse("returns attention scores, which has no tf-keras rebuild")
        width = int(x.shape[-1])
        init = {k: cfg[k] for k in ("kernel_initializer", "bias_initializer") if k in cfg}
        first, eps = bool(cfg.get("normalize_first")), float(cfg.get("layer_norm_epsilon", 1e-5))
        mask = _attention_mask(padding_mask, attention_mask, self.input_mask)
        self.output_mask = self.input_mask
        residual, h = x, x
        if first:
            h = self.part("self_attention_layer_norm", _L.LayerNormalization, epsilon=eps)(h)
        attention = self.part("self_attention", _L.MultiHeadAttention, num_heads=int(cfg["num_heads"]),
                              key_dim=width // int(cfg["num_heads"]), dropout=float(cfg.get("dropout", 0)), **init)
        h = attention(h, h, attention_mask=mask) if mask is not None else attention(h, h)
        h = self.part("self_attention_dropout", _L.Dropout, rate=float(cfg.get("dropout", 0)))(h)
        h = self.part("self_attention_add", _L.Add)([h, residual])
        if not first:
            h = self.part("self_attention_layer_norm", _L.LayerNormalization, epsilon=eps)(h)
        residual = h
        if first:
            h = self.part("feedforward_layer_norm", _L.LayerNormalization, epsilon=eps)(h)
        h = self.part("feedforward_intermediate_dense", _L.Dense, units=int(cfg["intermediate_dim"]),
                      activation=_activation(cfg.get("activation", "relu"), self.spec), **init)(h)
        h = self.part("feedforward_output_dense", _L.Dense, units=width, **init)(h)
        h = self.part("feedforward_dropout", _L.Dropout, rate=float(cfg.get("dropout", 0)))(h)
        h = self.part("feedforward_add", _L.Add)([h, residual])
        if not first:
            h = self.part("feedforward_layer_norm", _L.LayerNormalization, epsilon=eps)(h)
        return h

    def weights(self, k3_layer):
        att = k3_layer._self_attention_layer
        names = ("self_attention_layer_norm", "feedforward_layer_norm", "feedforward_intermediate_dense",
                 "feedforward_output_dense")
        found = {key: _vars(getattr(k3_layer, f"_{key}")) for key in names}
        found["self_attention"] = [np.asarray(w) for sub in (att._query_dense, att._key_dense, att._value_dense,
                                                             att._output_dense) for w in sub.weights]
        return found


def _attention_mask(padding_mask, attention_mask, implicit=None):
    """KerasHub's merge_padding_and_attention_mask: padding (batch, keys) -> (batch, 1, keys), AND an
    explicit (batch, queries, keys) mask. With Keras' implicit mask instead (mask_zero), Keras 3's
    attention also masks the padded queries: (batch, queries, 1) AND (batch, 1, keys)."""
    mask = None
    if padding_mask is not None:
        mask = tf.expand_dims(tf.cast(padding_mask, "int32"), 1)
    elif implicit is not None:
        ints = tf.cast(implicit, "int32")
        mask = tf.minimum(tf.expand_dims(ints, 2), tf.expand_dims(ints, 1))
    if attention_mask is not None:
        explicit = tf.cast(attention_mask, "int32")
        mask = explicit if mask is None else tf.minimum(mask, explicit)
    return mask


class ViTPatchingAndEmbedding(HubLayer):
    """Patches by a strided Conv2D, flattened to tokens, the class token first, positions added."""

    def __call__(self, images):
        cfg = self.spec.config
        if cfg.get("data_format") not in (None, "channels_last"):
            raise self.spec.refuse("uses channels_first, which has no tf-keras rebuild here")
        width, patch = int(cfg["hidden_dim"]), tuple(cfg["patch_size"])
        x = self.part("patch_embedding", _L.Conv2D, filters=width, kernel_size=patch, strides=patch,
                      padding="valid", use_bias=bool(cfg.get("use_patch_bias", True)))(images)
        x = self.part("flatten", _L.Reshape, target_shape=(int(x.shape[1]) * int(x.shape[2]), width))(x)
        if cfg.get("use_class_token", True):
            x = self.part("class_token", ClassToken)(x)
        where = self.part("position_embedding", PositionEmbedding, sequence_length=int(x.shape[1]))(x)
        return self.part("add", _L.Add)([x, where])

    def weights(self, k3_layer):
        found = {"patch_embedding": _vars(k3_layer.patch_embedding),
                 "position_embedding": [np.asarray(k3_layer.position_embedding.embeddings)]}
        if getattr(k3_layer, "use_class_token", False):
            found["class_token"] = [np.asarray(k3_layer.class_token)]
        return found


class ViTEncoder(HubLayer):
    """Pre-norm blocks (LayerNorm, attention, Add; LayerNorm, GELU MLP, Add), then a LayerNorm."""

    def __call__(self, x):
        cfg = self.spec.config
        eps, rate = float(cfg.get("layer_norm_epsilon", 1e-6)), float(cfg.get("dropout_rate", 0))
        heads, width = int(cfg["num_heads"]), int(cfg["hidden_dim"])
        mlp_bias = bool(cfg.get("use_mlp_bias", True))
        x = self.part("dropout", _L.Dropout, rate=rate)(x)
        for i in range(int(cfg["num_layers"])):
            h = self.part(f"block_{i}.ln_1", _L.LayerNormalization, epsilon=eps)(x)
            h = self.part(f"block_{i}.mha", _L.MultiHeadAttention, num_heads=heads, key_dim=width // heads,
                          use_bias=bool(cfg.get("use_mha_bias", True)),
                          dropout=float(cfg.get("attention_dropout", 0)))(h, h)
            h = self.part(f"block_{i}.dropout", _L.Dropout, rate=rate)(h)
            x = self.part(f"block_{i}.add_1", _L.Add)([h, x])
            h = self.part(f"block_{i}.ln_2", _L.LayerNormalization, epsilon=eps)(x)
            h = self.part(f"block_{i}.mlp.dense_1", _L.Dense, units=int(cfg["mlp_dim"]), activation="gelu",
                          use_bias=mlp_bias)(h)
            h = self.part(f"block_{i}.mlp.dense_2", _L.Dense, units=width, use_bias=mlp_bias)(
                self.part(f"block_{i}.mlp.dropout_1", _L.Dropout, rate=rate)(h))
            h = self.part(f"block_{i}.mlp.dropout_2", _L.Dropout, rate=rate)(h)
            x = self.part(f"block_{i}.add_2", _L.Add)([x, h])
        return self.part("layer_norm", _L.LayerNormalization, epsilon=eps)(x)

    def weights(self, k3_layer):
        found = {"layer_norm": _vars(k3_layer.layer_norm)}
        for i, block in enumerate(k3_layer.encoder_layers):
            att = block.mha
            found[f"block_{i}.mha"] = [np.asarray(w) for sub in (att._query_dense, att._key_dense, att._value_dense,
                                                                 att._output_dense) for w in sub.weights]
            for key, sub in (("ln_1", block.layer_norm_1), ("ln_2", block.layer_norm_2),
                             ("mlp.dense_1", block.mlp.dense_1), ("mlp.dense_2", block.mlp.dense_2)):
                found[f"block_{i}.{key}"] = _vars(sub)
        return found


#: KerasHub layer class -> its rebuild. Anything else from KerasHub is refused naming the class.
HUB_LAYERS: dict[str, Callable[[LayerSpec], HubLayer]] = {
    "ReversibleEmbedding": ReversibleEmbedding,
    "PositionEmbedding": HubPositionEmbedding,
    "TokenAndPositionEmbedding": TokenAndPositionEmbedding,
    "TransformerEncoder": TransformerEncoder,
    "ViTPatchingAndEmbedding": ViTPatchingAndEmbedding,
    "ViTEncoder": ViTEncoder,
}


@register
class PositionTable(Handler):
    """Learned positions added to the residual stream: their columns follow the stream's channels."""

    kinds = (PositionEmbedding,)
    family = "position embedding"

    def propagate(self, layer, ins, shapes, graph):
        return ins[0].touched(layer.name)

    def resize(self, layer, cut: Cut):
        return None, [take(layer.embeddings.numpy(), cut.positions[0], axis=-1)]


@register
class ClassTokenHandler(Handler):
    """A learned token put before the others: the token axis grows, every channel keeps its place."""

    kinds = (ClassToken,)
    family = "class token"

    def propagate(self, layer, ins, shapes, graph):
        return ins[0].touched(layer.name)

    def resize(self, layer, cut: Cut):
        return None, [take(layer.token.numpy(), cut.positions[0], axis=-1)]
