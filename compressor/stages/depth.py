"""Depth stage: remove whole residual blocks, whose branch the identity can replace.

Width pruning leaves every layer in place, and at small inputs a CPU runtime pays per operator, not
per MAC (at 32x32 onnxruntime runs MobileNetV2 alpha 0.1 only 1.2x faster than alpha 0.35). A
residual block computes `Add(skip, branch(skip))`; removing its branch makes the Add's output its
skip input, which takes every operator of the branch away.

A block is removable when the Add has exactly two inputs of the same shape and one of them (the
branch end) reaches back only to the other (the skip) through layers nothing else reads: the
inverted-residual blocks of MobileNetV2/EfficientNet (their squeeze-excite and StochasticDepth or
Dropout included), ResNet identity blocks, and the attention or FFN sub-blocks of a transformer.
Each block is scored alone on calibration data by how far the model's output distribution moves
without it (mean KL divergence; no labels needed); the least important go first, a few per step,
each step fine-tuned and checked against the budget (the recipe's metric). A step over it gets a few more
epochs while they help (`recover_epochs`). A step within it doubles the next one and a step still over it is
undone and retried with half as many blocks, down to one: a deep network (ConvNeXtTiny's 18
blocks) needs a few fine-tunes, not one per pair of blocks.
The rebuild edits the functional config: branch layers and the Add are dropped and every reader of
the Add reads the skip tensor instead, so the smaller model is exact when the branch output is zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressor.config.recipe import DepthStage
from compressor.config.task import context_task
from compressor.core import inputs
from compressor.core._tf import keras
from compressor.graph.flops import layer_macs
from compressor.graph.surgery import ModelGraph, model_graph
from compressor.stages import recovery
from compressor.stages.base import StageContext, StageOutcome, stage
from compressor.train.training import output_is_probability


@dataclass(frozen=True)
class Block:
    """One residual block: the Add, the skip tensor it also reads, and the branch layers (model order)."""

    add: str
    skip: tuple  # (layer name, node index, tensor index), as the Add's config refers to it
    layers: tuple[str, ...]
    skip_index: int  # which of the Add's two inputs is the skip


def residual_blocks(model) -> list[Block]:
    """Every Add whose branch input can be replaced by the identity, in model order."""
    if isinstance(model, keras.Sequential):
        return []
    graph = model_graph(model)
    entries = {c["name"]: c for c in model.get_config()["layers"]}
    rank = {layer.name: i for i, layer in enumerate(graph.order)}
    found = []
    for layer in graph.order:
        sources = graph.inbound[layer.name]
        if type(layer) is not keras.layers.Add or layer.name in graph.shared or len(sources) != 2:
            continue
        shapes = [tuple(s) for s in layer.input_shape]
        if shapes[0] != shapes[1]:
            continue
        for index in (0, 1):
            skip, end = sources[index], sources[1 - index]
            branch = _branch(graph, skip, end, layer.name)
            if branch:
                ref = entries[layer.name]["inbound_nodes"][0][index][:3]
                found.append(Block(layer.name, tuple(ref), tuple(sorted(branch, key=rank.get)), index))
                break
    return found


def _branch(graph: ModelGraph, skip: str, end: str, add: str) -> set[str] | None:
    """Layers between `skip` and `end` (inclusive of end) if they read only from `skip` and each
    other and only the branch and the Add read them; else None."""
    if end == skip:
        return None
    seen, stack, reaches = set(), [end], False
    by_name = {layer.name: layer for layer in graph.order}
    while stack:
        name = stack.pop()
        if name == skip:
            reaches = True
            continue
        if name in seen:
            continue
        layer = by_name.get(name)
        if layer is None or isinstance(layer, keras.layers.InputLayer) or name in graph.shared:
            return None  # reaches a model input other than the skip, or a layer called twice
        seen.add(name)
        stack.extend(graph.inbound[name] + graph.keyword[name])
    if not reaches or any(name in graph.outputs for name in seen):
        return None
    consumers = graph.consumers
    if any(c not in seen and c != add for name in seen for c in consumers[name]):
        return None
    return seen


def without_blocks(model, blocks: list[Block]):
    """A new model without the blocks' branches: each Add's readers read its skip tensor instead."""
    config = model.get_config()
    alias = {b.add: list(b.skip) for b in blocks}
    drop = {b.add for b in blocks} | {name for b in blocks for name in b.layers}

    def resolve(name: str) -> list:
        ref = alias[name]
        while ref[0] in alias:
            ref = alias[ref[0]]
        return list(ref)

    def rewire(obj):
        if isinstance(obj, (list, tuple)):
            if (len(obj) >= 3 and isinstance(obj[0], str) and obj[0] in alias
                    and isinstance(obj[1], int) and isinstance(obj[2], int)):
                return resolve(obj[0]) + [rewire(x) for x in obj[3:]]
            return [rewire(x) for x in obj]
        if isinstance(obj, dict):
            return {k: rewire(v) for k, v in obj.items()}
        return obj

    kinds = {entry["class_name"]: type(model.get_layer(entry["name"])) for entry in config["layers"]}
    config["layers"] = [{**entry, "inbound_nodes": rewire(entry["inbound_nodes"])}
                        for entry in config["layers"] if entry["name"] not in drop]
    config["output_layers"] = rewire(config["output_layers"])
    rebuilt = keras.Model.from_config(config, custom_objects=kinds)
    for layer in rebuilt.layers:
        layer.set_weights(model.get_layer(layer.name).get_weights())
    return rebuilt


def _probabilities(model, x: np.ndarray) -> np.ndarray:
    """Each output as a distribution per sample, outputs side by side (the KL of a multi-output
    model is then the sum of its outputs' KLs)."""
    outs = model.predict(x, batch_size=128, verbose=0)
    outs = outs if isinstance(outs, list) else [outs]
    parts = []
    for out in outs:
        out = out.reshape(len(out), -1).astype(np.float64)
        if len(outs) > 1 or not output_is_probability(model):
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out /= out.sum(axis=1, keepdims=True)
        parts.append(np.clip(out, 1e-7, 1.0))
    return np.concatenate(parts, axis=1)


def _branch_norms(model, blocks: list[Block], x: np.ndarray) -> list[float]:
    """||branch output|| / ||skip|| per block on calibration data (how much the block adds)."""
    ends = [model.get_layer(b.add).input for b in blocks]
    probe = keras.Model(model.inputs, [t for pair in ends for t in pair])
    values = probe.predict(x, batch_size=128, verbose=0)
    norms = []
    for i, block in enumerate(blocks):
        skip, branch = values[2 * i + block.skip_index], values[2 * i + 1 - block.skip_index]
        norms.append(float(np.linalg.norm(branch) / max(np.linalg.norm(skip), 1e-12)))
    return norms


def score_blocks(model, blocks: list[Block], x: np.ndarray) -> list[dict]:
    """Per block: mean KL(full || without this block) on `x`, relative branch norm, MACs, layers."""
    full = _probabilities(model, x)
    macs = layer_macs(model)
    norms = _branch_norms(model, blocks, x)
    rows = []
    for block, norm in zip(blocks, norms):
        reduced = _probabilities(without_blocks(model, [block]), x)
        kl = float(np.mean(np.sum(full * (np.log(full) - np.log(reduced)), axis=1)))
        rows.append({"add": block.add, "layers": list(block.layers), "output_kl": kl, "branch_norm": norm,
                     "macs": int(sum(macs.get(name, 0) for name in block.layers))})
    return rows


@stage(DepthStage)
def apply(model, cfg: DepthStage, ctx: StageContext, amount: float = 1.0) -> StageOutcome:
    blocks = residual_blocks(model)
    if not blocks:
        return StageOutcome(recovery.copy(model), {"removed": 0, "removed_blocks": [], "candidates": []},
                            ["depth: no residual Add whose branch the identity can replace (no identity-skip "
                             "blocks of equal shape); model left as is"])
    x_calib = inputs.rows(ctx.data.calibration(), slice(0, cfg.samples))
    rows = sorted(score_blocks(model, blocks, x_calib), key=lambda r: r["output_kl"])
    limit = int(np.floor(cfg.max_fraction * amount * len(blocks)))
    task = context_task(ctx)
    baseline = ctx.baseline_metric if ctx.baseline_metric is not None else task.keras(model).value
    current, removed, steps = recovery.copy(model), [], []
    step = cfg.step
    while len(removed) < limit and step > 0:
        chunk = rows[len(removed):min(len(removed) + step, limit)]
        by_add = {b.add: b for b in residual_blocks(current)}  # a block's skip may be an Add removed earlier
        trial = without_blocks(current, [by_add[r["add"]] for r in chunk])
        label = f"depth: fine-tune without {len(removed) + len(chunk)} blocks"
        recovery.finetune(trial, ctx, cfg.epochs, label)
        value, extra = recovery.recover(trial, ctx, cfg.recover_epochs, task, baseline, label)
        ok = task.within(baseline, value)
        steps.append({"blocks": [r["add"] for r in chunk], "metric": value, "recovery_epochs": extra,
                      "accuracy": value if task.is_accuracy else None, "within_budget": ok})
        if ok:
            current, removed = trial, removed + chunk
            step = len(chunk) * 2
        else:
            step = len(chunk) // 2  # step back to the last model within budget, then try fewer blocks
    notes = [f"depth: removed {len(removed)} of {len(blocks)} residual blocks "
             f"({', '.join(r['add'] for r in removed) or 'none'}), least output change (KL) first"
             + (f"; the next step ({', '.join(steps[-1]['blocks'])}) crossed the budget and was undone"
                if steps and not steps[-1]["within_budget"] else "")]
    return StageOutcome(current, {"removed": len(removed), "removed_blocks": removed, "candidates": rows,
                                  "steps": steps, "limit": limit}, notes)
