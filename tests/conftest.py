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


# The search on a stand-in runtime (tests/test_search.py, tests/test_heads.py)

OVERHEAD_MS, UNIT_MS = 0.01, 0.001  # the stand-in runtime: a fixed cost plus a cost per unit kept


def kept_units(model) -> int:
    """Units of every prunable layer of `model`."""
    from compressor.graph import surgery

    return sum(surgery.prunable_layers(model).values())


class LinearTable:
    """A latency table whose narrower is always faster: the search's own loop, no runtime measured."""

    def __init__(self, units: dict[str, int]):
        self.units, self.samples, self.fit, self.entries = units, [], (0.0, 1.0), 0
        self.table = type("T", (), {"path": "stand-in", "measured": 0})()

    def predict(self, removed=None):
        removed = removed or {}
        return OVERHEAD_MS + UNIT_MS * sum(u - removed.get(g, 0) for g, u in self.units.items())

    def observe(self, removed, measured_ms):
        self.samples.append((self.predict(removed), measured_ms))


@pytest.fixture
def stand_in_runtime(monkeypatch):
    """The search's loop without latency tables or runtime timing (tests/test_search.py measures those):
    the tables and the runtime measurements are replaced by `LinearTable`'s arithmetic."""
    from compressor.stages import search

    def tables(model, names, cfg, ctx, runtimes=None, clock=None):
        units = {g.name: g.units for g in search.search_groups(model)}
        return {rt: LinearTable(units) for rt in ("onnxruntime", "tflite")}

    def measure(models, runtime, batch=1, runs=0, files=None):
        return {label: OVERHEAD_MS + UNIT_MS * kept_units(m) for label, m in models.items()}

    monkeypatch.setattr(search, "_tables", tables)
    monkeypatch.setattr(search, "measure_models", measure)
    monkeypatch.setattr(search, "calibrate", lambda lms, *a, **k: ({rt: lm.predict() for rt, lm in lms.items()},) * 2)
