"""Data sources a user would write: `--data tests.data_source:tiny` (arrays) or
`--data tests.data_source:streams` (tf.data.Datasets)."""
import numpy as np

SIDE, CLASSES = 12, 3


def tiny():
    rng = np.random.default_rng(1)
    return (rng.random((30, 4)), rng.integers(0, 2, 30)), (rng.random((10, 4)), rng.integers(0, 2, 10))


def two_inputs():
    """A two-input model's arrays from a function: inputs keyed by the model's input names."""
    rng = np.random.default_rng(2)
    a, b, y = rng.random((40, 8)), rng.random((40, 5)), rng.integers(0, 4, 40)
    return {"x_train": {"b": b[:30], "a": a[:30]}, "y_train": y[:30],
            "x_test": {"a": a[30:], "b": b[30:]}, "y_test": y[30:]}


def images(n: int, seed: int = 0):
    """n SIDE x SIDE grayscale images in [0, 1] that are multiples of 1/255 (PNG round trips are exact):
    each class is a bright band at its own rows, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.integers(0, 90, (n, SIDE, SIDE, 1))
    for c in range(CLASSES):
        x[y == c, c * 4:c * 4 + 4] += 160
    return (x / 255.0).astype(np.float32), y.astype(np.int64)


def _datasets(x, y, batch=None):
    from compressor.core._tf import tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.batch(batch) if batch else ds


def streams():
    """train (batched, as users often hand them over), validation and test (unbatched)."""
    x, y = images(150, seed=3)
    return {"train": _datasets(x[:90], y[:90], batch=16), "validation": _datasets(x[90:120], y[90:120]),
            "test": _datasets(x[120:], y[120:])}


def streams_nan_late():
    """A NaN in sample 140 of the training stream: past the batches checked up front, met while training."""
    x, y = images(150, seed=3)
    x[140, 0, 0, 0] = np.nan
    return {"train": _datasets(x, y), "test": _datasets(x[:30], y[:30])}


def streams_wrong_shape():
    x, y = images(40, seed=3)
    return _datasets(x[:, :10], y), None, _datasets(x[:, :10], y)


def streams_bad_labels():
    x, y = images(40, seed=3)
    return _datasets(x, y + 5), None, _datasets(x, y)


def streams_huge_labels():
    """Float class labels of 1e30: a cast to int64 wraps them to a negative number."""
    x, y = images(40, seed=3)
    return _datasets(x, np.full(len(y), 1e30)), None, _datasets(x, y)


def streams_empty_calibration():
    x, y = images(60, seed=3)
    return {"train": _datasets(x[:40], y[:40]), "test": _datasets(x[40:], y[40:]),
            "calibration": _datasets(x[:0], y[:0])}


def streams_text_labels():
    x, y = images(40, seed=3)
    return _datasets(x, y.astype(str)), None, _datasets(x, y)


READ = {"samples": 0}  # how many samples `counted` has produced so far


def counted():
    """5,000 training samples from a generator that counts what is read (calibration must not read them all)."""
    from compressor.core._tf import tf

    x, y = images(100, seed=5)

    def train():
        for i in range(5000):
            READ["samples"] += 1
            yield x[i % 100], y[i % 100]

    spec = (tf.TensorSpec((SIDE, SIDE, 1), tf.float32), tf.TensorSpec((), tf.int64))
    return {"train": tf.data.Dataset.from_generator(train, output_signature=spec), "test": _datasets(x, y)}
