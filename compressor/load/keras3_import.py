"""Import a model saved by Keras 3 into tf-keras (Keras 2).

tfmot only prunes tf-keras models, and tf-keras cannot read Keras 3 files. So
we let Keras 3 load its own file, then rebuild the same graph in tf-keras layer by layer from the
live model's config, copy the weights layer by layer, and prove the rebuild on random inputs
before anyone prunes it. What each layer class, `keras.ops` node and activation becomes is looked
up in the tables of `compressor.layers.keras3_layers`; this module is the generic machinery around them.

Keras 3 is imported lazily, as `keras3`, only here: the rest of the project never touches it.
"""
from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import numpy as np

from compressor.core._tf import keras, tf
from compressor.core.errors import CompressorError
from compressor.layers import keras3_rebuilder
from compressor.layers.hub import HUB_LAYERS, HubLayer
from compressor.layers.keras3_layers import (
    ACTIVATIONS,
    HUB_BACKBONES,
    OPS,
    REFUSED,
    ConstantTerm,
    LayerSpec,
    OpSpec,
    hub_class,
    is_op,
    recognised,
    refused,
    same_class,
)
from compressor.load.bounds import clip

#: Max |tf-keras - Keras 3| allowed on the parity check, scaled by max(1, |reference output|).
PARITY_TOL = 1e-4

_MODEL_CLASSES = {"Functional", "Sequential", "Model"}
# tf-keras has these names but the Keras 3 object cannot be carried over faithfully.
_NO_EQUIVALENT = frozenset(REFUSED)
# Keyword arguments every tf-keras Layer accepts through **kwargs (base Layer allow-list).
_BASE_LAYER_KWARGS = {
    "name", "trainable", "dtype", "dynamic", "input_dim", "input_shape", "batch_input_shape",
    "batch_size", "weights", "activity_regularizer", "autocast", "implementation",
}
_QUANTIZED_POLICY = re.compile(r"int8|int4|float8|gptq", re.I)
_NESTED_LAYER_KEYS = {"layer", "backward_layer", "cell"}
# Keras 3 layers that read a padding mask off their input tensors rather than through a `mask` argument.
_IMPLICIT_MASK_READERS = frozenset({"MultiHeadAttention", "Attention", "AdditiveAttention", "GroupQueryAttention"})


def _keras3():
    import keras as keras3  # noqa: PLC0415 - Keras 3 only where its files are read

    return keras3


def precheck_config(config: dict, path: str) -> None:
    """Refuse, before loading anything, files whose layers tf-keras can never rebuild.

    Keras 3 reports an unknown custom class as a generic "could not be deserialized" error, so
    scanning the stored config is the only way to name the layer and its class for the user.
    """
    top = config.get("class_name")
    if top not in _MODEL_CLASSES:
        raise CompressorError(
            f"cannot read model '{clip(path)}': it is a subclassed Keras 3 model (class '{clip(top, 40)}') whose "
            "graph cannot be rebuilt; pass a tf-keras model, or save a Sequential/functional model"
        )
    layers = list(_walk_layer_configs(config.get("config") or {}))
    if not any(each.get("class_name") != "InputLayer" for each in layers):
        raise CompressorError(f"model '{clip(path)}' has no layers; save a trained model with at least one layer")
    for lcfg in layers:
        class_name = lcfg.get("class_name", "?")
        name = (lcfg.get("config") or {}).get("name") or lcfg.get("name") or "?"
        if is_op(lcfg):
            if class_name not in OPS:
                raise CompressorError(
                    f"cannot read model '{clip(path)}': Keras 3 operation '{clip(name, 40)}' (keras.ops "
                    f"{clip(class_name, 40)}) has "
                    "no tf-keras rebuild; express it with Keras layers and re-save, or save the model as tf-keras"
                )
            continue
        if _hub_checked(lcfg, name, path):
            continue
        registered = lcfg.get("registered_name")
        custom = ("module" in lcfg and not str(lcfg.get("module") or "").startswith("keras")) or (
            registered not in (None, class_name)
        )
        known_to_tf_keras = (
            class_name in _MODEL_CLASSES or getattr(keras.layers, class_name, None) is not None or recognised(lcfg)
        )
        if not custom and not known_to_tf_keras and getattr(_keras3().layers, class_name, None) is not None:
            raise CompressorError(
                f"cannot read model '{clip(path)}': Keras 3 layer '{clip(name, 40)}' ({clip(class_name, 40)}) "
                f"has no tf-keras "
                "equivalent; save the model without it, or build and save it with tf-keras"
            )
        if custom or not known_to_tf_keras:
            raise CompressorError(
                f"cannot read model '{clip(path)}': layer '{clip(name, 40)}' has custom class "
                f"'{clip(registered or class_name, 40)}' "
                "that cannot be deserialized into tf-keras; pass a tf-keras model (with the class registered "
                "via keras.saving.register_keras_serializable) or save the model without it"
            )
        if class_name in _NO_EQUIVALENT:
            raise CompressorError(
                f"cannot read model '{clip(path)}': Keras 3 layer '{clip(name, 40)}' ({clip(class_name, 40)}) "
                f"has no tf-keras "
                "equivalent; save the model without it (e.g. built-in layers instead of Lambda) or as tf-keras"
            )
    from compressor.load.safety import check_config  # noqa: PLC0415 - the one safety check for every format

    check_config(config, path, keras3=True)


def _hub_checked(lcfg: dict, name: str, path: str) -> bool:
    """True for a KerasHub class the importer rebuilds; one line naming any other KerasHub class."""
    hub = hub_class(lcfg)
    if hub is None:
        return False
    if hub in HUB_LAYERS or hub in HUB_BACKBONES:
        return True
    known = ", ".join(sorted({*HUB_LAYERS, *HUB_BACKBONES}))
    raise CompressorError(
        f"cannot read model '{clip(path)}': KerasHub layer '{clip(name, 40)}' ({clip(hub, 40)}) has no tf-keras "
        f"rebuild (KerasHub classes rebuilt: {known}); save the model without it, or as tf-keras")


def _uses_hub(config: dict | None) -> bool:
    return bool(config) and any(hub_class(lcfg) for lcfg in _walk_layer_configs(config.get("config") or {}))


def _import_keras_hub(path: str) -> None:
    """Keras 3 deserializes KerasHub classes only once KerasHub registered them (its installed code;
    nothing from the file runs: the precheck allowed only the classes in HUB_LAYERS/HUB_BACKBONES)."""
    try:
        import keras_hub  # noqa: F401, PLC0415 - only for files that name KerasHub classes
    except ImportError:
        raise CompressorError(
            f"model '{clip(path)}' uses KerasHub layers; install KerasHub to import it: pip install 'compressor[hub]' "
            "(or pip install keras-hub)") from None


def _walk_layer_configs(model_cfg: dict):
    for lcfg in model_cfg.get("layers", []) or []:
        if not isinstance(lcfg, dict):
            continue
        yield lcfg
        inner = lcfg.get("config") or {}
        if lcfg.get("class_name") in _MODEL_CLASSES:
            yield from _walk_layer_configs(inner)
        for key in _NESTED_LAYER_KEYS:
            if isinstance(inner.get(key), dict):
                yield from _walk_layer_configs({"layers": [inner[key]]})
        if isinstance(inner.get("cells"), list):
            yield from _walk_layer_configs({"layers": inner["cells"]})


def load_keras3(path: str, kind: str, config: dict | None = None) -> tuple["keras.Model", list[str], Any]:
    """Load a Keras 3 `.keras`/`.h5` file with Keras 3 and return (tf-keras model, notes, k3 model).

    `kind` is the format label used in messages ("Keras 3 .keras"); `config` is the model config
    stored in the file, checked first when given. Raises CompressorError for anything that cannot
    be imported faithfully.
    """
    if config:
        precheck_config(config, path)
    keras3 = _keras3()
    if _uses_hub(config):
        _import_keras_hub(path)
    k3_model = _load_with_keras3(keras3, path, config)
    if not isinstance(k3_model, keras3.Model):
        raise CompressorError(
            f"'{clip(path)}' holds a {type(k3_model).__name__}, not a Keras model; "
            "save a Keras Sequential or functional model"
        )
    notes: list[str] = []
    importer = _Importer(notes)
    try:
        tf_model = importer.rebuild(k3_model)
        importer.copy_weights(k3_model, tf_model)
        diff = check_parity(k3_model, tf_model)
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unforeseen config: still one clear line
        raise CompressorError(
            f"cannot import Keras 3 model '{clip(path)}' into tf-keras: {_first_line(exc)}; "
            "save the model with tf-keras instead"
        ) from None
    version = getattr(keras3, "__version__", "3")
    notes.insert(
        0,
        f"imported from {kind} (Keras {version}): rebuilt {importer.n_layers} layers in tf-keras; "
        f"outputs match Keras 3 on random inputs (max abs diff {diff:.2e})",
    )
    return tf_model, notes, k3_model


def _load_with_keras3(keras3, path: str, config: dict | None):
    """Keras 3's own loader; for .h5 files with keras.ops nodes, which Keras 3 writes but cannot
    read back (its .h5 config drops the ops' module), rebuild from the checked config instead."""
    try:
        with warnings.catch_warnings():  # KerasHub's own layers warn about their masks while Keras 3 rebuilds them
            warnings.filterwarnings("ignore", message=".*does not support masking.*", category=UserWarning)
            return keras3.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one user-facing line
        patched = _ops_marked(config) if config and str(path).lower().endswith((".h5", ".hdf5")) else None
        if patched is None:
            raise _keras3_load_error(path, exc) from None
        try:
            model = keras3.Model.from_config(patched["config"])
            model.load_weights(path)
            return model
        except Exception:  # noqa: BLE001 - report Keras 3's own first error
            raise _keras3_load_error(path, exc) from None


def _ops_marked(config: dict) -> dict | None:
    """A copy of a Keras 3 .h5 model config with its keras.ops nodes labelled as such, or None.

    Layers always store `trainable`; an op node stores only its name and arguments.
    """
    import copy  # noqa: PLC0415 - only for this rare path
    import importlib  # noqa: PLC0415

    modules = [importlib.import_module(m) for m in ("keras.src.ops.numpy", "keras.src.ops.nn")]
    patched = copy.deepcopy(config)
    marked = 0
    for lcfg in _walk_layer_configs(patched.get("config") or {}):
        class_name = lcfg.get("class_name")
        if "module" in lcfg or class_name not in OPS or "trainable" in (lcfg.get("config") or {}):
            continue
        module = next((m for m in modules if isinstance(getattr(m, class_name, None), type)), None)
        if module is not None:
            lcfg.update(module=module.__name__, registered_name=class_name)
            marked += 1
    return patched if marked else None


def _keras3_load_error(path: str, exc: Exception) -> CompressorError:
    msg = _first_line(exc)
    m = re.search(r"(?:Could not locate class|Could not deserialize class|Unknown \w+:?) '?([\w.>]+)'?", msg)
    if m:
        return CompressorError(
            f"cannot read model '{clip(path)}': custom class '{clip(m.group(1), 40)}' cannot be deserialized; "
            "pass a tf-keras model, or register the class "
            "(@keras.saving.register_keras_serializable) and save the model without it"
        )
    if "Lambda" in msg and "safe_mode" in msg:
        return CompressorError(
            f"cannot read model '{clip(path)}': it contains a Lambda layer (arbitrary Python code, "
            "refused for safety); replace the Lambda with built-in layers and re-save"
        )
    return CompressorError(
        f"cannot read model '{clip(path)}' with Keras 3: {clip(msg, 160)}; re-save it with model.save()"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _accepted_kwargs(cls: type) -> set[str]:
    """Every keyword a tf-keras layer class takes: its own __init__ chain plus the base allow-list."""
    names = set(_BASE_LAYER_KWARGS)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names.update(
            p.name for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
    return names


class _Importer:
    """Rebuilds Keras 3 models in tf-keras; collects notes for the user along the way."""

    def __init__(self, notes: list[str]):
        self.notes = notes
        self.n_layers = 0
        # tf-keras layer name -> its weights' source, for layers with no same-named Keras 3 layer
        self.sources: dict[str, Any] = {}
        self.hub_layers: list[tuple[HubLayer, Any]] = []
        self.masks: dict[int, Any] = {}  # id(tf-keras tensor) -> its explicit padding mask

    # ----------------------------------------------------------------- graph
    def rebuild(self, k3_model) -> "keras.Model":
        cls = type(k3_model).__name__
        cfg = k3_model.get_config()
        if cls == "Sequential" or (isinstance(cfg, dict) and "layers" in cfg and "input_layers" not in cfg):
            return self._rebuild_sequential(k3_model, cfg)
        if isinstance(cfg, dict) and "input_layers" in cfg and "layers" in cfg:
            return self._rebuild_functional(k3_model, cfg)
        raise CompressorError(
            f"model '{clip(k3_model.name, 40)}' is a subclassed Keras 3 model ({cls}) whose graph cannot "
            "be read; save a Sequential or functional model instead"
        )

    def _rebuild_sequential(self, k3_model, cfg: dict) -> "keras.Model":
        layers = []
        for lcfg in cfg["layers"]:
            name = lcfg.get("config", {}).get("name") or lcfg.get("name")
            if lcfg["class_name"] == "InputLayer":
                kwargs = self._input_kwargs(lcfg["config"])
                kwargs["batch_input_shape"] = kwargs.pop("batch_shape")
                layers.append(keras.layers.InputLayer(**kwargs))
                continue
            layers.append(self._make_layer(lcfg, self._k3_sublayer(k3_model, name)))
        if any(isinstance(layer, (HubLayer, _Backbone)) for layer in layers):
            return self._chain(k3_model, layers, cfg.get("name"))
        model = keras.Sequential(layers, name=cfg.get("name"))
        if not model.built and cfg.get("build_input_shape"):
            model.build(tuple(cfg["build_input_shape"]))
        return model

    def _chain(self, k3_model, layers: list, name: str | None) -> "keras.Model":
        """A Sequential holding KerasHub layers (not tf-keras layers themselves): a functional chain."""
        if not layers or not isinstance(layers[0], keras.layers.InputLayer):
            raise CompressorError(f"Sequential model '{clip(name, 40)}' with KerasHub layers has no input shape; "
                                  "build it with keras.Input first and re-save")
        inputs = x = layers[0].output
        for layer, k3_layer in zip(layers[1:], k3_model.layers):
            args, kwargs = [x], {}
            mask = self._mask_in(layer, k3_layer, getattr(k3_layer, "name", "?"), args, kwargs)
            x = layer(*args, **kwargs)
            self._mask_out(layer, k3_layer, mask, x)
        return keras.Model(inputs, x, name=name)

    def _rebuild_functional(self, k3_model, cfg: dict) -> "keras.Model":
        inputs, outputs = self.graph(k3_model, cfg)
        return keras.Model(inputs, outputs, name=cfg.get("name"))

    def graph(self, k3_model, cfg: dict, feed: dict | None = None, prefix: str = ""):
        """(inputs, outputs) of the functional graph `cfg`, rebuilt in tf-keras. With `feed` (input
        layer name -> tf-keras tensor) the graph is inlined where those tensors are, its layers named
        `prefix + name` (a KerasHub backbone inside a classifier)."""
        produced: dict[tuple[str, int], list] = {}
        for lcfg in cfg["layers"]:
            name = lcfg.get("name") or lcfg["config"]["name"]
            if lcfg["class_name"] == "InputLayer":
                produced[(name, 0)] = [self._input(lcfg, name, feed)]
                continue
            layer = None if is_op(lcfg) else self._make_layer(lcfg, self._k3_sublayer(k3_model, name), prefix)
            for node_index, node in enumerate(lcfg.get("inbound_nodes", [])):
                args, kwargs = self._node_call(node, produced, name)
                if is_op(lcfg):
                    layer, args, kwargs = self._op_layer(lcfg, prefix + name, args, kwargs)
                mask = self._mask_in(layer, self._k3_sublayer(k3_model, name), name, args, kwargs)
                try:
                    out = layer(*args, **kwargs)
                except CompressorError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise CompressorError(
                        f"cannot rebuild Keras 3 layer '{clip(name, 40)}' ({clip(lcfg['class_name'], 40)}) in "
                        f"tf-keras: {_first_line(exc)}; save the model without it or as tf-keras"
                    ) from None
                produced[(name, node_index)] = tf.nest.flatten(out)
                self._mask_out(layer, self._k3_sublayer(k3_model, name), mask, out)

        def pick(spec):
            if isinstance(spec, dict):
                return {k: pick(v) for k, v in spec.items()}
            if isinstance(spec, (list, tuple)) and len(spec) == 3 and isinstance(spec[0], str):
                return produced[(spec[0], spec[1])][spec[2]]
            return [pick(s) for s in spec]

        return pick(cfg["input_layers"]), pick(cfg["output_layers"])

    def _mask_in(self, layer, k3_layer, name: str, args, kwargs):
        """The explicit padding mask a call reads (KerasHub's mask_zero), handed to the layer the way
        Keras 3 would: a KerasHub rebuild takes it as its input mask, a layer whose call has `mask`
        as that argument; attention outside a KerasHub encoder is refused (it reads masks implicitly)."""
        mask = next((self.masks[id(t)] for t in tf.nest.flatten((args, kwargs)) if id(t) in self.masks), None)
        if mask is None or k3_layer is None:
            return mask
        if isinstance(layer, HubLayer):
            layer.input_mask = mask
        elif "mask" in inspect.signature(k3_layer.call).parameters and "mask" in inspect.signature(
                layer.call).parameters:
            kwargs["mask"] = mask
        elif type(k3_layer).__name__ in _IMPLICIT_MASK_READERS:
            raise CompressorError(
                f"Keras 3 layer '{clip(name, 40)}' ({type(k3_layer).__name__}) reads a KerasHub padding mask "
                "implicitly, which the tf-keras rebuild cannot pass on; use a KerasHub TransformerEncoder, or "
                "pass the mask explicitly (attention_mask=), or save the model as tf-keras")
        return mask

    def _mask_out(self, layer, k3_layer, mask, out) -> None:
        """Where Keras 3 passes the mask on (a masking-aware layer keeping the token axis), so do we."""
        if isinstance(layer, HubLayer):
            mask = layer.output_mask
        elif mask is None or k3_layer is None or not getattr(k3_layer, "supports_masking", False):
            return
        for tensor in tf.nest.flatten(out) if mask is not None else ():
            if len(tensor.shape) >= 3 and tensor.shape[1] == mask.shape[1]:
                self.masks[id(tensor)] = mask

    def _input(self, lcfg: dict, name: str, feed: dict | None):
        if feed is None:
            return keras.Input(**self._input_kwargs(lcfg["config"]))
        if name not in feed:
            raise CompressorError(f"Keras 3 backbone input '{clip(name, 40)}' is not fed by the model; "
                                  "pass every backbone input, or save the model as tf-keras")
        return feed[name]

    def _op_layer(self, lcfg: dict, name: str, args: list, kwargs: dict):
        """A keras.ops node (x + y, x * 0.5, ...) -> (tf-keras layer computing it, args, kwargs)."""
        class_name = lcfg["class_name"]
        spec = OpSpec(name, class_name, dict(lcfg.get("config") or {}), list(args), dict(kwargs))
        handler = OPS.get(class_name)
        if handler is None:
            raise spec.refuse("has no tf-keras rebuild")
        self.n_layers += 1
        layer, call_args = handler(spec)
        return layer, call_args, {}

    def _node_call(self, node, produced, layer_name):
        """Turn a Keras 3 node ({"args", "kwargs"} holding __keras_tensor__ refs) into call args."""
        if isinstance(node, list):  # older nested-list node format: [[layer, node, tensor, kwargs], ...]
            tensors = [produced[(r[0], r[1])][r[2]] for r in node]
            return ([tensors[0] if len(tensors) == 1 else tensors], {})

        def resolve(value):
            if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
                src, idx, t = value["config"]["keras_history"]
                return produced[(src, idx)][t]
            if isinstance(value, dict):
                return {k: resolve(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [resolve(v) for v in value]
            return value

        try:
            args = resolve(node.get("args", []))
            kwargs = {k: v for k, v in resolve(node.get("kwargs", {})).items() if v is not None}
        except KeyError as exc:
            raise CompressorError(
                f"Keras 3 layer '{clip(layer_name, 40)}' reads tensor {clip(exc, 120)} that the graph never "
                "produces; re-save the model with Keras 3"
            ) from None
        return args, kwargs

    @staticmethod
    def _k3_sublayer(k3_model, name):
        try:
            return k3_model.get_layer(name)
        except ValueError:
            return None

    @staticmethod
    def _input_kwargs(cfg: dict) -> dict:
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        kwargs = {"batch_shape": tuple(shape), "name": cfg.get("name"),
                  "dtype": _plain_dtype(cfg.get("dtype"), cfg.get("name"))}
        if cfg.get("sparse"):
            kwargs["sparse"] = True
        if cfg.get("ragged"):
            kwargs["ragged"] = True
        return kwargs

    # ----------------------------------------------------------------- layers
    def _make_layer(self, lcfg: dict, k3_layer, prefix: str = ""):
        class_name = lcfg["class_name"]
        name = prefix + (lcfg.get("config", {}).get("name") or lcfg.get("name"))
        if prefix:
            lcfg = {**lcfg, "config": {**(lcfg.get("config") or {}), "name": name}}
        if k3_layer is not None and prefix:
            self.sources[name] = k3_layer.get_weights
        hub = hub_class(lcfg) or (class_name if class_name in HUB_LAYERS else None)
        if hub is not None:
            return self._hub_layer(hub, name, lcfg, k3_layer)
        if class_name in _MODEL_CLASSES:
            if k3_layer is None:
                raise CompressorError(f"nested Keras 3 model '{clip(name, 40)}' not found; re-save the model")
            return self.rebuild(k3_layer)
        self.n_layers += 1
        return self._layer_from_config(name, class_name, lcfg)

    def _hub_layer(self, hub: str, name: str, lcfg: dict, k3_layer):
        """A KerasHub layer as its tf-keras parts (compressor/layers/hub.py), or a backbone inlined."""
        self.n_layers += 1
        if k3_layer is None:
            raise CompressorError(f"KerasHub layer '{clip(name, 40)}' not found in the loaded model; re-save the model")
        if hub in HUB_BACKBONES:
            return _Backbone(self, k3_layer, name)
        spec = LayerSpec(name, hub, str(lcfg.get("module") or ""), dict(lcfg.get("config") or {}),
                         lambda tf_cls, cfg: self._translate(name, hub, tf_cls, cfg), self.notes)
        rebuild = HUB_LAYERS[hub](spec)
        self.hub_layers.append((rebuild, k3_layer))
        return rebuild

    def _layer_from_config(self, name: str, class_name: str, lcfg: dict):
        """Ask the layer table (compressor/layers) how to rebuild the class; default: same tf-keras class."""
        registered = lcfg.get("registered_name")
        module = str(lcfg.get("module") or "keras.layers")
        from_keras = module == "keras" or module.startswith("keras.")
        library = recognised(lcfg) or (from_keras and getattr(keras.layers, class_name, None) is not None)
        if (registered and registered != class_name) or not library:
            label = registered or class_name
            raise CompressorError(
                f"Keras 3 layer '{clip(name, 40)}' ({label}) has no tf-keras equivalent; save the model "
                "without it, or build and save it with tf-keras"
            )
        spec = LayerSpec(
            name, class_name, module, dict(lcfg.get("config", {})),
            lambda tf_cls, cfg: self._translate(name, class_name, tf_cls, cfg), self.notes,
        )
        if class_name in REFUSED:
            return refused(REFUSED[class_name])(spec)
        return (keras3_rebuilder(class_name) or same_class)(spec)

    def _translate(self, name: str, class_name: str, tf_cls: type, cfg: dict) -> dict:
        """Keras 3 layer config -> tf-keras layer config (same semantics, tf-keras spelling)."""
        accepted = _accepted_kwargs(tf_cls)
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            if key not in accepted:
                if value not in (None, False, {}, [], ()):
                    self.notes.append(
                        f"layer '{name}' ({class_name}): Keras 3 option {key}={value!r} has no tf-keras "
                        "equivalent and was dropped (outputs were verified)"
                    )
                continue
            translated = self._translate_value(name, class_name, key, value)
            if translated is not _DROP:
                out[key] = translated
        return out

    def _translate_value(self, name: str, class_name: str, key: str, value):
        if key == "dtype":
            return _plain_dtype(value, name)
        if key in ("activation", "recurrent_activation"):
            return _activation(value, name, class_name)
        if key.endswith("_initializer"):
            return self._serialized(value, keras.initializers, name, key)
        if key.endswith("_regularizer"):
            return self._serialized(value, keras.regularizers, name, key)
        if key.endswith("_constraint"):
            return self._serialized(value, keras.constraints, name, key)
        if key in _NESTED_LAYER_KEYS and isinstance(value, dict) and "class_name" in value:
            return self._nested_layer(value)
        if key == "cells" and isinstance(value, list):
            return [self._nested_layer(v) for v in value]
        return value

    def _nested_layer(self, value: dict) -> dict:
        """Wrapped layers (Bidirectional, TimeDistributed, RNN cells): rebuilt through the same table."""
        name = value.get("config", {}).get("name", value["class_name"])
        return keras.layers.serialize(self._layer_from_config(name, value["class_name"], value))

    def _serialized(self, value, module, layer_name: str, key: str):
        """Initializers/regularizers/constraints: keep class and the arguments tf-keras knows."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, dict) or "class_name" not in value:
            return value
        cls = getattr(module, value["class_name"], None)
        if cls is None or not isinstance(cls, type):
            self.notes.append(
                f"layer '{layer_name}': {key} {value['class_name']} is unknown to tf-keras; the tf-keras "
                "default is used (weights were copied, so outputs are unaffected)"
            )
            return None if key.endswith(("_regularizer", "_constraint")) else _DROP
        accepted = _accepted_kwargs(cls)
        cfg = {k: v for k, v in (value.get("config") or {}).items() if k in accepted}
        return {"class_name": value["class_name"], "config": cfg}

    # ----------------------------------------------------------------- weights
    def copy_weights(self, k3_model, tf_model) -> None:
        """Copy weights layer by layer (by name), checking every shape."""
        for rebuild, k3_layer in self.hub_layers:
            for part, arrays in rebuild.weights(k3_layer).items():
                self.sources[f"{rebuild.name}.{part}"] = lambda arrays=arrays: arrays
        for tf_layer in tf_model.layers:
            if isinstance(tf_layer, keras.layers.InputLayer):
                continue
            if tf_layer.name in self.sources:
                self._set_weights(tf_layer, self.sources[tf_layer.name](), "?")
                continue
            k3_layer = self._k3_sublayer(k3_model, tf_layer.name)
            if k3_layer is None and (_is_k3_op(k3_model, tf_layer.name) or _tf_op(tf_layer)) and (
                    not tf_layer.weights or isinstance(tf_layer, ConstantTerm)):
                continue  # a keras.ops node rebuilt as a weightless layer, or holding its graph constant
            if k3_layer is None and not tf_layer.weights and self.hub_layers:
                continue  # a weightless part of a KerasHub rebuild (Add, Dropout)
            if k3_layer is None:
                raise CompressorError(
                    f"imported layer '{clip(tf_layer.name, 40)}' has no Keras 3 counterpart; re-save the model"
                )
            if isinstance(tf_layer, keras.Model):
                self.copy_weights(k3_layer, tf_layer)
                continue
            self._set_weights(tf_layer, k3_layer.get_weights(), type(k3_layer).__name__)

    @staticmethod
    def _set_weights(tf_layer, weights, k3_class: str) -> None:
        src = [np.asarray(w) for w in weights]
        shapes_src = [w.shape for w in src]
        shapes_dst = [w.shape for w in tf_layer.get_weights()]
        if shapes_src != shapes_dst:
            raise CompressorError(
                f"Keras 3 layer '{clip(tf_layer.name, 40)}' ({k3_class}) has weights "
                f"{shapes_src} but its tf-keras rebuild expects {shapes_dst}; save the model "
                "without it or as tf-keras"
            )
        if src:
            tf_layer.set_weights(src)


class _Backbone:
    """A KerasHub backbone (a Functional subclass storing only its constructor arguments): its live
    graph, read through a plain functional view of it, is inlined where the classifier calls it."""

    def __init__(self, importer: "_Importer", k3_backbone, name: str):
        self.importer, self.name, self.calls = importer, name, 0
        self.view = _keras3().Model(k3_backbone.input, k3_backbone.output)
        self.cfg = self.view.get_config()

    def __call__(self, inputs, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise CompressorError(f"KerasHub backbone '{clip(self.name, 40)}' is called more than once; "
                                  "save a model that calls it once, or as tf-keras")
        spec = self.cfg["input_layers"]
        if isinstance(spec, dict):
            feed = {spec[key][0]: inputs[key] for key in spec if key in inputs}
        elif len(spec) == 3 and isinstance(spec[0], str):  # one input, stored as one reference
            feed = {spec[0]: tf.nest.flatten(inputs)[0]}
        else:
            feed = {s[0]: t for s, t in zip(spec, tf.nest.flatten(inputs))}
        return self.importer.graph(self.view, self.cfg, feed=feed, prefix=self.name + ".")[1]


def _tf_op(tf_layer) -> bool:
    """A TensorFlow call tf-keras recorded itself (a padding-mask op rebuilt from keras.ops)."""
    return type(tf_layer).__name__ in ("TFOpLambda", "SlicingOpLambda")


def _is_k3_op(k3_model, name: str) -> bool:
    return any(op.name == name for op in getattr(k3_model, "operations", []))


class _Drop:
    """Marker: leave this initializer argument out (tf-keras default)."""


_DROP = _Drop()


def _plain_dtype(value, layer_name) -> str | None:
    """Keras 3 DTypePolicy dicts -> the dtype / policy name string tf-keras takes."""
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("name", "float32")
    if isinstance(value, str) and _QUANTIZED_POLICY.search(value):
        raise CompressorError(
            f"Keras 3 layer '{clip(layer_name, 40)}' is quantized (dtype policy '{clip(value, 40)}'), which tf-keras "
            "cannot import; save the float model before calling quantize()"
        )
    return value


def _activation(value, layer_name: str, class_name: str):
    if isinstance(value, dict):
        module = str(value.get("module", ""))
        inner = value.get("config")
        if module.startswith("keras") and isinstance(inner, str):
            value = inner
        else:
            raise CompressorError(
                f"Keras 3 layer '{clip(layer_name, 40)}' ({clip(class_name, 40)}) uses custom activation "
                f"'{clip(inner or value.get('class_name'), 40)}'; use a built-in activation or save the model "
                f"as tf-keras"
            )
    if value is None:
        return value
    value = ACTIVATIONS.get(value, value)
    try:
        keras.activations.get(value)
    except Exception:  # noqa: BLE001
        raise CompressorError(
            f"Keras 3 layer '{clip(layer_name, 40)}' ({clip(class_name, 40)}) uses activation "
            f"'{clip(value, 40)}', which tf-keras "
            "lacks; use another activation or save the model as tf-keras"
        ) from None
    return value


# --------------------------------------------------------------------- parity


def _random_inputs(k3_model, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = [
        int(layer.input_dim) for layer in _flat_layers(k3_model) if type(layer).__name__ == "Embedding"
    ]
    high = max(1, min(vocab)) if vocab else 2
    batch = []
    for tensor in k3_model.inputs:
        shape = [3 if i == 0 and d is None else (5 if d is None else int(d)) for i, d in enumerate(tensor.shape)]
        dtype = np.dtype(str(getattr(tensor.dtype, "name", tensor.dtype)))
        if np.issubdtype(dtype, np.integer):
            batch.append(rng.integers(0, high, size=shape).astype(dtype))
        elif dtype == np.bool_:
            batch.append(rng.random(shape) > 0.5)
        else:
            batch.append(rng.standard_normal(shape).astype(dtype))
    return batch


def _flat_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers") and layer is not model:
            yield from _flat_layers(layer)


def _as_list(out) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float64) for o in tf.nest.flatten(out)]


def _max_diff(ref, got) -> tuple[float, float]:
    """(max abs diff, allowed) over all outputs; allowed grows with large-magnitude outputs."""
    worst, allowed = 0.0, PARITY_TOL
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            return float("inf"), allowed
        if r.size:
            worst = max(worst, float(np.max(np.abs(r - g))))
            allowed = max(allowed, PARITY_TOL * float(np.max(np.abs(r))))
    return worst, allowed


def check_parity(k3_model, tf_model, seed: int = 0) -> float:
    """Run both models on the same random inputs; raise naming the worst layer if they differ."""
    inputs = _random_inputs(k3_model, seed)
    feed = inputs if len(inputs) > 1 or _takes_list(k3_model) else inputs[0]
    ref = _as_list(k3_model(feed, training=False))
    got = _as_list(tf_model(feed, training=False))
    if len(ref) != len(got):
        raise CompressorError(
            f"imported model has {len(got)} outputs but the Keras 3 model has {len(ref)}; "
            "save the model as tf-keras"
        )
    diff, allowed = _max_diff(ref, got)
    if diff <= allowed:
        return diff
    culprit = _first_diverging_layer(k3_model, tf_model, inputs)
    where = f" first at layer {culprit}" if culprit else ""
    raise CompressorError(
        f"imported model's outputs differ from Keras 3 by {diff:.3g} (> {allowed:.1g}){clip(where, 100)}; "
        "save the model without that layer, or build and save it with tf-keras"
    )


def _takes_list(k3_model) -> bool:
    """A model built as Model([x], y) wants a list even for one input (Keras 3 warns otherwise)."""
    try:
        return isinstance(k3_model.input, (list, tuple))
    except (AttributeError, ValueError):  # a Sequential that was never called
        return False


def _first_diverging_layer(k3_model, tf_model, inputs) -> str | None:
    """Best effort: compare every single-output layer of both models in graph order."""
    keras3 = _keras3()
    for tf_layer in tf_model.layers:
        if isinstance(tf_layer, keras.layers.InputLayer):
            continue
        try:
            k3_layer = k3_model.get_layer(tf_layer.name)
            k3_probe = keras3.Model(k3_model.inputs, k3_layer.output)
            tf_probe = keras.Model(tf_model.inputs, tf_layer.output)
            diff, allowed = _max_diff(
                _as_list(k3_probe(inputs, training=False)), _as_list(tf_probe(inputs, training=False))
            )
        except Exception:  # noqa: BLE001 - shared / nested layers have no single output
            continue
        if diff > allowed:
            return f"'{tf_layer.name}' ({type(tf_layer).__name__}, diff {diff:.3g})"
    return None
