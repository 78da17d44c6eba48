"""Weight-magnitude stage: tfmot `prune_low_magnitude` with a block shape the target can execute.

Two silent tfmot traps are handled here: schedules prune only every `frequency` steps (a short fine-tune
can end at 0% with no error), so the update frequency is set
from the real number of steps, and the sparsity reached is asserted; the model is cloned first
because tfmot wraps the layer objects in place.
"""
from __future__ import annotations

import numpy as np
import tensorflow_model_optimization as tfmot

from compressor.config.recipe import WeightStage
from compressor.core._tf import keras
from compressor.core.errors import CompressorError
from compressor.layers import handler_for
from compressor.stages.base import StageContext, StageOutcome, stage
from compressor.stages.observation import unit_kernel
from compressor.train import distribute
from compressor.train.training import clone_with_weights, fit, recalibrate_batchnorm


def _magnitude_prunable(layer) -> bool:
    """The layer table says which kernels tfmot masks (SeparableConv: its pointwise kernel; depthwise
    kernels are left alone: tfmot 0.8.1 wraps them but the mask stays at 0%, measured)."""
    handler = handler_for(layer)
    return handler is not None and handler.magnitude_kernel is not None


def _input_rank(layer) -> int:
    shape = layer.input_shape
    return len(shape[0] if isinstance(shape, list) else shape)


def left_dense(model: keras.Model, cfg: WeightStage) -> dict[str, str]:
    """Prunable kernels the stage leaves without zeros, each with the reason (the report shows it).

    Conv kernels unless the recipe asks for size (`conv_zeros`): their zeros are stored sparse and
    then run dense (a DENSIFY op in LiteRT: XNNPACK's sparse conv path is off on x86 CPUs with AVX;
    onnxruntime has no sparse CPU kernel). Dense layers applied per token (input rank >= 3) unless
    `sequence_zeros`: LiteRT's sparse FULLY_CONNECTED kernel pays only on a single vector per
    example; over a token sequence it runs slower than XNNPACK's dense kernel (measured on the
    encoder), and onnxruntime runs the MatMul dense. Both cost accuracy for size only."""
    reasons = {}
    for layer in model.layers:
        if not _magnitude_prunable(layer):
            continue
        if not isinstance(layer, keras.layers.Dense):
            if not cfg.conv_zeros:
                reasons[layer.name] = "conv kernel: zeros run dense on x86 runtimes (size only; conv_zeros: false)"
        elif _input_rank(layer) >= 3 and not cfg.sequence_zeros:
            reasons[layer.name] = (f"Dense over a token sequence (input rank {_input_rank(layer)}): the sparse "
                                   "kernel is slower than dense there (size only; sequence_zeros: false)")
    return reasons


def _pruned_layers(model: keras.Model, cfg: WeightStage) -> list[str]:
    """Kernels to mask: the prunable ones `left_dense` does not exclude; output heads only on request
    (every output head of a multi-output model is a "last layer")."""
    skipped = left_dense(model, cfg)
    names = [layer.name for layer in model.layers if _magnitude_prunable(layer) and layer.name not in skipped]
    if not cfg.prune_last_layer:
        heads = {model.layers[-1].name} | set(getattr(model, "output_names", []))
        names = [n for n in names if n not in heads]
    return names


def _block_for(layer, dense_block: tuple[int, int]) -> tuple[int, int]:
    """Blocks only on Dense kernels whose input width divides evenly; conv kernels stay unstructured.
    A kernel of one block row or column stays unstructured too: tfmot squeezes its pooled mask to
    rank 1 and fails ("Input tensor must be rank 2"), e.g. Dense after a Bidirectional GRU(8)."""
    rows, cols = (int(d) for d in layer.kernel.shape[-2:]) if isinstance(layer, keras.layers.Dense) else (0, 0)
    if rows % dense_block[0] == 0 and min(rows // dense_block[0], cols // dense_block[1]) > 1:
        return dense_block
    return (1, 1)


def kernel_sparsity(model: keras.Model, names: list[str]) -> dict[str, float]:
    return {n: float(np.mean(unit_kernel(model.get_layer(n)).numpy() == 0)) for n in names}


@stage(WeightStage)
def apply(model: keras.Model, cfg: WeightStage, ctx: StageContext, amount: float = 1.0) -> StageOutcome:
    target = cfg.sparsity * amount
    recipe, data = ctx.recipe, ctx.data
    dense_block = recipe.dense_block()
    names = _pruned_layers(model, cfg)
    skipped = left_dense(model, cfg)
    if not names:
        return StageOutcome(clone_with_weights(model),
                            {"sparsity": 0.0, "block": list(dense_block), "left_dense": skipped},
                            ["weight stage: no Dense/Conv kernels to prune", *_skip_notes(skipped)])
    steps_per_epoch = data.steps_per_epoch(recipe.batch_size)
    total = steps_per_epoch * cfg.epochs
    end_step = max(1, int(total * 0.7))  # ramp up, then train the last 30% at the final mask
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=min(cfg.initial_sparsity, target), final_sparsity=target,
        begin_step=0, end_step=end_step, frequency=max(1, end_step // 20),
    )
    blocks = {}

    def wrap(layer):
        if layer.name in names:
            blocks[layer.name] = _block_for(layer, dense_block)
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule,
                                                            block_size=blocks[layer.name])
        return layer

    with distribute.scope():  # tfmot's wrappers must be built where the strategy mirrors their variables
        base = clone_with_weights(model)  # tfmot wraps the layer objects: never touch the caller's model
        wrapped = keras.models.clone_model(base, clone_function=wrap)
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
    progress = ctx.epoch_progress("weight: fine-tune with masks", cfg.epochs) if ctx.epoch_progress else None
    fit(wrapped, data, epochs=cfg.epochs, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
        callbacks=callbacks, hold_zeros=False, progress=progress, task=ctx.task, label="weight: fine-tune with masks",
        teacher=ctx.teacher, distill_cfg=recipe.distill)
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    pruned = clone_with_weights(stripped)
    recalibrate_batchnorm(pruned, data, recipe.batch_size)
    reached = kernel_sparsity(pruned, names)
    short = {n: s for n, s in reached.items() if s < target - 0.02}
    if short:
        raise CompressorError(
            f"weight stage reached only {short} of the {target:.0%} target; raise weight.epochs or lower batch_size"
        )
    notes = [f"weight: {target:.0%} magnitude sparsity on {len(names)} kernels, "
             f"Dense blocks {tuple(dense_block)} (in, out)"]
    return StageOutcome(pruned, {"sparsity": target, "block": list(dense_block), "layers": reached,
                                 "blocks": {n: list(b) for n, b in blocks.items()}, "left_dense": skipped},
                        notes + _skip_notes(skipped))


def _skip_notes(skipped: dict[str, str]) -> list[str]:
    """One note per reason, naming its layers: the structured stages shrink those layers instead."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    return [f"weight: no zeros in {_listed(names)}: {reason}" for reason, names in by_reason.items()]


def _listed(names: list[str], shown: int = 4) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more (report: per layer)" if more > 0 else "")
