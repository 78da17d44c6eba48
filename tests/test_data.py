import numpy as np
import pytest

from compressor.core.errors import CompressorError
from compressor.data.sources import check_against_model, load_dataset


def test_mnist5k_is_the_fixed_offline_split():
    a, b = load_dataset("mnist5k"), load_dataset("mnist5k")
    assert a.x_train.shape == (4000, 784) and a.x_test.shape == (1000, 784)
    assert a.x_train.dtype == np.float32 and 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    assert np.array_equal(a.y_test, b.y_test) and np.array_equal(a.x_train, b.x_train)
    assert set(np.unique(a.y_test)) == set(range(10))
    assert a.x_calib.shape[1:] == (784,) and len(a.x_calib) == 500


def test_digits_builtin():
    d = load_dataset("digits")
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)
    assert d.num_classes == 10


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _arrays(n=20, features=4, classes=3):
    rng = np.random.default_rng(0)
    return dict(x_train=rng.random((n, features)), y_train=rng.integers(0, classes, n),
                x_test=rng.random((n, features)), y_test=rng.integers(0, classes, n))


def test_npz_round_trip(tmp_path):
    ds = load_dataset(_write(tmp_path / "d.npz", **_arrays()))
    assert ds.x_train.shape == (20, 4) and ds.y_train.dtype == np.int64


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.pop("y_test"), "lacks y_test"),
    (lambda a: a.__setitem__("x_train", np.where(np.eye(20, 4) > 0, np.nan, a["x_train"])), "NaN/inf"),
    (lambda a: a.__setitem__("y_train", a["y_train"][:5]), "x_train has 20 samples but y_train has 5"),
    (lambda a: a.__setitem__("y_train", np.eye(20, 3)), "1-D array of integer class labels"),
    (lambda a: a.__setitem__("x_test", np.zeros((20, 5))), "sample shapes differ"),
])
def test_bad_npz_is_named(tmp_path, mutate, message):
    arrays = _arrays()
    mutate(arrays)
    with pytest.raises(CompressorError, match=message):
        load_dataset(_write(tmp_path / "bad.npz", **arrays))


def test_missing_and_unknown_data(tmp_path):
    with pytest.raises(CompressorError, match="not found"):
        load_dataset(tmp_path / "nope.npz")
    with pytest.raises(CompressorError, match="unknown data"):
        load_dataset("imagenet")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CompressorError, match="cannot read data file"):
        load_dataset(tmp_path / "junk.npz")


def test_checked_against_the_model(tmp_path):
    ds = load_dataset(_write(tmp_path / "d.npz", **_arrays(classes=3)))
    with pytest.raises(CompressorError, match="expects \\(7,\\)"):
        check_against_model(ds, (7,), 3)
    with pytest.raises(CompressorError, match="out of range for a model with 2 outputs"):
        check_against_model(ds, (4,), 2)
    check_against_model(ds, (2, 2), 3)  # same size: reshaped to the model's input
    assert ds.x_train.shape == (20, 2, 2)


def test_python_callable_source():
    ds = load_dataset("tests.data_source:tiny")
    assert ds.x_test.shape == (10, 4)


def test_calibration_samples_limits_array_sources(tmp_path):
    """`data.calibration_samples` is the number of samples calibration reads from arrays too: the
    first of x_calib, else of x_train (500 by default); a built-in set's own split is cut, never grown."""
    from compressor.config.recipe import DataSettings

    arrays = _arrays(n=700)
    plain = _write(tmp_path / "plain.npz", **arrays)
    assert np.array_equal(load_dataset(plain).calibration(), arrays["x_train"][:500].astype(np.float32))
    calib = np.random.default_rng(1).random((40, 4))
    with_calib = _write(tmp_path / "calib.npz", **arrays, x_calib=calib)
    for spec, source in ((plain, arrays["x_train"]), (with_calib, calib)):
        got = load_dataset(spec, DataSettings(calibration_samples=16)).calibration()
        assert np.array_equal(got, source[:16].astype(np.float32))
    assert len(load_dataset(plain, DataSettings(calibration_samples=600)).calibration()) == 600
    assert len(load_dataset("digits", DataSettings(calibration_samples=100)).calibration()) == 100
    assert len(load_dataset("digits", DataSettings()).calibration()) == 300
