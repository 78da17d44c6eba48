"""Streamed data: a folder of class sub-folders of images, TFRecord files, or tf.data.Datasets from a
`package.module:function`.

Nothing is read whole: every split is a tf.data pipeline (parallel decoding, prefetch) consumed
batch by batch. The first batches of every split are checked when the data meets the model (shape,
labels against the outputs, NaN/Inf), each evaluation batch is checked in numpy as it is read, and
the training stream carries the same checks as graph assertions, so a bad record in the middle of
an epoch still ends in the same one-line error as a bad `.npz`.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import io
import math
import re
from pathlib import Path

import numpy as np

from compressor.core.errors import CompressorError
from compressor.data.checks import LARGEST_CLASS, SPLIT_SEED, check_label_count, check_labels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfr")
SPLITS = ("train", "test", "validation", "calibration")
EVAL_BATCH = 256
FIRST_BATCHES = 2  # batches of every split checked eagerly when the data meets the model
CHECK_BATCH = 64
MARK = "[data check] "  # our graph assertions' messages start with this; errors() cuts them out


def _tf():
    from compressor.core._tf import tf

    return tf


def is_tfrecord(spec: str) -> bool:
    """A .tfrecord file or glob, or a folder holding .tfrecord files."""
    if spec.endswith(TFRECORD_SUFFIXES):
        return True
    path = Path(spec)
    return path.is_dir() and any(f.suffix in TFRECORD_SUFFIXES for f in path.iterdir() if f.is_file())


def holds_datasets(result) -> bool:
    """A data function's result contains tf.data.Datasets (checked by type name: no TensorFlow import
    for functions that return arrays)."""
    values = result.values() if isinstance(result, dict) else result if isinstance(result, (list, tuple)) else [result]
    return any("DatasetV2" in [c.__name__ for c in type(v).__mro__] for v in values)


class StreamDataset:
    """The streamed counterpart of compressor.data.sources.Dataset, with the same reading methods.

    `build(input_shape, task)` returns the splits as unbatched tf.data.Datasets of (x, y); it runs
    when the model is known (an image folder is decoded at the model's input size).
    """

    def __init__(self, name: str, build, settings, shuffled: bool = False, counts: dict | None = None,
                 broken_file=None):
        self.name = name
        self._build = build
        self._broken_file = broken_file  # () -> (path, reason) of the first unreadable file, after a decode error
        self.settings = settings
        self._shuffled = shuffled  # the source shuffles its training stream itself
        self._counts = counts if counts is not None else {}
        self.splits: dict | None = None
        self.input_shape: tuple | None = None
        self.task = None
        self._key = None
        self._calib = None
        self.notes: list[str] = []  # warnings for the user (an empty calibration split replaced)

    # ------------------------------------------------------------------ binding and checks

    def bind(self, input_shape: tuple, task) -> None:
        if isinstance(input_shape, dict):
            raise CompressorError(f"data '{self.name}': streamed data feeds one input but the model has "
                                  f"{len(input_shape)} ({', '.join(input_shape)}); pass the inputs as arrays "
                                  "(x_train_0, x_train_1, ... in an .npz, or a function returning them)")
        key = (tuple(input_shape), tuple(task.output_names), tuple(task.losses), tuple(task.units))
        if key == self._key:
            return
        self.input_shape, self.task, self._calib = tuple(input_shape), task, None
        with self.errors():
            raw = self._build(self.input_shape, task)
            self.splits = {k: _normalise(self.name, k, ds, self.input_shape, task)
                           for k, ds in raw.items() if ds is not None}
            for split, ds in self.splits.items():
                seen = 0
                for index, (x, y) in enumerate(ds.batch(CHECK_BATCH).take(FIRST_BATCHES).as_numpy_iterator()):
                    self._check(split, index, x, y)
                    seen += len(x)
                if seen == 0 and split in ("train", "test"):
                    raise CompressorError(
                        f"data '{self.name}': the {split} split is empty; provide at least one sample")
            if "calibration" in self.splits and self._empty("calibration"):
                del self.splits["calibration"]
                self.notes = [f"data '{self.name}': the calibration split is empty; calibrating on "
                              f"{self.settings.calibration_samples} shuffled training samples instead"]
        self._key = key

    def _empty(self, split: str) -> bool:
        return next(iter(self.splits[split].take(1)), None) is None

    def _check(self, split: str, index: int, x: np.ndarray, y) -> None:
        """One batch: the same checks (and messages) as for arrays."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise CompressorError(f"data '{self.name}': samples have shape {tuple(x.shape[1:])} but the model expects "
                                  f"{self.input_shape}; reshape the arrays to the model's input")
        finite = np.isfinite(x)
        if not finite.all():
            raise CompressorError(f"data '{self.name}': {split} batch {index} contains {int(x.size - finite.sum())} "
                                  "NaN/inf values; clean or impute them first")
        parts = list(y) if isinstance(y, tuple) else [y]
        for i, part in enumerate(parts):
            check_labels(self.name, f"{split} labels" + (f" of output {i}" if len(parts) > 1 else ""),
                         part, self.task, i)

    def _graph_checks(self, x, y):
        """The training stream's checks, as assertions that fail the step that reads the bad batch."""
        tf = _tf()
        ys = list(y) if isinstance(y, tuple) else [y]
        deps = [tf.debugging.assert_all_finite(
            x, MARK + f"data '{self.name}': a training batch contains NaN/inf values; clean or impute them first")]
        for i, v in enumerate(ys):
            units = self.task.units[i]
            if self.task.sparse(i):
                deps.append(tf.debugging.assert_non_negative(
                    v, message=MARK + f"data '{self.name}': train has negative labels; labels must be 0..classes-1"))
                deps.append(tf.debugging.assert_less(
                    v, tf.constant(units, v.dtype), message=MARK + f"data '{self.name}': a training label is out of "
                    f"range for a model with {units} outputs; labels must be 0..{units - 1}"))
            else:
                deps.append(tf.debugging.assert_all_finite(
                    v, MARK + f"data '{self.name}': training labels contain NaN/inf values; "
                              "clean or impute them first"))
        with tf.control_dependencies(deps):
            x = tf.identity(x)
        return x, (tuple(ys) if len(ys) > 1 else ys[0])

    @contextlib.contextmanager
    def errors(self):
        """TensorFlow's errors while reading (a failed check, a missing feature, a broken image) as one line."""
        tf = _tf()
        try:
            yield
        except tf.errors.OpError as exc:
            found = self._broken_file() if self._broken_file and _about_decoding(exc.message) else None
            if found:
                raise CompressorError(f"data '{self.name}': cannot decode image '{found[0]}' ({found[1]}); remove or "
                                      "re-encode that file") from None
            raise CompressorError(explain(self.name, exc.message)) from None

    # ------------------------------------------------------------------ reading

    @property
    def has_val(self) -> bool:
        return "validation" in (self.splits or {})

    def _split(self, split: str) -> str:
        return ("validation" if self.has_val else "test") if split == "budget" else split

    def batches(self, split: str, batch_size: int = EVAL_BATCH):
        """(x, y) numpy batches of a split, each checked as it is read."""
        tf = _tf()
        split = self._split(split)
        seen = 0
        with self.errors():
            stream = self.splits[split].batch(batch_size).prefetch(tf.data.AUTOTUNE)
            for index, (x, y) in enumerate(stream.as_numpy_iterator()):
                self._check(split, index, x, y)
                seen += len(x)
                yield x, y
        self._counts[split] = seen

    def _first(self, ds, n: int):
        with self.errors():
            found = next(iter(ds.batch(n).take(1).as_numpy_iterator()), None)
        if found is None:
            raise CompressorError(f"data '{self.name}': no samples to read; provide a non-empty split")
        self._check("sample", 0, *found)
        return found

    def sample(self, split: str, n: int):
        """The first `n` samples of a split (latency inputs, verification), read without the rest."""
        return self._first(self.splits[self._split(split)], n)

    def _calibration_batch(self):
        if self._calib is None:
            if "calibration" in self.splits:
                ds = self.splits["calibration"]
            else:
                ds = self.splits["train"]
                if not self._shuffled:
                    ds = ds.shuffle(self.settings.shuffle_buffer, seed=SPLIT_SEED)
            self._calib = self._first(ds, self.settings.calibration_samples)
        return self._calib

    def calibration(self) -> np.ndarray:
        """Up to `calibration_samples` samples from the calibration split, else from the shuffled
        training stream: only the first ones are read."""
        return self._calibration_batch()[0]

    def labelled_calibration(self):
        return self._calibration_batch()

    def _train(self, seed: int):
        ds = self.splits["train"]
        if not self._shuffled:
            ds = ds.shuffle(self.settings.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        return ds

    def fit_args(self, batch_size: int, seed: int = 0) -> dict:
        """`model.fit` keywords: the shuffled, checked, prefetched training stream."""
        tf = _tf()
        stream = self._train(seed).batch(batch_size).map(self._graph_checks).prefetch(tf.data.AUTOTUNE)
        return {"x": stream}

    def train_inputs(self, batch_size: int, batches: int):
        """Up to `batches` shuffled training batches, inputs only (BatchNorm re-estimation)."""
        with self.errors():
            for x, _ in self._train(0).batch(batch_size).take(batches).as_numpy_iterator():
                yield x

    def count(self, split: str) -> int:
        """Samples in a split: known from the source, else from tf.data, else counted by streaming once."""
        split = self._split(split)
        known = self._counts.get(split)
        if callable(known):
            with self.errors():
                known = self._counts[split] = int(known())
        if known is not None:
            return int(known)
        tf = _tf()
        ds = self.splits[split]
        size = int(ds.cardinality())
        if size == int(tf.data.INFINITE_CARDINALITY):
            raise CompressorError(f"data '{self.name}': the {split} dataset is infinite; end it with .take(n)")
        if size < 0:
            with self.errors():
                size = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
        self._counts[split] = size
        return size

    def known_count(self, split: str) -> int | None:
        """Samples in a split when known without reading it (the source's count, a count already taken,
        tf.data's cardinality), else None: a progress bar then shows batches, not samples."""
        split = self._split(split)
        known = self._counts.get(split)
        if known is not None and not callable(known):
            return int(known)
        size = int(self.splits[split].cardinality()) if self.splits and split in self.splits else -1
        return size if size >= 0 else None

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(self.count("train") / batch_size))

    def sizes(self) -> dict:
        return {"train": self.count("train"), "test": self.count("test")}


def explain(name: str, message: str) -> str:
    """One line for a TensorFlow error raised while reading data."""
    if MARK in message:
        return message.split(MARK, 1)[1].splitlines()[0].split(" Condition ")[0].strip()
    missing = re.search(r"Feature: (\S+) \(data type: (\w+)\) is required but could not be found", message)
    if missing:
        return (f"data '{name}': a record lacks feature '{missing.group(1)}' named in the recipe's data.tfrecord; "
                "fix data.tfrecord.features or the records")
    first = _clean(message)
    if _about_decoding(message):
        return f"data '{name}': cannot decode an image ({first}); remove or re-encode the broken file"
    return f"data '{name}': reading the data failed ({first}); check the files and the recipe's data section"


def _about_decoding(message: str) -> bool:
    return any(k in message for k in ("decode", "Decode", "image file format", "PNG", "JPEG", "GIF", "BMP"))


def _clean(message: str) -> str:
    """The cause in a TensorFlow runtime message, without its `{{function_node ...}}`, `[[{{node ...}}]]`,
    `[Op:...]` and iterator-chain wrapping."""
    text = re.sub(r"\[\[.*?\]\]|\{\{.*?\}\}|\[Op:\w+\]( name: \S*)?", "", message, flags=re.DOTALL)
    text = re.sub(r"Error in user-defined function passed to .*? transformation with iterator: ", "", text)
    text = re.sub(r"Iterator(::\w+)+: ?", "", text)
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")[:200]


def first_broken_image(paths: list[str]):
    """(path, reason) of the first image that is empty or does not decode, else None. Runs only after
    a decode error (TensorFlow's message never names the file), so its cost is paid on failure only."""
    tf = _tf()
    for path in paths:
        try:
            if Path(path).stat().st_size == 0:
                return path, "an empty file"
            tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        except tf.errors.OpError as exc:
            return path, _clean(exc.message)
        except OSError as exc:
            return path, exc.strerror or type(exc).__name__
    return None


def _batched(shape, input_shape: tuple) -> bool:
    """Does a dataset's x spec carry a batch axis? (leading unknown axis, or one axis more than the
    model's input with the same number of values per sample)"""
    if shape.rank is None or shape.rank < 2:
        return False
    if shape[0] is None:
        return True
    inner = shape[1:]
    return (shape.rank == len(input_shape) + 1 and inner.is_fully_defined()
            and math.prod(inner.as_list()) == math.prod(input_shape))


def _normalise(name: str, split: str, ds, input_shape: tuple, task):
    """Unbatched (x float32 shaped like the model input, labels in output order and training dtype)."""
    tf = _tf()
    spec = ds.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], tf.TensorSpec)):
        raise CompressorError(f"data '{name}': the {split} dataset must yield (input, label) pairs with one input "
                              "tensor; map it to (x, y)")
    if _batched(spec[0].shape, input_shape):
        ds = ds.unbatch()
        spec = ds.element_spec
    shape, labels = spec[0].shape, spec[1]
    for what, part in [("inputs", spec[0])] + [("labels", t) for t in tf.nest.flatten(labels)]:
        if not (part.dtype.is_floating or part.dtype.is_integer or part.dtype.is_bool):
            raise CompressorError(f"data '{name}': the {split} {what} are {part.dtype.name} tensors; "
                                  "map them to numbers "
                                  "(decode images, look labels up as integer classes) before returning the dataset")
    reshape = False
    if shape.is_fully_defined() and tuple(shape.as_list()) != input_shape:
        if math.prod(shape.as_list()) != math.prod(input_shape):
            raise CompressorError(f"data '{name}': samples have shape {tuple(shape.as_list())} but the model expects "
                                  f"{input_shape}; reshape the arrays to the model's input")
        reshape = True
    names = task.output_names
    if isinstance(labels, dict):
        absent = [n for n in names if n not in labels]
        if absent:
            raise CompressorError(f"data '{name}': the {split} labels are keyed {sorted(labels)} "
                                  "but the model's outputs "
                                  f"are {names}; key them by output name")
        count = len(names)
    else:
        count = len(labels) if isinstance(labels, (tuple, list)) else 1
    check_label_count(name, count, task)

    def fix(x, y):
        x = tf.cast(x, tf.float32)
        if reshape:
            x = tf.reshape(x, input_shape)
        ys = [y[n] for n in names] if isinstance(y, dict) else list(y) if isinstance(y, (tuple, list)) else [y]
        out = []
        for i, v in enumerate(ys):
            if task.sparse(i) and v.dtype.is_floating:
                tf.debugging.assert_equal(tf.floor(v), v, message=MARK + f"data '{name}': {split} labels must be "
                                          "integer class labels; convert one-hot labels with argmax")
            if task.sparse(i) and v.dtype in (tf.float16, tf.float32, tf.float64, tf.uint64, tf.int64):
                # before the cast: 1e30 or a uint64 near 2**64 wraps to a negative int64 and hid the cause
                tf.debugging.assert_less_equal(v, tf.constant(LARGEST_CLASS, v.dtype), message=MARK + (
                    f"data '{name}': a {split} label is out of range for class labels; labels must be class ids "
                    "0..classes-1 (map ids or hashes to 0..classes-1)"))
            out.append(tf.cast(v, tf.int64 if task.sparse(i) else tf.float32))
        return x, (tuple(out) if len(out) > 1 else out[0])

    return ds.map(fix, num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------- image folders


def image_folder(spec: str, settings) -> StreamDataset:
    """`root/<class>/<image>` (split into train/test with a fixed seed), or `root/train/<class>/...`
    and `root/test/<class>/...` (optional `root/val/...`), read by keras' image_dataset_from_directory."""
    root = Path(spec)
    dirs = {}
    if (root / "train").is_dir() and (root / "test").is_dir():
        dirs = {"train": root / "train", "test": root / "test"}
        val = next((root / d for d in ("val", "validation") if (root / d).is_dir()), None)
        if val is not None:
            dirs["validation"] = val
    top = dirs.get("train", root)
    classes = sorted(d.name for d in top.iterdir() if d.is_dir())
    if not classes:
        raise CompressorError(f"data folder '{spec}' has no class sub-folders; put each class's images in its own "
                              f"sub-folder ({spec}/<class>/<image>.png) or pass .npz or .tfrecord data")
    if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in (top / classes[0]).iterdir()):
        raise CompressorError(f"class folder '{top / classes[0]}' holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                              "each class sub-folder needs its images")
    counts: dict = {}

    def build(input_shape: tuple, task) -> dict:
        from compressor.core._tf import keras

        modes = {1: "grayscale", 3: "rgb", 4: "rgba"}
        if len(input_shape) != 3 or input_shape[-1] not in modes:
            raise CompressorError(f"data '{spec}': an image folder needs a model with (height, width, channels) input "
                                  f"of 1, 3 or 4 channels; the model takes {input_shape}")
        check_label_count(spec, 1, task)
        if task.sparse(0) and len(classes) > task.units[0]:
            raise CompressorError(f"data '{spec}' has {len(classes)} class folders but the model has {task.units[0]} "
                                  "outputs; labels must be 0..outputs-1")
        kw = dict(labels="inferred", label_mode="int", color_mode=modes[input_shape[-1]], batch_size=None,
                  image_size=tuple(input_shape[:2]), seed=SPLIT_SEED)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # "Found N files belonging to K classes."
                if dirs:
                    made = {s: keras.utils.image_dataset_from_directory(d, shuffle=s == "train",
                                                                        class_names=classes, **kw)
                            for s, d in dirs.items()}
                else:
                    made = dict(zip(("train", "test"), keras.utils.image_dataset_from_directory(
                        root, shuffle=True, validation_split=settings.test_fraction, subset="both", **kw)))
        except ValueError as exc:
            raise CompressorError(f"data folder '{spec}': {str(exc).splitlines()[0]}") from exc
        scale = float(settings.rescale)
        counts.update({s: len(ds.file_paths) for s, ds in made.items()})
        paths[:] = [p for ds in made.values() for p in ds.file_paths]
        return {s: ds.map(lambda x, y: (x * scale, y)) for s, ds in made.items()}

    paths: list[str] = []
    return StreamDataset(spec, build, settings, shuffled=True, counts=counts,
                         broken_file=lambda: first_broken_image(paths))


# ---------------------------------------------------------------------------------- TFRecord files


def _tfrecord_files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in TFRECORD_SUFFIXES)
    elif any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec))
    elif path.is_file():
        files = [path]
    else:
        raise CompressorError(
            f"data file '{spec}' not found; pass existing .tfrecord files (a file, a glob or a folder)")
    if not files:
        raise CompressorError(f"no TFRecord files match '{spec}'; pass a .tfrecord file, a glob or a folder of them")
    return files


def _check_features(spec: str, file: Path, cfg) -> None:
    """The recipe's feature spec against the first record: names, kinds and sizes, in one line each."""
    tf = _tf()
    try:
        raw = next(iter(tf.data.TFRecordDataset(str(file)).take(1)), None)
    except tf.errors.OpError as exc:
        raise CompressorError(f"cannot read TFRecord file '{file}' ({exc.message.splitlines()[0][:160]})") from None
    if raw is None:
        raise CompressorError(f"TFRecord file '{file}' holds no records")
    try:
        stored = tf.train.Example.FromString(raw.numpy()).features.feature
    except Exception as exc:  # a protobuf decode error: not tf.train.Example records
        raise CompressorError(
            f"TFRecord file '{file}' does not hold tf.train.Example records ({type(exc).__name__})") from exc
    kinds = {"float32": "float_list", "int64": "int64_list", "string": "bytes_list"}
    for name, feature in cfg.features.items():
        if name not in stored:
            raise CompressorError(f"data '{spec}': feature '{name}' named in the recipe's data.tfrecord is not in the "
                                  f"records (they hold: {', '.join(sorted(stored))}); fix data.tfrecord.features")
        kind = stored[name].WhichOneof("kind")
        if kind != kinds[feature.dtype]:
            raise CompressorError(f"data '{spec}': feature '{name}' is stored as {kind} but the recipe says dtype "
                                  f"{feature.dtype}; fix data.tfrecord.features.{name}.dtype")
        values = len(getattr(stored[name], kind).value)
        if feature.dtype != "string" and values != math.prod(feature.shape):
            raise CompressorError(f"data '{spec}': feature '{name}' holds {values} value(s) per record "
                                  "but the recipe's "
                                  f"shape {feature.shape} needs {math.prod(feature.shape)}; fix data.tfrecord.features")


def _parser(spec: str, cfg, input_shape: tuple, rescale: float):
    tf = _tf()
    parse_spec = {n: tf.io.FixedLenFeature([] if f.dtype == "string" else f.shape, getattr(tf, f.dtype))
                  for n, f in cfg.features.items()}
    x_feature = cfg.features[cfg.x]
    if x_feature.dtype == "string" and (not x_feature.image or len(input_shape) != 3):
        raise CompressorError(f"data '{spec}': input feature '{cfg.x}' is a string; mark it `image: true` (PNG/JPEG "
                              "bytes, for a model with (height, width, channels) input) or store float32 values")
    ys = [cfg.y] if isinstance(cfg.y, str) else list(cfg.y)

    def parse(record):
        example = tf.io.parse_single_example(record, parse_spec)
        x = example[cfg.x]
        if x_feature.dtype == "string":
            x = tf.io.decode_image(x, channels=input_shape[-1], expand_animations=False)
            x = tf.image.resize(x, input_shape[:2]) * rescale
            x.set_shape(input_shape)
        labels = [example[n] for n in ys]
        return x, (tuple(labels) if len(labels) > 1 else labels[0])

    return parse


def tfrecord(spec: str, settings) -> StreamDataset:
    """TFRecord files of tf.train.Example, parsed with the recipe's `data.tfrecord` feature spec. Files
    are assigned to splits by name patterns; without test files every `holdout`-th record is test."""
    cfg = settings.tfrecord
    if cfg is None:
        raise CompressorError(f"TFRecord data '{spec}' needs a feature spec: add data.tfrecord (x, y, features) to "
                              "the recipe; see the README")
    files = _tfrecord_files(spec)
    pick = {s: [f for f in files if fnmatch.fnmatch(f.name, getattr(cfg, s))]
            for s in ("test", "validation", "calibration")}
    named = {f for found in pick.values() for f in found}
    train = ([f for f in files if fnmatch.fnmatch(f.name, cfg.train) and f not in named]
             or [f for f in files if f not in named])
    if not train:
        raise CompressorError(f"no training files among '{spec}' (all match the test/validation/calibration patterns); "
                              "set data.tfrecord.train")
    _check_features(spec, train[0], cfg)
    holdout = None if pick["test"] else cfg.holdout
    tf = _tf()

    def records(paths: list[Path], shuffle: bool):
        ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
        if shuffle and len(paths) > 1:
            ds = ds.shuffle(len(paths), seed=SPLIT_SEED, reshuffle_each_iteration=True)
        return ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(paths)),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def count(paths, keep=lambda n: n):
        return lambda: keep(int(tf.data.TFRecordDataset([str(p) for p in paths])
                                .reduce(np.int64(0), lambda c, _: c + 1)))

    counts = {s: count(p) for s, p in pick.items() if p}
    if holdout:
        counts["train"] = count(train, lambda n: n - math.ceil(n / holdout))
        counts["test"] = count(train, lambda n: math.ceil(n / holdout))
    else:
        counts["train"] = count(train)

    def build(input_shape: tuple, task) -> dict:
        parse = _parser(spec, cfg, input_shape, float(settings.rescale))
        if holdout:
            numbered = records(train, shuffle=False).enumerate()
            raw = {"train": numbered.filter(lambda i, r: i % holdout != 0).map(lambda i, r: r),
                   "test": numbered.filter(lambda i, r: i % holdout == 0).map(lambda i, r: r)}
        else:
            raw = {"train": records(train, shuffle=True), "test": records(pick["test"], shuffle=False)}
        raw.update({s: records(pick[s], shuffle=False) for s in ("validation", "calibration") if pick[s]})
        return {s: ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE) for s, ds in raw.items()}

    return StreamDataset(spec, build, settings, shuffled=False, counts=counts)


# ---------------------------------------------------------------------------------- tf.data functions


def from_datasets(spec: str, result, settings) -> StreamDataset:
    """A data function's tf.data.Datasets: a dict {train, test, validation?, calibration?} or a tuple
    (train, validation, test[, calibration]) with validation possibly None; batched or not."""
    aliases = {"val": "validation", "valid": "validation", "calib": "calibration"}
    if isinstance(result, dict):
        splits = {aliases.get(k, k): v for k, v in result.items() if v is not None}
    elif isinstance(result, (tuple, list)) and len(result) in (3, 4):
        splits = {s: v for s, v in zip(("train", "validation", "test", "calibration"), result) if v is not None}
    else:
        raise CompressorError(f"data function '{spec}' must return tf.data.Datasets as a dict {{train, test, "
                              "validation, calibration}} or a tuple (train, validation, test[, calibration])")
    unknown = sorted(set(splits) - set(SPLITS))
    missing = [s for s in ("train", "test") if s not in splits]
    if unknown or missing:
        raise CompressorError(f"data function '{spec}': " + (f"unknown split(s) {', '.join(unknown)}" if unknown else
                              f"no {' or '.join(missing)} dataset") + "; return train, test and optionally "
                              "validation and calibration")
    if not holds_datasets(list(splits.values())) or not all(holds_datasets([v]) for v in splits.values()):
        raise CompressorError(f"data function '{spec}': every split must be a tf.data.Dataset (or all arrays)")
    return StreamDataset(spec, lambda input_shape, task: dict(splits), settings, shuffled=False)
