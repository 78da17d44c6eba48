"""The generated tasks (`mnist5k@SIZE`, `clutter@SIZE`, `clutter128`): names, determinism, shapes, labels."""
import numpy as np
import pytest

from compressor.core.errors import CompressorError
from compressor.data import generated
from compressor.data.sources import load_dataset


def test_names_parse_and_bad_sizes_are_one_line_errors():
    assert generated.parse("clutter128") == ("clutter", 128)
    assert generated.parse("clutter@96") == ("clutter", 96)
    assert generated.parse("mnist5k@224") == ("mnist5k", 224)
    assert generated.parse("mnist5k") is None and generated.parse("data.npz") is None
    for bad in ("clutter@", "clutter@big", "clutter@8", "mnist5k@4096"):
        with pytest.raises(CompressorError, match="size after '@'"):
            load_dataset(bad)


def test_clutter_is_deterministic_for_a_seed_and_differs_across_seeds(mnist5k):
    digits = mnist5k.x_test[:12].reshape(-1, 28, 28)
    a = generated.make("clutter", 40, digits)
    assert a.shape == (12, 40, 40, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.05
    assert np.array_equal(a, generated.make("clutter", 40, digits))
    assert not np.array_equal(a, generated.make("clutter", 40, digits, seed=1))


def test_generated_sets_keep_mnist5k_split_and_labels(mnist5k):
    ds = load_dataset("clutter@16")
    assert ds.x_train.shape == (4000, 16, 16, 3) and ds.x_test.shape == (1000, 16, 16, 3)
    assert np.array_equal(ds.y_test, mnist5k.y_test) and set(np.unique(ds.y_train)) == set(range(10))
    assert ds.x_calib.shape == (500, 16, 16, 3) and ds.name == "clutter@16"
    resized = load_dataset("mnist5k@16")
    assert resized.x_test.shape == (1000, 16, 16, 3) and np.array_equal(resized.y_train, mnist5k.y_train)
    # the resized digit keeps its ink where the 28 px digit has it (centre vs border)
    assert resized.x_test[:, 6:10, 6:10].mean() > resized.x_test[:, :2].mean()
