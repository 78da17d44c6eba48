"""Reference models for the benchmark suite (scripts/benchmark.py), trained on the embedded mnist5k.

Four shapes that stress different parts of the pipeline: the source article's small MLP, a wide
MLP where FULLY_CONNECTED dominates (block sparsity and unit removal pay off most), a plain CNN
with BatchNormalization, and a MobileNet-style depthwise-separable CNN (depthwise kernels are
tiny, so pruning them barely changes the work). Fixed seeds and few epochs keep the suite
reproducible and inside its time budget.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from compressor.core._tf import keras
from compressor.data.sources import Dataset
from compressor.train.training import fit, reference_model

L = keras.layers
CLASSES = 10


def mlp_small() -> keras.Model:
    return reference_model(input_shape=(784,), classes=CLASSES, hidden=128)


def mlp_wide() -> keras.Model:
    return keras.Sequential([
        L.Input((784,)),
        L.Dense(1024, activation="relu", name="hidden1"),
        L.Dense(1024, activation="relu", name="hidden2"),
        L.Dense(CLASSES, activation="softmax", name="classifier"),
    ], name="mlp_784_1024_1024_10")


def _conv_bn(x, filters: int, kernel: int, name: str, strides: int = 1):
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


def cnn_small() -> keras.Model:
    inputs = L.Input((28, 28, 1), name="image")
    x = _conv_bn(inputs, 32, 3, "conv1")
    x = L.MaxPooling2D(name="pool1")(x)
    x = _conv_bn(x, 64, 3, "conv2")
    x = L.MaxPooling2D(name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(128, activation="relu", name="fc")(x)
    outputs = L.Dense(CLASSES, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="cnn_small")


def _dw_block(x, filters: int, name: str, strides: int = 1):
    """MobileNet v1 block: depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU."""
    x = L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = L.BatchNormalization(name=f"{name}_dw_bn")(x)
    x = L.ReLU(name=f"{name}_dw_relu")(x)
    return _conv_bn(x, filters, 1, f"{name}_pw")


def dscnn() -> keras.Model:
    inputs = L.Input((28, 28, 1), name="image")
    x = _conv_bn(inputs, 32, 3, "stem", strides=2)                       # 14x14x32
    x = _dw_block(x, 64, "block1")                                       # 14x14x64
    x = _dw_block(x, 128, "block2", strides=2)                           # 7x7x128
    x = L.SeparableConv2D(128, 3, padding="same", use_bias=False, name="sep3")(x)
    x = L.BatchNormalization(name="sep3_bn")(x)
    x = L.ReLU(name="sep3_relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(CLASSES, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="dscnn")


def mobilenet_v2() -> keras.Model:
    """keras.applications' MobileNetV2 (alpha 0.35, untrained weights) on digits padded to 32x32x3."""
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=CLASSES)


def efficientnet_b0() -> keras.Model:
    """keras.applications' EfficientNetB0 (untrained weights) on digits padded to 32x32x3."""
    return keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=CLASSES)


def transformer_encoder(blocks: int = 2, d_model: int = 64, heads: int = 4, ffn: int = 128) -> keras.Model:
    """Post-norm transformer encoder reading the 28 pixel rows as 28 tokens (keyword-spotting sized)."""
    inputs = L.Input((28, 28), name="rows")
    x = L.Dense(d_model, name="tokens")(inputs)
    for b in range(blocks):
        attended = L.MultiHeadAttention(heads, d_model // heads, name=f"mha{b}")(x, x)
        x = L.LayerNormalization(name=f"ln{b}a")(L.Add(name=f"res{b}a")([x, attended]))
        hidden = L.Dense(ffn, activation="gelu", name=f"ffn{b}_in")(x)
        x = L.LayerNormalization(name=f"ln{b}b")(
            L.Add(name=f"res{b}b")([x, L.Dense(d_model, name=f"ffn{b}_out")(hidden)]))
    outputs = L.Dense(CLASSES, activation="softmax", name="classifier")(L.GlobalAveragePooling1D(name="gap")(x))
    return keras.Model(inputs, outputs, name="transformer_encoder")


def as_rgb32(x: np.ndarray) -> np.ndarray:
    """28x28 digits -> 32x32x3 (zero border, grey copied to three channels), as ImageNet models take them."""
    images = np.pad(x.reshape(len(x), 28, 28), ((0, 0), (2, 2), (2, 2)))
    return np.repeat(images[..., None], 3, axis=-1)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    build: Callable[[], keras.Model]
    input_shape: tuple[int, ...]
    epochs: int
    shape: Callable[[np.ndarray], np.ndarray] | None = None  # None: a plain reshape to input_shape
    data: str | None = "mnist5k"  # the --data name it is trained and scored on; None: latency only (untrained)


MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("mlp-128", "reference MLP 784-128-10 (source article)", mlp_small, (784,), 8),
    ModelSpec("mlp-1024", "MLP 784-1024-1024-10", mlp_wide, (784,), 5),
    ModelSpec("cnn", "small CNN: 2x (Conv2D + BN + MaxPool) + Dense 128", cnn_small, (28, 28, 1), 4),
    ModelSpec("dscnn", "MobileNet-style CNN: stem + 2 depthwise-separable blocks + SeparableConv2D + GAP", dscnn,
              (28, 28, 1), 8),
    ModelSpec("mobilenetv2", "keras.applications MobileNetV2 (alpha 0.35) on 32x32x3", mobilenet_v2, (32, 32, 3), 8,
              as_rgb32),
    ModelSpec("efficientnetb0", "keras.applications EfficientNetB0 on 32x32x3", efficientnet_b0, (32, 32, 3), 6,
              as_rgb32),
    ModelSpec("encoder", "transformer encoder: 2 blocks, d_model 64, 4 heads, FFN 128 (28 rows as tokens)",
              transformer_encoder, (28, 28), 8),
)}


def _application(name: str, size: int, **kwargs) -> Callable[[], keras.Model]:
    """A keras.applications model at size x size x 3 (untrained weights), built when called."""
    return lambda: getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=CLASSES,
                                                      **kwargs)


DEPLOYMENT_EPOCHS = {"mnist5k": 3, "clutter": 6}


def deployment(size: int = 128) -> dict[str, ModelSpec]:
    """MobileNetV2 (alpha 1.0) at deployment size, trained on mnist5k resized and on the cluttered task."""
    build = _application("MobileNetV2", size, alpha=1.0)
    return {s.name: s for s in (
        ModelSpec(f"mobilenetv2-{size}-mnist5k", f"keras.applications MobileNetV2 (alpha 1.0) at {size}x{size}x3 on "
                  f"mnist5k@{size} (the digits resized)", build, (size, size, 3), DEPLOYMENT_EPOCHS["mnist5k"],
                  data=f"mnist5k@{size}"),
        ModelSpec(f"mobilenetv2-{size}-clutter", f"keras.applications MobileNetV2 (alpha 1.0) at {size}x{size}x3 on "
                  f"clutter@{size} (digits among clutter)", build, (size, size, 3), DEPLOYMENT_EPOCHS["clutter"],
                  data=f"clutter@{size}"),
    )}


def latency_only(size: int = 224) -> dict[str, ModelSpec]:
    """Untrained keras.applications models at size x size x 3: float and int8 files timed, not scored."""
    return {s.name: s for s in (
        ModelSpec(f"mobilenetv2-{size}", f"keras.applications MobileNetV2 (alpha 1.0) at {size}x{size}x3, untrained",
                  _application("MobileNetV2", size, alpha=1.0), (size, size, 3), 0, data=None),
        ModelSpec(f"resnet50-{size}", f"keras.applications ResNet50 at {size}x{size}x3, untrained",
                  _application("ResNet50", size), (size, size, 3), 0, data=None),
    )}


def dataset_for(spec: ModelSpec, data: Dataset) -> Dataset:
    """The same samples, shaped for the model's input (784, 28x28x1, 28x28 rows or 32x32x3)."""
    def shaped(x):
        if x is None:
            return None
        return spec.shape(x) if spec.shape else x.reshape((len(x), *spec.input_shape))

    return dataclasses.replace(data, x_train=shaped(data.x_train), x_test=shaped(data.x_test),
                               x_calib=shaped(data.x_calib), x_val=shaped(data.x_val))


def train(spec: ModelSpec, data: Dataset, seed: int = 0, epochs: int | None = None) -> keras.Model:
    """Build and train with a fixed seed (Adam 1e-3, batch 32), as a user's baseline would be."""
    keras.utils.set_random_seed(seed)
    model = spec.build()
    fit(model, dataset_for(spec, data), epochs=spec.epochs if epochs is None else epochs, batch_size=32,
        learning_rate=1e-3, hold_zeros=False)
    return model


def test_accuracy(model: keras.Model, spec: ModelSpec, data: Dataset) -> float:
    ds = dataset_for(spec, data)
    pred = model.predict(ds.x_test, batch_size=256, verbose=0)
    return float(np.mean(pred.argmax(axis=1) == ds.y_test))
