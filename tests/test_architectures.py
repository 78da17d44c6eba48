"""Layer couplings on the architectures people ship (keras.applications, weights=None, 32x32, and a
transformer encoder): which layers may shrink and why not, and that removing units is exact, i.e.
the pruned model computes what the original computes with those units disconnected."""
import numpy as np
import pytest

from compressor.core._tf import keras
from compressor.graph import surgery
from compressor.graph.flops import model_macs
from compressor.layers import handler_for
from compressor.layers.keras3_layers import LayerScale
from compressor.stages import planning

L = keras.layers
APPS = keras.applications


def transformer_encoder(blocks: int = 2, d_model: int = 32, heads: int = 4, ffn: int = 64):
    """MNIST rows as 28 tokens: a Dense projection (the row's pixels place it), post-norm encoder blocks."""
    inputs = keras.Input((28, 28), name="rows")
    x = L.Dense(d_model, name="tokens")(inputs)
    for b in range(blocks):
        attended = L.MultiHeadAttention(heads, d_model // heads, name=f"mha{b}")(x, x)
        x = L.LayerNormalization(name=f"ln{b}a")(L.Add(name=f"res{b}a")([x, L.Dropout(0.1)(attended)]))
        hidden = L.Dense(ffn, activation="gelu", name=f"ffn{b}_in")(x)
        projected = L.Dense(d_model, name=f"ffn{b}_out")(hidden)
        x = L.LayerNormalization(name=f"ln{b}b")(L.Add(name=f"res{b}b")([x, projected]))
    outputs = L.Dense(10, activation="softmax", name="classifier")(L.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="encoder")


def convnext_blocks(blocks: int = 2, channels: int = 32):
    """ConvNeXt's block as Keras 3 writes it and the importer rebuilds it: depthwise conv as
    Conv2D(groups=C), LayerNormalization, Dense 4C (GELU), Dense C, LayerScale, residual Add."""
    inputs = keras.Input((32, 32, 3))
    x = L.Conv2D(channels, 4, strides=4, name="stem")(inputs)
    for b in range(blocks):
        y = L.Conv2D(channels, 7, padding="same", groups=channels, name=f"dw{b}")(x)
        y = L.LayerNormalization(epsilon=1e-6, name=f"ln{b}")(y)
        y = L.Dense(4 * channels, activation="gelu", name=f"pw{b}_in")(y)
        y = LayerScale(1e-1, channels, name=f"scale{b}")(L.Dense(channels, name=f"pw{b}_out")(y))
        x = L.Add(name=f"res{b}")([x, y])
    outputs = L.Dense(10, activation="softmax")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="convnext_blocks")


def nasnet_cells():
    """NASNet-A as NASNetMobile builds it (stem and reduction cells with ZeroPadding2D/Cropping2D,
    adjust blocks, separable convs, Concatenates of five branches) with one normal cell per stack
    and 8 filters: NASNetMobile's 771 layers take half a minute to build; scripts/families.py runs it."""
    from tf_keras.src.applications.nasnet import NASNet  # keras.applications exports only Mobile and Large

    return NASNet(input_shape=(32, 32, 3), penultimate_filters=192, num_blocks=1, stem_block_filters=8,
                  weights=None, classes=10, default_size=32)


FAMILIES = {
    "ConvNeXt-blocks": convnext_blocks,
    "MobileNetV2": lambda: APPS.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10),
    "MobileNetV3Small": lambda: APPS.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, weights=None, classes=10,
                                                      include_preprocessing=False),
    "EfficientNetB0": lambda: APPS.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=10),
    "ResNet50V2": lambda: APPS.ResNet50V2(input_shape=(32, 32, 3), weights=None, classes=10),
    "DenseNet121": lambda: APPS.DenseNet121(input_shape=(32, 32, 3), weights=None, classes=10),
    "encoder": transformer_encoder,
    "MobileNet": lambda: APPS.MobileNet(input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=10),
    "Xception": lambda: APPS.Xception(input_shape=(71, 71, 3), weights=None, classes=10),  # its smallest input
    "InceptionV3": lambda: APPS.InceptionV3(input_shape=(75, 75, 3), weights=None, classes=10),  # likewise
    "NASNet-cells": nasnet_cells,
}


def _plan(model, fraction: float = 0.25) -> dict[str, list[int]]:
    """The weakest `fraction` of every prunable group's units (by weight norm)."""
    plan = {}
    for group in planning.groups(model):
        layer = model.get_layer(group.name)
        norms = handler_for(layer).unit_norms(layer)
        count = int(group.units * fraction)
        if count:
            plan[group.name] = sorted(int(i) for i in np.argsort(norms, kind="stable")[:count])
    return plan


def _disconnected(model, plan, x):
    """What `model` computes when its weighted layers ignore the planned units: every kernel row that
    reads one is zeroed (for attention, the output projection of a removed head) for the call, then
    the weights are put back (in place: a clone of a 20 M-parameter model costs seconds)."""
    analysis = surgery._analyze(model)
    kept_by_root, _ = surgery._plan_groups(analysis, plan, {}, surgery.SurgeryResult())

    def kept_of(space):
        return kept_by_root.get(analysis.root(space), np.arange(analysis.space_width[space]))

    saved = model.get_weights()
    try:
        for name, layouts in analysis.input_layouts.items():
            layer = model.get_layer(name)
            if isinstance(layer, L.MultiHeadAttention):
                removed = sorted(set(range(layer._num_heads)) - set(kept_of(name).tolist()))
                kernel = layer._output_dense.kernel.numpy()
                kernel[removed] = 0.0
                layer._output_dense.kernel.assign(kernel)
                continue
            separable = isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D))  # its depthwise step has no bias
            if not (separable or (handler_for(layer) and handler_for(layer).foldable)):
                continue
            weights = layer.get_weights()
            removed = np.setdiff1d(np.arange(layouts[0].width), layouts[0].kept_positions(kept_of))
            weights[0][..., removed, :] = 0.0
            layer.set_weights(weights)
        return model(x, training=False).numpy()
    finally:
        model.set_weights(saved)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    keras.backend.clear_session()
    return request.param, FAMILIES[request.param]()


def test_every_layer_is_known_and_most_producers_may_shrink(family):
    name, model = family
    unknown = [f"{layer.name} ({type(layer).__name__})" for layer in model.layers
               if handler_for(layer) is None and not isinstance(layer, L.InputLayer)]
    assert not unknown, f"{name}: layers the layer table does not know: {unknown}"
    analysis = surgery._analyze(model)
    free = [p for p in analysis.producers if analysis.block_reason(p) is None]
    # ConvNeXt: LayerNormalization keeps the residual stream; its inner MLP widths (1 in 3) shrink
    share = 0.3 if name.startswith("ConvNeXt") else 0.4
    assert len(free) >= share * len(analysis.producers), {p: analysis.block_reason(p) for p in analysis.producers}


def test_removing_units_is_exact_and_cheaper(family):
    name, model = family
    plan = _plan(model)
    pruned, result = surgery.remove_units(model, plan)
    assert result.removed, f"{name}: nothing removed"
    assert model_macs(pruned) < 0.9 * model_macs(model)
    for producer, units in result.units_after.items():  # the units are really gone from the weights
        layer = pruned.get_layer(producer)
        assert handler_for(layer).units(layer) == units
    x = np.random.default_rng(0).uniform(size=(2, *model.input_shape[1:])).astype("float32")
    expected = _disconnected(model, plan, x)
    np.testing.assert_allclose(pruned(x, training=False).numpy(), expected, atol=1e-4, rtol=1e-3)


def test_couplings_these_models_really_have():
    mobilenet = FAMILIES["MobileNetV2"]()
    groups = surgery.coupled_groups(mobilenet)
    bottleneck = next(g for g in groups if "block_2_project" in g)
    assert "block_1_project" in bottleneck  # the residual Add couples the projections...
    assert "block_1_project" in surgery.prunable_layers(mobilenet)  # ...and they may shrink together
    effnet = FAMILIES["EfficientNetB0"]()
    assert ["block2a_expand_conv", "block2a_se_expand"] in surgery.coupled_groups(effnet)  # gate and gated
    assert "block2a_se_reduce" in surgery.prunable_layers(effnet)
    encoder = transformer_encoder()
    prunable = surgery.prunable_layers(encoder)
    assert prunable["mha0"] == 4 and prunable["ffn0_in"] == 64  # heads and FFN width
    assert "ffn0_out" not in prunable and "LayerNormalization" in surgery._analyze(encoder).block_reason("ffn0_out")
