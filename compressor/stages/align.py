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
from dataclasses import dataclass

import numpy as np

from compressor.config.task import context_task
from compressor.core._tf import keras
from compressor.graph import surgery
from compressor.stages import observation, recovery
from compressor.stages.base import StageContext, StageOutcome, stage, structured_names
from exporters.ship import misaligned_dense  # noqa: F401  (the check export applies; tests use it from here)


@dataclass(frozen=True)
class AlignConfig:
    """The pipeline's own step after the structured stages (not a recipe stage): from `config_for`."""

    name: str = "align"
    block_height: int = 1  # Dense inputs of block-pruned consumers become multiples of this
    round_to: int = 1  # narrowed widths become multiples of this, unless that crosses the budget
    narrowed: frozenset = frozenset()  # the producers a structured stage narrowed (only they are rounded)
    epochs: int = 1


def config_for(recipe, dense, model) -> AlignConfig | None:
    """The align step after the recipe's stages, or None when no structured stage ran."""
    names = [s.name for s in recipe.stages]
    if not any(n in structured_names() for n in names):
        return None
    before, now = surgery.prunable_layers(dense), surgery.prunable_layers(model)
    return AlignConfig(block_height=recipe.dense_block()[0] if "weight" in names else 1,
                       round_to=recipe.unit_multiple(),
                       narrowed=frozenset(n for n, units in now.items() if before.get(n, units) != units))


def units_needed(model, producer: str, block_height: int, graph) -> int:
    """The multiple the producer's unit count must be so every block-pruned Dense it feeds lines up."""
    need = 1
    tr = observation.trace(model, producer, graph)
    for consumer in tr.consumers or []:
        layer = model.get_layer(consumer.name)
        if isinstance(layer, keras.layers.Dense) and np.any(layer.kernel.numpy() == 0):
            need = math.lcm(need, block_height // math.gcd(block_height, consumer.outer))
    return need


@stage(AlignConfig, backoff=False)
def apply(model, cfg: AlignConfig, ctx: StageContext, amount: float = 1.0) -> StageOutcome:
    """Round and align; rounding costs a few more units, so when it crosses the budget the step
    aligns blocks only. Block alignment is kept regardless: without it the TFLite file would be
    stored dense. The outcome carries the metric it was checked with."""
    task, baseline = context_task(ctx), ctx.baseline_metric
    for round_to in dict.fromkeys((cfg.round_to, 1)):
        outcome = aligned(model, ctx, cfg.block_height, round_to, cfg.narrowed, cfg.epochs)
        outcome.metric = task.keras(outcome.model).value
        if round_to == 1:
            break
        baseline = baseline if baseline is not None else task.keras(model).value  # outside the pipeline
        if task.within(baseline, outcome.metric):
            break
        if ctx.log is not None:
            ctx.log(f"align: rounding widths to {round_to} crosses the budget; aligning blocks only")
    return outcome


def aligned(model, ctx: StageContext, block_height: int, round_to: int = 1, narrowed=frozenset(),
            epochs: int = 1) -> StageOutcome:
    """One alignment: each producer gives up its weakest units (smallest incoming-kernel norm) until
    its width is a multiple of what its block-pruned consumers and `round_to` need; then fine-tune."""
    graph = observation.layer_graph(model)
    plan = {}
    for producer, units in surgery.prunable_layers(model).items():
        need = units_needed(model, producer, block_height, graph) if block_height > 1 else 1
        if producer in narrowed and units >= round_to:
            need = math.lcm(need, round_to)
        extra = units % need
        if extra and units - extra >= 1:
            kernel = observation.unit_kernel(model.get_layer(producer)).numpy()
            norms = np.sqrt(np.sum(kernel.reshape(-1, kernel.shape[-1]) ** 2, axis=0))
            plan[producer] = sorted(int(i) for i in np.argsort(norms, kind="stable")[:extra])
    if not plan:
        return StageOutcome(model, {"removed": 0})
    narrow, _ = surgery.remove_units(model, plan)
    recovery.finetune(narrow, ctx, epochs, "align: fine-tune")
    removed = {p: len(units) for p, units in plan.items()}
    note = ("align: removed " + ", ".join(f"{n} unit(s) of {p}" for p, n in removed.items())
            + f" so widths are multiples of {round_to} and block-pruned Dense inputs multiples of {block_height}")
    return StageOutcome(narrow, {"removed": sum(removed.values()), "layers": removed}, [note])
