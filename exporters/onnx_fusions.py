"""ONNX rewrites of the export forms' layer norm into the standard LayerNormalization operator.

The export form of `LayerNormalization` (compressor/layers/export_forms.py) is written as means
over the last axis so that no shape is computed at run time. tf2onnx turns each mean over the last
axis of a rank-3 tensor into a GlobalAveragePool, and onnxruntime's own layer-norm fusion, which
looks for ReduceMean, then leaves nine nodes per norm (measured: about a third of a 2-block
encoder's node time at d_model 64). ONNX has had a LayerNormalization operator since opset 17;
this pass replaces each such chain by one, reading the same epsilon, gamma and beta.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class _Graph:
    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.producer = {out: node for node in proto.graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in proto.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        inferred = onnx.shape_inference.infer_shapes(proto)
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim)
                      for v in [*inferred.graph.value_info, *inferred.graph.input]}

    def made_by(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_reader(self, name: str):
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    def constant(self, names) -> tuple[str, np.ndarray] | None:
        found = [(n, self.constants[n]) for n in names if n in self.constants]
        return found[0] if len(found) == 1 else None


def _last_axis_mean(graph: _Graph, node) -> str | None:
    """The input of a mean over the last axis (keeping it), or None."""
    if node is None:
        return None
    rank = graph.ranks.get(node.input[0])
    if node.op_type == "GlobalAveragePool":
        return node.input[0] if rank == 3 else None
    if node.op_type != "ReduceMean" or len(node.input) != 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axes = list(attrs.get("axes", []))
    if attrs.get("keepdims", 1) != 1 or rank is None or axes not in ([-1], [rank - 1]):
        return None
    return node.input[0]


def _match(graph: _Graph, div) -> dict | None:
    """The chain mean -> Sub -> Pow 2 -> mean -> Add eps -> Sqrt -> Div [-> Mul gamma] [-> Add beta]."""
    centred, root = div.input
    sub, sqrt = graph.made_by(centred, "Sub"), graph.made_by(root, "Sqrt")
    add_eps = sqrt and graph.made_by(sqrt.input[0], "Add")
    if sub is None or add_eps is None:
        return None
    x = sub.input[0]
    if _last_axis_mean(graph, graph.producer.get(sub.input[1])) != x:
        return None
    eps = graph.constant(add_eps.input)
    variance = graph.producer.get(next((n for n in add_eps.input if n not in graph.constants), ""))
    power = graph.made_by(_last_axis_mean(graph, variance) or "", "Pow")
    exponent = power and graph.constant(power.input[1:])
    if eps is None or eps[1].size != 1 or exponent is None or float(exponent[1]) != 2.0 or power.input[0] != centred:
        return None
    nodes = [graph.producer[sub.input[1]], sub, power, variance, add_eps, sqrt, div]
    if any(len(graph.readers.get(out, [])) != 1 for n in nodes[:-1] for out in n.output if n is not sub):
        return None
    if len(graph.readers.get(centred, [])) != 2:
        return None
    found = {"x": x, "eps": float(eps[1]), "nodes": nodes, "out": div.output[0], "gamma": None, "beta": None}
    for role, op_type in (("gamma", "Mul"), ("beta", "Add")):
        nxt = graph.only_reader(found["out"])
        const = nxt is not None and nxt.op_type == op_type and graph.constant(nxt.input)
        if not const or const[1].ndim != 1:
            continue
        found[role] = const[0]
        found["nodes"].append(nxt)
        found["out"] = nxt.output[0]
    return found


def layer_norms(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every layer-norm chain of the export form as one LayerNormalization node (axis -1)."""
    graph = _Graph(proto)
    matches = [m for m in (_match(graph, n) for n in proto.graph.node if n.op_type == "Div") if m]
    if not matches:
        return proto
    gone = {id(n) for m in matches for n in m["nodes"]}
    first = {id(m["nodes"][0]): m for m in matches}
    nodes = []
    for node in proto.graph.node:
        if id(node) in first:
            m = first[id(node)]
            width = _width(graph, m)
            inputs = [m["x"], m["gamma"] or _add_constant(proto, f"{m['out']}_ones", np.ones(width, np.float32))]
            inputs.append(m["beta"] or _add_constant(proto, f"{m['out']}_zeros", np.zeros(width, np.float32)))
            nodes.append(helper.make_node("LayerNormalization", inputs, [m["out"]], name=f"{m['out']}_layer_norm",
                                          axis=-1, epsilon=m["eps"]))
        elif id(node) not in gone:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return unused_initializers(proto)  # the chains' epsilons and exponents


def _width(graph: _Graph, match: dict) -> int:
    for role in ("gamma", "beta"):
        if match[role]:
            return int(graph.constants[match[role]].size)
    inferred = onnx.shape_inference.infer_shapes(graph.proto)
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        if value.name == match["x"]:
            return int(value.type.tensor_type.shape.dim[-1].dim_value)
    raise ValueError(f"layer norm of '{match['x']}' has no known width")


def _add_constant(proto: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    proto.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def reshape_chains(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Reshape(Reshape(x, a), b) reads x directly: the export forms end a Dense on tokens with a
    reshape back to (batch, tokens, units) and the next Dense starts with one to (batch * tokens,
    units); onnxruntime runs both (each a node with its own dispatch cost). A reshape to a constant
    target without 0 entries depends only on its input's element order, which the first one kept.
    The pair then reads x to x's own shape, which the identity-reshape pass drops."""
    graph = _Graph(proto)
    changed = False
    for node in proto.graph.node:
        first = graph.made_by(node.input[0], "Reshape") if node.op_type == "Reshape" else None
        target = graph.constants.get(node.input[1]) if first is not None and len(node.input) > 1 else None
        if target is None or np.any(target == 0) or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        node.input[0] = first.input[0]
        changed = True
    if not changed:
        return proto
    read = _names_read(proto.graph)
    kept = [node for node in proto.graph.node if node.op_type != "Reshape" or node.output[0] in read]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return proto


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by the graph's nodes, their subgraphs (Loop, If) included, and its outputs."""
    read = {v.name for v in graph.output}
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                read |= _names_read(sub)
    return read


def unused_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop initializers nothing reads (shape targets of the reshapes removed above): onnxruntime
    removes them too, with one warning each on every session it opens."""
    read = _names_read(proto.graph) | {v.name for v in proto.graph.input}
    for init in [i for i in proto.graph.initializer if i.name not in read]:
        proto.graph.initializer.remove(init)
    return proto
