"""The table of layer-family handlers: the one home of what the tool knows about each layer type.

Surgery's graph analysis, the stages' scoring, the weight stage, the load-time support list, the
FLOP counter and the Keras 3 importer all look layer types up here. Matching is by exact type: a
user subclass of Dense may change `call`, so it is unknown rather than trusted.

Adding a family is one `Handler` subclass decorated with `@register` (compressor/layers/base.py):
in a module imported below, or in the user's own module given with `--custom-objects` (the API's
`custom_objects`), for the user's own layer class.
"""
from __future__ import annotations

from compressor.layers import (  # noqa: F401  (they register)
    attention,
    dense_conv,
    depthwise,
    elementwise,
    embedding,
    export_forms,
    hub,
    merge,
    normalization,
    recurrent,
    shape,
    tf_ops,
)
from compressor.layers.base import BY_TYPE as _BY_TYPE
from compressor.layers.base import HANDLERS, Blocked, Cut, Handler, register


def handler_for(layer, exact: bool = True) -> Handler | None:
    """The handler of this layer's exact type (or, with exact=False, of its nearest registered base
    class), or None for a type the tool does not know."""
    if exact:
        return _BY_TYPE.get(type(layer))
    return next((_BY_TYPE[kind] for kind in type(layer).__mro__ if kind in _BY_TYPE), None)


def handler_or_default(layer) -> Handler:
    """The layer's handler, or the defaults for an unknown type (nothing to observe or route through)."""
    return handler_for(layer) or Handler()


def handler_for_type(kind: type) -> Handler | None:
    return _BY_TYPE.get(kind)


def keras3_rebuilder(class_name: str):
    """How the family's handler rebuilds a Keras 3 layer of this class in tf-keras, or None."""
    return next((h.keras3[class_name] for h in HANDLERS.values() if class_name in h.keras3), None)


def supported_class_names() -> frozenset[str]:
    """Class names the pruning stages prune or prune around (registered and not left whole)."""
    return frozenset(kind.__name__ for kind, handler in _BY_TYPE.items() if not handler.left_whole)


def export_form(model):
    """The model as handed to the converters: layers whose tf-keras code computes shapes at run time
    replaced by their handler's static-shape form (export_forms.py says why); `model` itself when
    no layer has one."""

    def form_of(layer, shapes, call_kwargs):
        handler = handler_for(layer)
        return None if handler is None else handler.export_form(layer, shapes, call_kwargs)

    return export_forms.export_model(model, form_of)


__all__ = ["HANDLERS", "Blocked", "Cut", "Handler", "export_form", "handler_for", "handler_for_type",
           "handler_or_default", "keras3_rebuilder", "register", "supported_class_names"]
