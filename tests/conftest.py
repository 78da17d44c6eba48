"""Shared fixtures: small models trained on the embedded digits so the suite stays fast."""
from __future__ import annotations

import numpy as np
import pytest

from compressor.config.recipe import parse_recipe
from compressor.core._tf import keras
from compressor.data.sources import load_dataset


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def mnist5k():
    """The embedded 5,000 MNIST digits, loaded once per worker: read them, never change them."""
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def small_mlp(digits):
    """A trained 64-64-10 MLP: big enough for (16, 1) blocks, small enough to train in a second."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Dense(64, activation="relu", input_shape=(64,), name="hidden"),
        keras.layers.Dense(10, activation="softmax", name="classifier"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(digits.x_train, digits.y_train, epochs=15, batch_size=32, verbose=0)
    return model


@pytest.fixture
def fast_recipe():
    """Few epochs and the minimum number of timed runs: behaviour, not speed, is under test."""
    def make(**overrides):
        raw = {"targets": ["tflite", "onnxruntime"], "stages": [{"name": "weight", "sparsity": 0.8, "epochs": 3}],
               "max_accuracy_drop": 0.05, "bench": {"runs": 200, "warmup": 5}}
        raw.update(overrides)
        return parse_recipe(raw)
    return make


def save_npz(path, ds):
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    return path
