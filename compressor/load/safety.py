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
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from compressor.core.errors import CompressorError
from compressor.layers.keras3_layers import recognised
from compressor.load.bounds import MAX_DEPTH, MODULE_NAME, clip, parse_config, refused_module

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
_KERAS_MODULES = ("keras", "tf_keras")
# Loaders here use compile=False, so a custom loss or metric in the compile config is never built.
_NOT_LOADED = frozenset({"compile_config"})
_LAYER_KEYS = ("layer", "backward_layer", "forward_layer", "cell")
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

    if not MODULE_NAME.match(module_name or ""):
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
        raise CompressorError(f"cannot read model '{clip(source)}': its stored model config is not a JSON object "
                              "(corrupt file?); re-save it with model.save()")
    known = _known_classes(policy, keras3)
    try:
        for layer, where in _layers(config, "model") if layers else ():
            _check_layer(layer, where, source, known)
        for obj, where in _objects(config, "model"):
            _check_object(obj, where, source, known)
    except _TooDeep as exc:
        raise CompressorError(f"cannot read model '{clip(source)}': its config is nested more than {MAX_DEPTH} levels "
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


def _objects(value: Any, where: str) -> Iterator[tuple[dict, str]]:
    """Every serialized object anywhere in the config (initializers, activations, dtypes, ...), in
    document order; a stack rather than recursion, so a wide config costs its size, not size x depth."""
    stack = [(value, where, 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _TooDeep(where)
        if isinstance(value, dict):
            if "class_name" in value:
                yield value, where
            name = _name(value) if "class_name" in value and isinstance(value.get("config"), dict) else None
            stack.extend((item, name or where, depth + 1) for key, item in reversed(value.items())
                         if key not in _NOT_LOADED)
        elif isinstance(value, list):
            stack.extend((item, where, depth + 1) for item in reversed(value))


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
            f"cannot read model '{clip(source)}': layer '{clip(where, 40)}' ({clip(class_name, 30)}) holds {what} "
            "that loading or running would execute; refused: replace it with built-in layers and re-save, or pass "
            "--trust-model-code if you made the file")
    registered = layer.get("registered_name")
    if class_name in known or (isinstance(registered, str) and registered in known) or recognised(layer):
        return  # recognised: a Keras-library class (ConvNeXt's LayerScale) the importer rebuilds with ours
    raise CompressorError(
        f"cannot read model '{clip(source)}': layer '{clip(where, 40)}' has custom class "
        f"'{clip(registered or class_name, 40)}' that is not registered; pass --custom-objects pkg.mod (your module "
        "defining it) or save the model without it")


def _check_object(obj: dict, where: str, source: str, known: set[str]) -> None:
    class_name = str(obj.get("class_name"))
    module = obj.get("module")
    if class_name in CODE_OBJECTS:
        raise CompressorError(
            f"cannot read model '{clip(source)}': layer '{clip(where, 40)}' holds a Python lambda that loading would "
            "run; refused for safety: use built-in activations/initializers, or pass --trust-model-code if you made "
            "this file")
    if module is None or class_name in DATA_MARKERS:
        return
    if isinstance(module, str) and module.split(".")[0] in _KERAS_MODULES:
        return
    registered = obj.get("registered_name")
    if class_name in known or (isinstance(registered, str) and registered in known) or recognised(obj):
        return
    if class_name == "function" and isinstance(obj.get("config"), str) and obj["config"] in known:
        # a function registered in this process (the importer's hard_silu, ...): resolved by name, never imported
        return
    raise CompressorError(
        f"cannot read model '{clip(source)}': layer '{clip(where, 40)}' refers to '{clip(class_name, 30)}' in module "
        f"'{clip(module, 40)}', which loading would import and run; refused: pass --custom-objects pkg.mod if it is "
        "your own class, or --trust-model-code if you made the file")


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
            return f"a call of the TensorFlow function '{clip(target, 40)}'"
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

#: Every graph op a tf-keras SavedModel of built-in layers holds, and nothing else: an allow-list, so an op
#: that touches files, the network or the process (PrintV2 to a file, WriteFile, PyFunc, ImmutableConst,
#: text-file table initializers, ...) is refused whatever its name. Derived by saving tf-keras 2.x models
#: as SavedModels and collecting the ops of their graphs and functions: Dense with every activation,
#: Conv1D/2D/3D (strided, dilated, grouped), DepthwiseConv2D, SeparableConv2D, Conv2DTranspose, BatchNorm,
#: LayerNorm, GroupNorm, pooling, padding, cropping, up-sampling, dropout and noise layers, reshaping
#: layers, LSTM/GRU/SimpleRNN/Bidirectional/ConvLSTM2D, Embedding, MultiHeadAttention, Attention,
#: preprocessing (Rescaling, Normalization, Resizing, random augmentation, Integer/StringLookup,
#: CategoryEncoding, Discretization), MobileNetV2, EfficientNetB0, ResNet50V2 and ConvNeXtTiny, compiled
#: and trained or not; plus a few close relatives of those ops (the V1/V2 forms, the other reductions,
#: comparisons and stateless random ops) that other versions of the same layers emit.
KERAS_GRAPH_OPS = frozenset({
    # variables, resources, calls and control flow
    "Const", "Placeholder", "PlaceholderWithDefault", "Identity", "IdentityN", "NoOp", "StopGradient",
    "PreventGradient", "Snapshot", "EnsureShape", "CheckNumerics", "Assert", "VarHandleOp", "ReadVariableOp",
    "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "VarIsInitializedOp", "DestroyResourceOp",
    "DisableCopyOnRead", "ResourceGather", "PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf",
    "While", "StatelessWhile", "Case", "StatelessCase",
    "TensorListFromTensor", "TensorListGetItem", "TensorListReserve", "TensorListSetItem", "TensorListStack",
    "TensorListLength", "TensorListElementShape", "TensorListPushBack", "TensorListPopBack",
    # in-memory lookup tables (StringLookup, IntegerLookup); the text-file initializers are not here
    "HashTableV2", "LookupTableFindV2", "LookupTableImportV2", "LookupTableSizeV2", "MutableHashTableV2",
    "LookupTableInsertV2", "LookupTableExportV2",
    # layers' arithmetic
    "Abs", "AddN", "AddV2", "Add", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "FloorDiv", "FloorMod", "Neg",
    "Square", "SquaredDifference", "Sqrt", "Rsqrt", "Reciprocal", "Pow", "Exp", "Log", "Log1p", "Erf", "Erfc",
    "Sin", "Cos", "Tanh", "Sigmoid", "Softplus", "Softsign", "Relu", "Relu6", "Elu", "Selu", "LeakyRelu",
    "Softmax", "LogSoftmax", "Maximum", "Minimum", "Round", "Floor", "Ceil", "Sign", "ClipByValue",
    "Sum", "Mean", "Max", "Min", "Prod", "All", "Any", "ArgMax", "ArgMin", "Cumsum",
    "Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual", "LogicalAnd", "LogicalOr",
    "LogicalNot", "Select", "SelectV2", "Cast", "Bitcast", "ZerosLike", "OnesLike", "Fill", "Range",
    "MatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "BiasAdd", "Conv2D", "Conv3D",
    "Conv2DBackpropInput", "Conv3DBackpropInputV2", "DepthwiseConv2dNative", "MaxPool", "MaxPoolV2",
    "MaxPool3D", "AvgPool", "AvgPool3D", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3",
    "CudnnRNNV3", "CudnnRNNBackpropV3", "Bucketize", "DenseBincount", "Bincount",
    # shapes and layout
    "Shape", "ShapeN", "Size", "Rank", "Reshape", "ExpandDims", "Squeeze", "Transpose", "InvertPermutation",
    "ConcatV2", "ConcatOffset", "Pack", "Unpack", "Split", "SplitV", "Slice", "StridedSlice", "Tile", "Pad",
    "PadV2", "MirrorPad", "GatherV2", "GatherNd", "ReverseV2", "ReverseSequence", "BroadcastTo",
    "BroadcastArgs", "SpaceToBatchND", "BatchToSpaceND", "DepthToSpace", "SpaceToDepth",
    # images and randomness (preprocessing and dropout layers)
    "ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea", "ImageProjectiveTransformV3",
    "AdjustContrastv2", "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
    "RngReadAndSkip", "RngSkip", "StatelessRandomGetKeyCounter", "StatelessRandomGetKeyCounterAlg",
    "StatelessRandomGetAlg", "StatelessRandomUniformV2", "StatelessRandomUniformIntV2",
    "StatelessRandomUniformFullIntV2", "StatelessRandomNormalV2", "StatelessTruncatedNormalV2",
})
#: The checkpoint ops of the save/restore functions the SavedModel's saver_def names (tf-keras writes
#: them into every SavedModel for TF1 loaders; loading restores variables without them). Allowed only
#: in functions that nothing but the saver calls.
SAVER_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "StringJoin",
                       "StaticRegexFullMatch"})
#: Kept for the TFOpLambda check above: TensorFlow functions whose op is never a tensor op.
UNSAFE_GRAPH_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc", "WriteFile", "ReadFile", "MatchingFiles",
                              "PrintV2", "ImmutableConst"})


def savedmodel_configs(path, source: str) -> list[tuple[str, dict]]:
    """(kind, config) of every object in a SavedModel's keras_metadata.pb: layers, models, metrics."""
    from pathlib import Path

    from tf_keras.protobuf import saved_metadata_pb2

    meta = saved_metadata_pb2.SavedMetadata()
    try:
        meta.ParseFromString(Path(path, "keras_metadata.pb").read_bytes())
        configs = [(node.identifier, parse_config(node.metadata, source)) for node in meta.nodes if node.metadata]
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged metadata is one line
        raise CompressorError(f"cannot read model '{clip(source)}': damaged keras_metadata.pb "
                              f"({type(exc).__name__}); re-save the model with model.save()") from None
    return configs


def check_savedmodel(path, source: str, policy: LoadPolicy = STRICT) -> None:
    """Every saved layer's config, and the stored graphs' ops, before tf-keras revives anything."""
    for kind, cfg in savedmodel_configs(path, source):
        check_config(cfg, source, policy, layers=kind != "_tf_keras_metric")
    if policy.trust_code:
        return
    for graph in _saved_model_proto(path, source).meta_graphs:
        found = _refused_graph_op(graph)
        if found:
            op, where = found
            raise CompressorError(
                f"cannot read model '{clip(source)}': its graph runs op '{clip(op, 24)}' (in {clip(where, 32)}), "
                "which no Keras layer uses (it may reach files or processes); refused: re-save it as .keras, "
                "or pass --trust-model-code if you made it")


def _saved_model_proto(path, source: str):
    """saved_model.pb, or the text form TensorFlow falls back to; a damaged one is one line."""
    from pathlib import Path

    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    binary, text = Path(path, "saved_model.pb"), Path(path, "saved_model.pbtxt")
    try:
        if binary.exists():
            proto.ParseFromString(binary.read_bytes())
        elif text.exists():
            text_format.Parse(text.read_text(), proto)
    except Exception as exc:  # noqa: BLE001
        raise CompressorError(f"cannot read model '{clip(source)}': damaged {binary.name} ({type(exc).__name__}); "
                              "re-save the model with model.save()") from None
    return proto


def _refused_graph_op(graph) -> tuple[str, str] | None:
    """(op, where) of the first op outside KERAS_GRAPH_OPS (SAVER_OPS in saver-only functions), or None."""
    library = {f.signature.name: f for f in graph.graph_def.library.function}
    saver_names = {graph.saver_def.save_tensor_name.split(":")[0], graph.saver_def.restore_op_name.split(":")[0]}
    top = list(graph.graph_def.node)
    saver_reach = _reachable([n for n in top if n.name in saver_names], library)
    roots = [n for n in top if n.name not in saver_names]
    roots += [n for name, f in library.items() if name not in saver_reach for n in f.node_def]
    ordinary = _reachable(roots, library) | set(graph.object_graph_def.concrete_functions)
    for node in top:
        if node.op not in KERAS_GRAPH_OPS and node.op not in library:
            return node.op, "the top-level graph"
    for name in sorted(library):
        allowed = KERAS_GRAPH_OPS | (SAVER_OPS if name in saver_reach and name not in ordinary else frozenset())
        bad = sorted(n.op for n in library[name].node_def if n.op not in allowed and n.op not in library)
        if bad:
            return bad[0], name
    return None


def _reachable(nodes, library: dict) -> set[str]:
    """Names of the library functions the nodes call (by op name or function attribute), transitively."""
    found: set[str] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        for name in _called(node, library):
            if name not in found:
                found.add(name)
                todo.extend(library[name].node_def)
    return found


def _called(node, library: dict) -> set[str]:
    names = {node.op} if node.op in library else set()
    todo = list(node.attr.values())
    while todo:
        value = todo.pop()
        if value.HasField("func"):
            names.add(value.func.name)
            todo.extend(value.func.attr.values())
        for func in value.list.func:
            names.add(func.name)
            todo.extend(func.attr.values())
    return {n for n in names if n in library}


# --------------------------------------------------------------------------- pkg.mod:func names

def user_function(spec: str, what: str, classes: tuple[type, ...] = ()):
    """Import `pkg.mod:func` from the user's code: a plain Python function, or a subclass of `classes`
    (Keras Metric / Loss); builtins, the standard library and other objects are refused in one line."""
    shown = clip(spec, 80)
    why = refused_module(spec)
    if why:
        raise CompressorError(f"recipe {what} '{shown}' {why}; refused: name a function of your own module "
                              "(package.module:function)")
    module_name, _, attr = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import is one line too
        first = clip((str(exc).strip().splitlines() or [type(exc).__name__])[0], 100)
        raise CompressorError(f"cannot import {what} '{shown}' ({type(exc).__name__}: {first}); use "
                              "package.module:function, importable from PYTHONPATH") from None
    if isinstance(found, type) and classes and issubclass(found, classes):
        return found
    home = str(getattr(found, "__module__", "") or "").split(".")[0]
    if not inspect.isfunction(found) or home in sys.stdlib_module_names or home == "builtins":
        kind = type(found).__name__ if not inspect.isfunction(found) else f"function from '{clip(home, 30)}'"
        allowed = " or a " + " / ".join(c.__name__ for c in classes) + " class" if classes else ""
        raise CompressorError(f"recipe {what} '{shown}' is a {clip(kind, 40)}, not a plain Python function{allowed} "
                              "of your own; refused: name a def in your module")
    return found
