"""Depth stage: residual blocks found, removed exactly, scored and kept within the budget; and the
weight stage's block policy on token-sequence Dense layers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compressor.config.recipe import parse_recipe
from compressor.core._tf import keras
from compressor.stages import depth, recovery, weight
from compressor.stages.base import StageContext
from compressor.train.training import accuracy, fit

L = keras.layers


def _encoder(tokens=8, features=8, d_model=16, blocks=2):
    """A small post-norm transformer encoder (attention and FFN sub-blocks, each with a residual Add)."""
    inputs = L.Input((tokens, features), name="rows")
    x = L.Dense(d_model, name="tokens")(inputs)
    for b in range(blocks):
        attended = L.MultiHeadAttention(2, d_model // 2, name=f"mha{b}")(x, x)
        x = L.LayerNormalization(name=f"ln{b}a")(L.Add(name=f"res{b}a")([x, attended]))
        hidden = L.Dense(32, activation="gelu", name=f"ffn{b}_in")(x)
        x = L.LayerNormalization(name=f"ln{b}b")(
            L.Add(name=f"res{b}b")([x, L.Dense(d_model, name=f"ffn{b}_out")(hidden)]))
    outputs = L.Dense(10, activation="softmax", name="classifier")(L.GlobalAveragePooling1D(name="gap")(x))
    return keras.Model(inputs, outputs)


def _as_tokens(data):
    shaped = {k: getattr(data, k).reshape(-1, 8, 8) for k in ("x_train", "x_test", "x_calib")}
    return dataclasses.replace(data, **shaped)


def _zero(layer):
    layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])


def test_mobilenetv2_block_with_zeroed_branch_is_removed_exactly():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10)
    blocks = depth.residual_blocks(model)
    assert [b.add for b in blocks][:3] == ["block_2_add", "block_4_add", "block_5_add"] and len(blocks) == 10
    block = blocks[1]
    assert block.skip[0] == "block_3_project_BN" and "block_4_depthwise" in block.layers
    bn = model.get_layer("block_4_project_BN")  # gamma = beta = 0: the branch adds exactly nothing
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.zeros_like(gamma), np.zeros_like(beta), mean, var])
    reduced = depth.without_blocks(model, [block])
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(reduced.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)
    names = {layer.name for layer in reduced.layers}
    assert not names & {*block.layers, block.add}
    assert len(reduced.layers) == len(model.layers) - len(block.layers) - 1
    assert len(depth.residual_blocks(reduced)) == 9
    # a later step: block 5's skip was block 4's Add, removed above; found again on the reduced model
    follow = {b.add: b for b in depth.residual_blocks(reduced)}["block_5_add"]
    assert follow.skip[0] == "block_3_project_BN"
    bn = reduced.get_layer("block_5_project_BN")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.zeros_like(gamma), np.zeros_like(beta), mean, var])
    twice = depth.without_blocks(reduced, [follow])
    np.testing.assert_allclose(twice.predict(x, verbose=0), reduced.predict(x, verbose=0), atol=1e-4)
    assert "block_5_add" not in {layer.name for layer in twice.layers}


def test_encoder_attention_and_ffn_sub_blocks_are_removed_exactly():
    keras.utils.set_random_seed(0)
    model = _encoder()
    blocks = {b.add: b for b in depth.residual_blocks(model)}
    assert set(blocks) == {"res0a", "res0b", "res1a", "res1b"}
    assert blocks["res0a"].layers == ("mha0",) and blocks["res1b"].layers == ("ffn1_in", "ffn1_out")
    _zero(model.get_layer("mha0")._output_dense)
    _zero(model.get_layer("ffn1_out"))
    reduced = depth.without_blocks(model, [blocks["res0a"], blocks["res1b"]])
    x = np.random.default_rng(1).random((4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(reduced.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)
    assert {"mha0", "res0a", "ffn1_in", "ffn1_out", "res1b"}.isdisjoint(layer.name for layer in reduced.layers)


@pytest.fixture(scope="module")
def trained_encoder(digits):
    keras.utils.set_random_seed(0)
    data = _as_tokens(digits)
    model = _encoder()
    fit(model, data, epochs=4, batch_size=32, learning_rate=3e-3, hold_zeros=False)
    return model, data


def _ctx(data, drop=0.03, baseline=None):
    recipe = parse_recipe({"max_accuracy_drop": drop, "stages": [{"name": "depth"}]})
    return recipe, StageContext(recipe, data, baseline_metric=baseline)


def test_depth_stage_removes_least_important_blocks_within_budget(trained_encoder):
    model, data = trained_encoder
    recipe, ctx = _ctx(data)
    cfg = recipe.stages[0].model_copy(update={"max_fraction": 0.5, "step": 1, "epochs": 1})
    baseline = accuracy(model, data.x_test, data.y_test)
    outcome = depth.apply(model, cfg, ctx)
    details = outcome.details
    scores = [r["output_kl"] for r in details["candidates"]]
    assert scores == sorted(scores) and len(scores) == 4 and details["limit"] == 2
    removed = [r["add"] for r in details["removed_blocks"]]
    assert removed == [r["add"] for r in details["candidates"][:len(removed)]]
    assert baseline - accuracy(outcome.model, data.x_test, data.y_test) <= 0.03
    names = {layer.name for layer in outcome.model.layers}
    assert all(layer not in names for r in details["removed_blocks"] for layer in r["layers"])
    assert model.get_layer("mha0") is not None and len(model.layers) == 18  # the input model is untouched


def test_default_depth_stage_has_no_cap_below_the_budget(trained_encoder):
    """The default recipe leaves the count to the budget: with room for it, every block goes (a cap
    kept MobileNetV2 at 2.4x in onnxruntime where removing the last two blocks gave 3.1x)."""
    model, data = trained_encoder
    recipe, ctx = _ctx(data, drop=1.0)
    cfg = recipe.stages[0].model_copy(update={"epochs": 0, "samples": 16})  # the default max_fraction and step
    outcome = depth.apply(model, cfg, ctx)
    assert outcome.details["removed"] == 4 and depth.residual_blocks(outcome.model) == []


def test_step_over_budget_is_undone(trained_encoder):
    model, data = trained_encoder
    recipe, ctx = _ctx(data, drop=0.0, baseline=1.0)  # no accuracy can be lost: every step is over
    cfg = recipe.stages[0].model_copy(update={"epochs": 0, "recover_epochs": 1})
    outcome = depth.apply(model, cfg, ctx)
    assert outcome.details["removed"] == 0 and outcome.details["steps"][0]["within_budget"] is False
    assert len(outcome.model.layers) == len(model.layers)
    assert "crossed the budget and was undone" in outcome.notes[0]
    # the step got its recovery epoch, then was undone all the same
    assert outcome.details["steps"][0]["recovery_epochs"] == 1


class _Metric:
    """Stands in for the task's Keras evaluation: a fixed sequence of metric values."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, model, split="budget"):
        return type("Score", (), {"value": self.values.pop(0)})()


@pytest.mark.parametrize("values, epochs, kept", [
    ([0.70, 0.74, 0.78, 0.80], 3, True),   # heals within the allowance: the step is kept
    ([0.70, 0.74, 0.73], 2, False),         # stops improving: undone after 2 recovery epochs, not 4
    ([0.70, 0.72, 0.74, 0.76, 0.78], 4, False),  # still over after the allowance: undone
])
def test_a_step_over_budget_gets_recovery_epochs_while_they_help(trained_encoder, monkeypatch, values, epochs, kept):
    model, data = trained_encoder
    recipe, ctx = _ctx(data, drop=0.01, baseline=0.80)
    cfg = recipe.stages[0].model_copy(update={"epochs": 0, "max_fraction": 0.25, "step": 1})  # one block
    task = depth.context_task(ctx)
    monkeypatch.setattr(task, "keras", _Metric(values))
    monkeypatch.setattr(depth, "context_task", lambda ctx: task)
    trained = []
    monkeypatch.setattr(recovery, "finetune", lambda m, c, n, label: trained.append(n))
    outcome = depth.apply(model, cfg, ctx)
    step = outcome.details["steps"][0]
    assert step["recovery_epochs"] == epochs == sum(trained) and step["within_budget"] is kept
    assert outcome.details["removed"] == int(kept)


def test_models_without_residual_blocks_are_left_as_is(small_mlp, digits):
    recipe, ctx = _ctx(digits)
    outcome = depth.apply(small_mlp, recipe.stages[0], ctx)
    assert outcome.details["removed"] == 0 and "no residual Add" in outcome.notes[0]
    assert [layer.name for layer in outcome.model.layers] == [layer.name for layer in small_mlp.layers]
    x = digits.x_test[:8]
    np.testing.assert_allclose(outcome.model.predict(x, verbose=0), small_mlp.predict(x, verbose=0), atol=1e-6)
    # A concatenation (not an Add) and an Add of two different branches are not removable either.
    inputs = L.Input((8,))
    a, b = L.Dense(8, name="a")(inputs), L.Dense(8, name="b")(inputs)
    two = keras.Model(inputs, L.Add()([a, b]))
    assert depth.residual_blocks(two) == []


def test_token_dense_layers_get_no_block_zeros_by_default():
    model = _encoder(blocks=1)
    vector = keras.Model(model.input, L.Dense(10, name="head")(L.Dense(32, name="pooled")(model.layers[-2].output)))
    cfg = parse_recipe({"stages": [{"name": "weight"}]}).stages[0]
    skipped = weight.left_dense(vector, cfg)
    assert {"tokens", "ffn0_in", "ffn0_out"} <= set(skipped) and "token sequence" in skipped["ffn0_in"]
    assert "pooled" not in skipped and "pooled" in weight._pruned_layers(vector, cfg)
    assert "ffn0_in" not in weight._pruned_layers(vector, cfg)
    wanted = cfg.model_copy(update={"sequence_zeros": True})
    assert "ffn0_in" in weight._pruned_layers(vector, wanted) and "ffn0_in" not in weight.left_dense(vector, wanted)


def test_stepwise_removal_of_chained_mobilenetv2_blocks(digits):
    """Chained blocks: block 5's skip is block 4's Add, gone after an earlier step. Steps within the
    budget double (1, 2, 4, then the 3 left), so 10 blocks take 4 fine-tunes, not 10."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10)
    rgb = lambda x: np.repeat(np.pad(x.reshape(-1, 8, 8), ((0, 0), (12, 12), (12, 12)))[..., None], 3, -1)  # noqa: E731
    data = dataclasses.replace(digits, **{k: rgb(getattr(digits, k)[:64]) for k in ("x_train", "x_test", "x_calib")},
                               y_train=digits.y_train[:64], y_test=digits.y_test[:64])
    recipe, ctx = _ctx(data, drop=1.0)
    cfg = recipe.stages[0].model_copy(update={"max_fraction": 1.0, "step": 1, "epochs": 0, "samples": 16})
    outcome = depth.apply(model, cfg, ctx)
    assert outcome.details["removed"] == 10 and depth.residual_blocks(outcome.model) == []
    assert [len(step["blocks"]) for step in outcome.details["steps"]] == [1, 2, 4, 3]
    assert not any(layer.name.endswith("_add") for layer in outcome.model.layers)
