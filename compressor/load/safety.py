"""Decide, from a model file's stored configuration alone, whether loading it could run code.

A Keras file is data plus instructions for rebuilding Python objects: a `Lambda` layer carries
marshalled bytecode, a serialized object may name any importable module, and a class nobody
registered falls back to code found in the file (SavedModel revives it from a stored graph). So
every loader in this project reads the config first (`.h5`: the `model_config` attribute,
`.keras`: `config.json`, SavedModel: `keras_metadata.pb`) and hands it to `check_config` before
anything is deserialised. The user can opt in for their own files (`--trust-model-code`) and
register their own layer classes by module name (`--custom-objects pkg.mod`).
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from compressor.layers.keras3_layers import recognised
from compressor.core.errors import CompressorError

#: Layer classes whose config carries Python code (marshalled bytecode) or a reference to it.
CODE_LAYERS = frozenset({"Lambda"})
#: Serialized objects that carry code themselves (Keras 3 writes lambdas as `__lambda__`).
CODE_OBJECTS = frozenset({"__lambda__"})
#: Keras' own internal markers for tuples, tensors, arrays, ... in a config: plain data.
DATA_MARKERS = frozenset({
    "__tuple__", "__keras_tensor__", "__numpy__", "__tensor__", "__bytes__", "__typespec__",
    "__ellipsis__", "__slice__", "__list__", "__dict__", "__passive_serialization__",
})
#: tf-keras layers that call a TensorFlow function named in the config (`x + 1` in a functional model).
TF_OP_LAYERS = frozenset({"TFOpLambda", "SlicingOpLambda", "TensorFlowOpLayer"})
#: Namespaces and functions of TensorFlow that reach files, Python or the process: never a tensor op.
UNSAFE_TF_NAMES = frozenset({
    "io", "gfile", "py_func", "py_function", "numpy_function", "print", "Print", "summary", "saved_model", "train",
    "data", "distribute", "debugging", "load_op_library", "load_library", "sysconfig", "config", "autograph",
    "function", "experimental", "lookup", "tpu", "profiler", "keras", "estimator",
})
_MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
#: Deeper configs are not Keras models (and would exhaust Python's recursion limit).
MAX_DEPTH = 200
_KERAS_MODULES = ("keras", "tf_keras")
# Loaders here use compile=False, so a custom loss or metric in the compile config is never built.
_NOT_LOADED = frozenset({"compile_config"})
_LAYER_KEYS = ("layer", "backward_layer", "forward_layer", "cell")
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
TRUST_WARNING = ("--trust-model-code: code stored in the model file (Lambda layers, custom classes) will run; "
                 "use it only for files you made yourself")


@dataclass(frozen=True)
class LoadPolicy:
    """What a load may do beyond rebuilding built-in layers: run stored code, use the user's classes."""

    trust_code: bool = False
    custom_objects: dict[str, type] = field(default_factory=dict)


STRICT = LoadPolicy()


def make_policy(trust_model_code: bool = False, custom_objects: list[str] | str | None = None) -> LoadPolicy:
    """The policy for the CLI flags / API arguments; warns on stderr once when code is trusted."""
    if trust_model_code:
        print(f"warning: {TRUST_WARNING}", file=sys.stderr)
    modules = [custom_objects] if isinstance(custom_objects, str) else list(custom_objects or [])
    found: dict[str, type] = {}
    for name in modules:
        found.update(layer_classes(name))
    return LoadPolicy(trust_code=bool(trust_model_code), custom_objects=found)


def layer_classes(module_name: str) -> dict[str, type]:
    """Import the user's module by name (never a file from the model) and collect its tf-keras layers."""
    from compressor.core._tf import keras

    if not _MODULE_NAME.match(module_name or ""):
        raise CompressorError(f"--custom-objects '{module_name}' is not a module name; pass a dotted name like "
                              "mypkg.layers (importable from PYTHONPATH), not a file path")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import is one line too
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CompressorError(f"--custom-objects '{module_name}': cannot import it ({type(exc).__name__}: {first}); "
                              "pass a module importable from PYTHONPATH") from None
    found: dict[str, type] = {}
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and issubclass(cls, keras.layers.Layer):
            found[cls.__name__] = cls
            found[keras.utils.get_registered_name(cls)] = cls
    if not found:
        raise CompressorError(f"--custom-objects '{module_name}' defines no tf-keras Layer classes; pass the module "
                              "where your layer classes are defined")
    return found


def check_config(config: Any, source: str, policy: LoadPolicy = STRICT, *, keras3: bool = False,
                 layers: bool = True) -> None:
    """Refuse a stored model config whose loading would run code that is not the user's own.

    Walks the whole config, nested models, wrappers and RNN cells included. Raises one
    CompressorError naming the first offending layer and the fix; returns when loading is safe.
    `keras3`: the file is read by Keras 3, so its layer names count as built-in too. `layers=False`
    for configs that are not layers (a SavedModel's metrics): only what they would import is checked.
    """
    if policy.trust_code:
        return
    if not isinstance(config, dict):
        raise CompressorError(f"cannot read model '{source}': its stored model config is not a JSON object "
                              "(corrupt file?); re-save it with model.save()")
    known = _known_classes(policy, keras3)
    try:
        for layer, where in _layers(config, "model") if layers else ():
            _check_layer(layer, where, source, known)
        for obj, where in _objects(config, "model"):
            _check_object(obj, where, source, known)
    except _TooDeep as exc:
        raise CompressorError(f"cannot read model '{source}': its config is nested more than {MAX_DEPTH} levels "
                              f"deep at '…{str(exc)[-60:]}'; not a Keras model (corrupt or crafted file)") from None


class _TooDeep(Exception):
    """Raised with the place where a config nests deeper than MAX_DEPTH."""


def _layers(cfg: dict, where: str, depth: int = 0) -> Iterator[tuple[dict, str]]:
    """Every layer config (the model itself, its layers, nested models, wrapped layers, cells)."""
    if depth > MAX_DEPTH:
        raise _TooDeep(where)
    yield cfg, where
    inner = cfg.get("config")
    if isinstance(inner, list):  # Keras 2.1-era Sequential: the config is the list of layers
        inner = {"layers": inner}
    if not isinstance(inner, dict):
        return
    layers = inner.get("layers")
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict):
            yield from _layers(layer, _name(layer), depth + 1)
    for key in _LAYER_KEYS:
        if isinstance(inner.get(key), dict):
            yield from _layers(inner[key], f"{where}/{_name(inner[key])}", depth + 1)
    cells = inner.get("cells")
    for cell in cells if isinstance(cells, list) else []:
        if isinstance(cell, dict):
            yield from _layers(cell, f"{where}/{_name(cell)}", depth + 1)


def _objects(value: Any, where: str, depth: int = 0) -> Iterator[tuple[dict, str]]:
    """Every serialized object anywhere in the config (initializers, activations, dtypes, ...)."""
    if depth > MAX_DEPTH:
        raise _TooDeep(where)
    if isinstance(value, dict):
        if "class_name" in value:
            yield value, where
        name = _name(value) if "class_name" in value and isinstance(value.get("config"), dict) else None
        for key, item in value.items():
            if key not in _NOT_LOADED:
                yield from _objects(item, name or where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _objects(item, where, depth + 1)


def _name(cfg: dict) -> str:
    inner = cfg.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    return str(name or cfg.get("name") or "?")


def _check_layer(layer: dict, where: str, source: str, known: set[str]) -> None:
    class_name = str(layer.get("class_name"))
    inner = layer.get("config") if isinstance(layer.get("config"), dict) else {}
    what = _stored_code(class_name, inner)
    if what:
        raise CompressorError(
            f"cannot read model '{source}': layer '{where}' ({class_name}) holds {what} that loading or running "
            "would execute; refused for safety: replace it with built-in layers and re-save, or pass "
            "--trust-model-code if you made this file yourself")
    registered = layer.get("registered_name")
    if class_name in known or (isinstance(registered, str) and registered in known) or recognised(layer):
        return  # recognised: a Keras-library class (ConvNeXt's LayerScale) the importer rebuilds with ours
    raise CompressorError(
        f"cannot read model '{source}': layer '{where}' has custom class '{registered or class_name}' that is not "
        "registered; pass --custom-objects pkg.mod (your module defining it) or save the model without it")


def _check_object(obj: dict, where: str, source: str, known: set[str]) -> None:
    class_name = str(obj.get("class_name"))
    module = obj.get("module")
    if class_name in CODE_OBJECTS:
        raise CompressorError(
            f"cannot read model '{source}': layer '{where}' holds a Python lambda that loading would run; refused "
            "for safety: use built-in activations/initializers, or pass --trust-model-code if you made this file")
    if module is None or class_name in DATA_MARKERS:
        return
    if isinstance(module, str) and module.split(".")[0] in _KERAS_MODULES:
        return
    registered = obj.get("registered_name")
    if class_name in known or (isinstance(registered, str) and registered in known):
        return
    if class_name == "function" and isinstance(obj.get("config"), str) and obj["config"] in known:
        return  # a function registered in this process (the importer's hard_silu, ...): resolved by name, never imported
    raise CompressorError(
        f"cannot read model '{source}': layer '{where}' refers to '{class_name}' in module '{module}', which "
        "loading would import and run; refused for safety: pass --custom-objects pkg.mod if it is your own "
        "class, or --trust-model-code if you made this file yourself")


def _stored_code(class_name: str, config: dict) -> str:
    """What code a layer config would run, or '' (see CODE_LAYERS, TF_OP_LAYERS, UNSAFE_TF_NAMES)."""
    if class_name in CODE_LAYERS:
        return "Python code"
    if any(str(key).endswith("type") and value == "lambda" for key, value in config.items()):
        return "marshalled Python code"  # tf-keras's func_dump marker (Lambda, RNN cell wrappers, ...)
    if class_name in TF_OP_LAYERS:
        node_def = config.get("node_def")
        target = str(config.get("function") or (node_def.get("op") if isinstance(node_def, dict) else "") or "")
        if not target or set(target.split(".")) & UNSAFE_TF_NAMES or target in UNSAFE_GRAPH_OPS:
            return f"a call of the TensorFlow function '{target}'"
    return ""


def _known_classes(policy: LoadPolicy, keras3: bool) -> set[str]:
    """Built-in tf-keras and Keras 3 layer classes, plus the user's registered ones."""
    from compressor.core._tf import keras

    names = set(_MODEL_CLASSES) | set(policy.custom_objects)
    names |= {n for n in dir(keras.layers) if inspect.isclass(getattr(keras.layers, n, None))}
    try:  # tf-keras's own deserialization table also has TFOpLambda, RNN cell wrappers, V1/V2 aliases
        from tf_keras.src.layers import serialization

        serialization.populate_deserializable_objects()
        names |= set(serialization.LOCAL.ALL_OBJECTS)
    except (ImportError, AttributeError):
        pass
    names |= set(keras.utils.get_custom_objects())
    if keras3:
        import keras as keras3_module  # noqa: PLC0415 - only Keras 3 files pay for importing Keras 3

        layers = keras3_module.layers
        names |= {n for n in dir(layers) if inspect.isclass(getattr(layers, n, None))}
    return names - CODE_LAYERS


# --------------------------------------------------------------------------- SavedModel

#: Graph ops that touch files or call back into Python; a Keras layer's forward pass never needs them.
UNSAFE_GRAPH_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc", "WriteFile", "ReadFile", "MatchingFiles"})


def savedmodel_configs(path, source: str) -> list[tuple[str, dict]]:
    """(kind, config) of every object in a SavedModel's keras_metadata.pb: layers, models, metrics."""
    import json
    from pathlib import Path

    from tf_keras.protobuf import saved_metadata_pb2

    meta = saved_metadata_pb2.SavedMetadata()
    try:
        meta.ParseFromString(Path(path, "keras_metadata.pb").read_bytes())
        configs = [(node.identifier, json.loads(node.metadata)) for node in meta.nodes if node.metadata]
    except Exception as exc:  # noqa: BLE001 - damaged metadata is one line
        raise CompressorError(f"cannot read model '{source}': damaged keras_metadata.pb ({type(exc).__name__}); "
                              "re-save the model with model.save()") from None
    return configs


def check_savedmodel(path, source: str, policy: LoadPolicy = STRICT) -> None:
    """Every saved layer's config, and the stored graphs' ops, before tf-keras revives anything."""
    from pathlib import Path

    for kind, cfg in savedmodel_configs(path, source):
        check_config(cfg, source, policy, layers=kind != "_tf_keras_metric")
    if policy.trust_code:
        return
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    pb = Path(path, "saved_model.pb")
    try:
        proto.ParseFromString(pb.read_bytes()) if pb.exists() else None
    except Exception as exc:  # noqa: BLE001
        raise CompressorError(f"cannot read model '{source}': damaged saved_model.pb ({type(exc).__name__}); "
                              "re-save the model with model.save()") from None
    for graph in proto.meta_graphs:
        nodes = list(graph.graph_def.node) + [n for f in graph.graph_def.library.function for n in f.node_def]
        bad = sorted({n.op for n in nodes} & UNSAFE_GRAPH_OPS)
        if bad:
            raise CompressorError(
                f"cannot read model '{source}': its stored graph uses {', '.join(bad)} (file access or Python "
                "callbacks), which running it would execute; refused for safety: pass --trust-model-code if you "
                "made this file yourself")
