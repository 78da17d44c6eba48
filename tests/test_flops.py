"""Hand-computed MAC counts for exporters.flops."""
import numpy as np
import pytest

from compressor.core._tf import keras
from compressor.graph.flops import layer_macs, model_macs

L = keras.layers


def _one(layer, input_shape):
    """Functional model around a single layer; returns (model, layer name)."""
    x = keras.Input(input_shape)  # batch dim is None
    return keras.Model(x, layer(x)), layer.name


def _macs(layer, input_shape, **kw):
    model, name = _one(layer, input_shape)
    return layer_macs(model, **kw)[name]


def test_dense_sequential():
    # 784*128 + 128*10 = 100352 + 1280 = 101632; Flatten, Dropout count 0.
    m = keras.Sequential([
        L.Flatten(input_shape=(28, 28)),
        L.Dense(128, activation="relu", name="fc1"),
        L.Dropout(0.1),
        L.Dense(10, name="fc2"),
    ])
    per = layer_macs(m)
    assert per["fc1"] == 100352 and per["fc2"] == 1280
    assert sum(v for k, v in per.items() if k not in ("fc1", "fc2")) == 0
    assert model_macs(m) == 101632


def test_dense_on_sequence_counts_each_position():
    # (5, 4) -> Dense(3): kernel applied at 5 positions, 5*4*3 = 60.
    assert _macs(L.Dense(3), (5, 4)) == 60
    # TimeDistributed gives the same work.
    assert _macs(L.TimeDistributed(L.Dense(3)), (5, 4)) == 60


def test_conv2d_valid():
    # 8x8x3, 3x3, 4 filters, valid -> 6x6x4: 36 * 3*3*3 * 4 = 3888.
    assert _macs(L.Conv2D(4, 3, padding="valid"), (8, 8, 3)) == 3888


def test_conv2d_same_stride2():
    # 9x9x3, 3x3, 8 filters, stride 2, same -> ceil(9/2) = 5 -> 5x5: 25 * 27 * 8 = 5400.
    assert _macs(L.Conv2D(8, 3, strides=2, padding="same"), (9, 9, 3)) == 5400
    # Valid with stride 2: floor((9-3)/2)+1 = 4 -> 16 * 27 * 8 = 3456.
    assert _macs(L.Conv2D(8, 3, strides=2, padding="valid"), (9, 9, 3)) == 3456


def test_conv2d_groups_and_channels_first():
    # 6x6x4, 1x1, groups=2, 6 filters: 36 * 1*1*(4/2) * 6 = 432.
    assert _macs(L.Conv2D(6, 1, groups=2), (6, 6, 4)) == 432
    # channels_first 3x8x8 -> 4x6x6: same work as channels_last, 3888.
    assert _macs(L.Conv2D(4, 3, data_format="channels_first"), (3, 8, 8)) == 3888


def test_conv1d():
    # length 10, 3 channels, kernel 3, 5 filters, valid -> 8: 8 * 3*3 * 5 = 360.
    assert _macs(L.Conv1D(5, 3), (10, 3)) == 360


def test_depthwise():
    # 8x8x4, 3x3, multiplier 2, same -> 8x8x8: 64 * 9 * 4 * 2 = 4608.
    assert _macs(L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (8, 8, 4)) == 4608
    # stride 2 valid: floor((8-3)/2)+1 = 3 -> 9 * 9 * 4 * 1 = 324.
    assert _macs(L.DepthwiseConv2D(3, strides=2), (8, 8, 4)) == 324


def test_separable():
    # 8x8x4 -> 16 filters, 3x3 valid -> 6x6. depthwise 36*9*4 = 1296, pointwise 36*4*16 = 2304.
    assert _macs(L.SeparableConv2D(16, 3), (8, 8, 4)) == 1296 + 2304
    # multiplier 2: depthwise 36*9*8 = 2592, pointwise 36*8*16 = 4608.
    assert _macs(L.SeparableConv2D(16, 3, depth_multiplier=2), (8, 8, 4)) == 2592 + 4608


def test_conv2d_transpose_counts_input_positions():
    # 4x4x2 input, 3x3, 5 filters: each of 16 input pixels meets the whole kernel: 16*9*5*2.
    assert _macs(L.Conv2DTranspose(5, 3, strides=2), (4, 4, 2)) == 1440


def test_nonzero_only_with_zeroed_kernels():
    dense = L.Dense(3, use_bias=False)
    model, _ = _one(dense, (4,))
    k = np.zeros((4, 3), np.float32)
    k[0, 0] = k[1, 2] = k[3, 1] = 1.0  # 3 of 12 kept
    dense.set_weights([k])
    assert layer_macs(model)[dense.name] == 12
    assert layer_macs(model, nonzero_only=True)[dense.name] == 3

    conv = L.Conv2D(4, 3)
    model, _ = _one(conv, (8, 8, 3))
    kernel, bias = conv.get_weights()
    kernel[..., :3] = 0.0  # only filter 3 survives: 27 entries
    conv.set_weights([kernel, bias])
    assert model_macs(model, nonzero_only=True) == 36 * 27
    assert model_macs(model) == 3888

    sep = L.SeparableConv2D(16, 3)
    model, _ = _one(sep, (8, 8, 4))
    dw, pw, b = sep.get_weights()
    sep.set_weights([np.zeros_like(dw), pw, b])  # only pointwise left: 36*4*16
    assert model_macs(model, nonzero_only=True) == 2304


def test_sequential_built_later_and_nested_and_shared():
    seq = keras.Sequential([L.Conv2D(4, 3), L.Flatten(), L.Dense(5, name="head")])
    seq.build((None, 8, 8, 3))
    assert layer_macs(seq)["head"] == 144 * 5
    assert model_macs(seq) == 3888 + 720

    # Nested model called twice, shared Dense called twice: every call costs.
    inner = keras.Sequential([L.Dense(3, input_shape=(4,), name="in_fc")], name="inner")
    shared = L.Dense(2, name="shared")
    x = keras.Input((4,))
    outer = keras.Model(x, [shared(inner(x)), shared(inner(x))])
    per = layer_macs(outer)
    assert per["inner/in_fc"] == 2 * 12
    assert per["shared"] == 2 * 6
    # A second model reusing `shared` must not leak its call into this count.
    y = keras.Input((3,))
    keras.Model(y, shared(y))
    assert layer_macs(outer)["shared"] == 12


def test_errors_for_unbuilt_or_unknown_shapes():
    with pytest.raises(ValueError, match="not built"):
        layer_macs(keras.Sequential([L.Dense(3)]))
    model, _ = _one(L.Conv2D(4, 3), (None, None, 3))
    with pytest.raises(ValueError, match="unknown"):
        model_macs(model)
