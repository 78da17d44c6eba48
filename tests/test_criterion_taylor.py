"""The first-order Taylor criterion: |activation x gradient| ranks a unit the loss ignores lowest."""
import numpy as np

from compressor import criteria
from compressor.config.recipe import ActivationStage
from compressor.core._tf import keras
from compressor.stages import observation

L = keras.layers


def _model_with_an_ignored_unit():
    """Unit 0 of 'hidden' is active but the classifier reads it with zero weights: high mean
    |activation|, zero loss gradient. Taylor must rank it last; mean_abs cannot see it."""
    inputs = keras.Input((6,))
    hidden = L.Dense(8, activation="relu", name="hidden")(inputs)
    outputs = L.Dense(3, activation="softmax", name="out")(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    kernel = np.abs(rng.normal(size=(6, 8))).astype("float32") * 0.3  # every unit fires on x >= 0
    kernel[:, 0] = 5.0  # unit 0: large activity
    model.get_layer("hidden").set_weights([kernel, np.full(8, 0.1, "float32")])
    out_kernel = rng.normal(size=(8, 3)).astype("float32")
    out_kernel[0] = 0.0  # ... that nothing downstream reads
    model.get_layer("out").set_weights([out_kernel, np.zeros(3, "float32")])
    return model


def test_taylor_is_registered_and_accepted_by_the_recipe():
    assert "taylor" in criteria.CRITERIA and criteria.get("taylor").needs_gradients
    assert ActivationStage(criterion="taylor").criterion == "taylor"


def test_taylor_ranks_an_ignored_unit_lowest():
    model = _model_with_an_ignored_unit()
    x = np.abs(np.random.default_rng(1).normal(size=(64, 6))).astype("float32")
    y = np.random.default_rng(2).integers(0, 3, size=64)
    tr = observation.trace(model, "hidden")
    activity = observation.collect(model, x, [tr], labels=y)["hidden"]
    taylor = criteria.get("taylor").scores(model, "hidden", activity)
    mean_abs = criteria.get("mean_abs").scores(model, "hidden", activity)
    assert taylor[0] == 0.0 and np.all(taylor[1:] > 0)
    assert mean_abs[0] == 1.0  # the activity criterion keeps it: only the gradient shows it is unused
