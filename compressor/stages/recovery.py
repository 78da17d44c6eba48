"""Fine-tuning and recovery after a stage removed something: training with the weight stage's
zeros held, and the few extra epochs a model over the budget may get while they help."""
from __future__ import annotations

from compressor.train.training import clone_with_weights, fit


def finetune(model, ctx, epochs: int, label: str, learning_rate: float | None = None):
    """Fine-tune with the weight stage's zeros held (training.fit's HoldZeros), distilled from `ctx.teacher`."""
    if epochs > 0:
        progress = ctx.epoch_progress(label, epochs) if ctx.epoch_progress else None
        fit(model, ctx.data, epochs=epochs, batch_size=ctx.recipe.batch_size,
            learning_rate=learning_rate or ctx.recipe.learning_rate, progress=progress, task=ctx.task, label=label,
            teacher=ctx.teacher, distill_cfg=ctx.recipe.distill)
    return model


def recover(model, ctx, limit: int, task, baseline: float, label: str) -> tuple[float, int]:
    """The metric of a just fine-tuned `model` after up to `limit` more epochs, one at a time, spent
    only while it is over the budget and still improving; and the epochs spent. A model that lost a
    residual block or half its heads often heals with a little more training than its step's own
    fine-tune (the encoder without its second attention block: 0.774 after 2 epochs, 0.805 after 6,
    dense 0.814); a hopeless one stops at the first epoch that does not help."""
    value, extra = task.keras(model).value, 0
    while extra < limit and not task.within(baseline, value):
        finetune(model, ctx, 1, f"{label} (recovery)")
        extra += 1
        after = task.keras(model).value
        improved = task.drop(value, after) < 0
        value = after
        if not improved:
            break
    return value, extra


def copy(model):
    """A working copy: stages never change the model they were given."""
    return clone_with_weights(model)
