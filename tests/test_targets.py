"""The runtime-target registry: every target resolves all it needs, and nothing else knows targets by name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from compressor.config.recipe import parse_recipe
from compressor.core._tf import keras
from compressor.core.errors import CompressorError
from exporters import targets
from exporters.readback import is_weight

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(digits):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(64, activation="relu", input_shape=(64,)), keras.layers.Dense(10)])
    kernel, bias = model.layers[0].get_weights()
    kernel[:, ::2] = 0  # some pruned zeros to read back
    model.layers[0].set_weights([kernel, bias])
    return model


@pytest.mark.parametrize("name", targets.NAMES)
def test_every_target_exports_runs_and_reads_back_each_scheme(name, tiny, digits, tmp_path):
    target = targets.target(name)
    assert target.extension in target.format.extensions and target.runtime == target.format.runtime
    assert target.dense_block[0] >= 1 and target.schemes
    for scheme in [s for s in target.schemes if s.kind != "qat"]:  # qat converts a fine-tuned model: test_qat.py
        path = target.export(tiny, tmp_path / target.filename(f"m-{scheme.name}"), calibration=digits.x_calib,
                             scheme=scheme)
        assert targets.format_for(path) is target.format
        runner = targets.format_for(path).open_runner(path, 1, target.format.resolvers[-1])
        assert runner.runtime == target.runtime
        assert runner.predict(digits.x_test[:3]).shape == (3, 10)
        weights = [t for t in target.format.read_weights(path) if is_weight(t) and len(t.shape) == 2]
        assert any(t.quantized for t in weights) == target.int8
        assert sum(t.zeros for t in weights) >= 64 * 32  # the pruned half of the first kernel
        rows, _ = target.format.inspect_rows(path)
        assert rows


def test_fallbacks_say_why():
    for target in targets.TARGETS.values():
        for fb in target.fallbacks:
            assert fb.when and fb.instead and len(fb.reason) > 40
    assert targets.target("tflite-int8").fallback("delegate-rejects-sparse").instead == "dense int8 storage"


def test_lookup_by_path_is_the_one_extension_map():
    assert targets.format_for("a/b.TFLITE") is targets.TFLITE
    assert targets.format_for("m.onnx", runnable=True).runtime == "onnxruntime"
    assert targets.format_for("m.h5").runner is None
    with pytest.raises(CompressorError, match="unknown file type.*tflite.*onnx"):
        targets.format_for("m.keras", runnable=True)
    with pytest.raises(CompressorError, match="unknown extension '.pb'"):
        targets.format_for("m.pb")
    with pytest.raises(CompressorError, match="unknown target 'tvm'"):
        targets.target("tvm")


def test_recipe_targets_and_blocks_come_from_the_registry():
    assert parse_recipe({}).targets == list(targets.NAMES)
    with pytest.raises(CompressorError, match="targets"):
        parse_recipe({"targets": ["openvino"]})
    for names, block in ((["tflite-int8", "onnxruntime"], (16, 1)), (["tflite"], (4, 1)), (["onnxruntime"], (1, 1))):
        assert parse_recipe({"targets": names}).dense_block() == block == targets.dense_block(names)


# What branching on a target name or a file extension looks like in this code base.
_NAME_OR_EXTENSION = re.compile(
    r"""startswith\(\s*["'](tflite|onnx)|["'](tflite-int8|onnxruntime-int8)["']|["']\.(tflite|onnx)["']"""
    r"""|[=!]=\s*["'](tflite|onnxruntime|onnx)["']|["'](tflite|onnxruntime)["']\s*(not\s+)?in\b""")


def test_no_module_but_the_registry_branches_on_target_names_or_extensions():
    offenders = []
    for folder in ("compressor", "exporters", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "exporters" / "targets.py":
                continue
            text = path.read_text()
            for number, line in enumerate(text.splitlines(), 1):
                if _NAME_OR_EXTENSION.search(line) or (folder == "exporters" and ".suffix" in line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_grep_finds_what_it_is_meant_to_find():
    for line in ('if suffix == ".tflite":', 'if "tflite-int8" in recipe.targets:', 'any(t.startswith("tflite") for t)',
                 'if runtime == "onnxruntime":'):
        assert _NAME_OR_EXTENSION.search(line), line


def test_machine_block_lists_isa_flags():
    from exporters.benchmark import cpu_flags, machine_info

    info = machine_info()
    assert "isa" in info
    if cpu_flags():
        assert set(info["isa"]) <= cpu_flags()


def test_round_units_auto_is_the_targets_channel_block(monkeypatch):
    import exporters.cpu as cpu

    for flags, onnx_block in (({"avx2", "avx512f"}, 16), ({"avx2"}, 8)):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        assert parse_recipe({}).unit_multiple() == onnx_block  # default targets include onnxruntime
        assert parse_recipe({"targets": ["tflite"]}).unit_multiple() == 8
        assert parse_recipe({"round_units": 4}).unit_multiple() == 4
    for bad in (0, 300, "wide"):
        with pytest.raises(CompressorError, match="round_units"):
            parse_recipe({"round_units": bad})


def test_onnxruntime_keeps_its_blocked_layout_only_at_the_channel_block(tmp_path):
    """Why auto rounding exists: between two convs at a width off the block, onnxruntime reorders
    out of its NCHWc layout and back; at the block it stays in it."""
    import onnx
    import onnxruntime as ort

    block = targets.nchwc_channel_block()

    def reorders(width: int) -> int:
        inputs = keras.Input((8, 8, block))
        x = keras.layers.Conv2D(width, 1, activation="relu")(inputs)
        x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(block, 1)(x)
        model = keras.Model(inputs, keras.layers.Conv2D(block, 1)(x))
        path = targets.target("onnxruntime").export(model, tmp_path / f"w{width}.onnx")
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"w{width}-opt.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        return sum(n.op_type.startswith("Reorder") for n in graph.node)

    assert reorders(block // 2) > reorders(block)
