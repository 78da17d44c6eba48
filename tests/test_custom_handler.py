"""A user's own layer class becomes prunable when the user's module registers a handler for it, as
tfmot's PrunableLayer allows: the module is the one given with --custom-objects (the API's
`custom_objects`), and nothing in the tool names the class."""
import json
import sys

import pytest

USER_MODULE = '''
from tf_keras import layers

from compressor.layers import register
from compressor.layers.dense_conv import DenseConv


class GatedDense(layers.Dense):
    """A Dense whose call the user changed (so the table does not trust it on its own)."""

    def call(self, inputs):
        return super().call(inputs) * 1.0


@register
class GatedDenseHandler(DenseConv):
    """Prune GatedDense as the Dense it still is: units are the kernel's last axis."""

    kinds = (GatedDense,)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "userprune_layers.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import userprune_layers

    yield userprune_layers
    sys.modules.pop("userprune_layers", None)


def test_a_custom_objects_module_registers_a_handler_and_the_stage_prunes_through_it(user_module, tmp_path, digits):
    from compressor import layers
    from compressor.api import compress_file
    from compressor.core._tf import keras
    from compressor.run.progress import Reporter

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), user_module.GatedDense(32, activation="relu", name="gated"),
                              keras.layers.Dense(10, activation="softmax", name="out")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=2, verbose=0)
    kernel, bias = model.get_layer("gated").get_weights()
    kernel[:, :16], bias[:16] = 0.0, 0.0  # half the units never fire: the activation stage removes them
    model.get_layer("gated").set_weights([kernel, bias])
    model.save(tmp_path / "gated.keras")
    sys.modules.pop("userprune_layers")  # as in a fresh process: the run imports the module by name
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "targets": ["onnxruntime"], "round_units": 1, "max_accuracy_drop": 0.05, "bench": {"runs": 200, "warmup": 5},
        "stages": [{"name": "activation", "threshold": 0.05, "epochs": 0, "compensate": False}]}))

    report = compress_file(tmp_path / "gated.keras", "digits", tmp_path / "out", recipe=recipe,
                           reporter=Reporter(quiet=True), custom_objects=["userprune_layers"])
    fresh = sys.modules["userprune_layers"].GatedDense
    assert type(layers.handler_for_type(fresh)).__name__ == "GatedDenseHandler"
    row = next(r for r in report["layers"] if r["layer"] == "gated")
    assert row["type"] == "GatedDense" and row["units_before"] == 32 and row["units_after"] <= 16
    assert report["stages"][0]["details"]["layers"]["gated"]["removed"] >= 16
    assert all(v["ok"] for v in report["verification"])
    assert not any("GatedDense" in note for note in report["model"]["load_notes"])  # not "unsupported"


def test_a_handler_may_not_claim_a_layer_type_that_already_has_one():
    from compressor import layers
    from compressor.core._tf import keras
    from compressor.core.errors import CompressorError
    from compressor.layers import register
    from compressor.layers.dense_conv import DenseConv

    with pytest.raises(CompressorError, match="claims Dense, which already has a handler"):
        @register
        class Mine(DenseConv):
            kinds = (keras.layers.Dense,)
    assert all(type(h).__name__ != "Mine" for h in layers.HANDLERS.values())
    assert type(layers.handler_for_type(keras.layers.Dense)).__name__ == "DenseConv"
