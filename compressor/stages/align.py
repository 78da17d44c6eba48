"""Keep widths the runtimes run well after structured removal: block-aligned and rounded.

TFLite's block-sparse encoding (TF 2.21) silently drops the values of a trailing partial block when
a FULLY_CONNECTED input width is not a multiple of the block height: measured on a CNN whose
Flatten gave 3,038 inputs, 12 weights were lost and outputs moved by 1e-3. Structured stages
remove arbitrary numbers of units, so after them each producer that feeds a block-pruned Dense
gives up its few weakest units (smallest incoming-kernel norm) until the consumer's input width
is a multiple of the block height; one epoch of fine-tuning with the zeros held follows.

Widths are also rounded down to a multiple of `round_to` (8 by default, like Torch-Pruning's
`round_to`): onnxruntime's blocked convolution kernels fall off a cliff on odd channel counts
(measured on the MobileNet-style CNN: stem 32 -> 31 channels made onnxruntime 2.3x slower, 24 ran
as fast as 32). Only layers a structured stage already narrowed are rounded.
"""
from __future__ import annotations

import math

import numpy as np

from compressor.graph import surgery
from compressor.core._tf import keras
from compressor.stages import scoring
from compressor.stages.base import StageContext, StageOutcome
from exporters.ship import misaligned_dense  # noqa: F401  (the check export applies; tests use it from here)


def units_needed(model, producer: str, block_height: int, graph) -> int:
    """The multiple the producer's unit count must be so every block-pruned Dense it feeds lines up."""
    need = 1
    tr = scoring.trace(model, producer, graph)
    for consumer in tr.consumers or []:
        layer = model.get_layer(consumer.name)
        if isinstance(layer, keras.layers.Dense) and np.any(layer.kernel.numpy() == 0):
            need = math.lcm(need, block_height // math.gcd(block_height, consumer.outer))
    return need


def apply(model, ctx: StageContext, block_height: int, round_to: int = 1, narrowed: set[str] = frozenset(),
          epochs: int = 1) -> StageOutcome:
    graph = scoring.layer_graph(model)
    plan = {}
    for producer, units in surgery.prunable_layers(model).items():
        need = units_needed(model, producer, block_height, graph) if block_height > 1 else 1
        if producer in narrowed and units >= round_to:
            need = math.lcm(need, round_to)
        extra = units % need
        if extra and units - extra >= 1:
            kernel = scoring.unit_kernel(model.get_layer(producer)).numpy()
            norms = np.sqrt(np.sum(kernel.reshape(-1, kernel.shape[-1]) ** 2, axis=0))
            plan[producer] = sorted(int(i) for i in np.argsort(norms, kind="stable")[:extra])
    if not plan:
        return StageOutcome(model, {"removed": 0})
    aligned, result = scoring.remove(model, plan)
    scoring.finetune(aligned, ctx, epochs, "align: fine-tune")
    removed = {p: len(units) for p, units in plan.items()}
    note = ("align: removed " + ", ".join(f"{n} unit(s) of {p}" for p, n in removed.items())
            + f" so widths are multiples of {round_to} and block-pruned Dense inputs multiples of {block_height}")
    return StageOutcome(aligned, {"removed": sum(removed.values()), "layers": removed}, [note])
