"""A point's fine-tune, spent only while the point can still hold the budget.

Most of a search's time is fine-tune epochs, and on deep networks most of those went to points that
could never come back (MobileNetV2: three points cut to 1-8 channels, 2 + 3 epochs each, ending at
0.18-0.28 accuracy for a 0.94 budget). Two measurements decide cheaply: the point's metric right
after the cut (one evaluation) and after its first epoch. When the first epoch's gain, repeated for
every epoch still allowed, cannot close the gap to the budget, the point stops there and counts as
over; learning curves flatten, so this bound only stops points that the remaining epochs could not
save. A point within budget after an epoch stops its fine-tune there: the next point starts from it
and is fine-tuned again.
"""
from __future__ import annotations

from contextlib import nullcontext

from compressor.stages import recovery


def hopeless(task, floor: float, before: float, after: float, epochs_left: int) -> bool:
    """Whether the last epoch's gain (`before` -> `after`), repeated `epochs_left` times, stays short of the budget."""
    short = task.drop(floor, after) - task.budget
    gain = max(0.0, -task.drop(before, after))
    return short > 0 and short > gain * epochs_left


def tune(model, ctx, cfg, task, floor: float, label: str, clock=None) -> tuple[float, int, int, str | None]:
    """Fine-tune a just cut point (up to `cfg.epochs`), then up to `cfg.recover_epochs` more one at a time
    while it is over the budget and improving. Returns (metric, recovery epochs, epochs spent in all, why
    it stopped early or None); `clock` (search.costs.Clock) books the fine-tune and the recovery."""
    def phase(name):
        return clock.phase(name) if clock is not None else nullcontext()

    with phase("fine_tune"):
        value, spent, why, lost = _fine_tune(model, ctx, cfg, task, floor, label)
    if lost:
        return value, 0, spent, why
    with phase("recovery"):
        value, extra, stopped = _recover(model, ctx, cfg.recover_epochs, task, floor, label, value)
    return value, extra, spent + extra, stopped or why


def _fine_tune(model, ctx, cfg, task, floor: float, label: str) -> tuple[float, int, str | None, bool]:
    """`cfg.epochs` one at a time, ending once within budget (the next point is fine-tuned again, from
    this one) or hopeless. Returns (metric, epochs, why it ended early or None, hopeless)."""
    epochs = cfg.epochs
    before = task.keras(model).value if epochs > 1 else None  # the cut alone: one evaluation
    if epochs <= 0:
        return task.keras(model).value, 0, None, False
    spent = 0
    while True:
        recovery.finetune(model, ctx, 1, label)
        spent += 1
        value = task.keras(model).value
        if spent == epochs:
            return value, spent, None, False
        if task.within(floor, value):
            return value, spent, f"within budget after {spent} of {epochs} epoch(s)", False
        if hopeless(task, floor, before, value, epochs - spent + cfg.recover_epochs):
            return value, spent, (f"hopeless after {spent} epoch(s): {value:.4f}, "
                                  f"{value - before:+.4f} in its last epoch"), True
        before = value


def _recover(model, ctx, limit: int, task, floor: float, label: str, value: float) -> tuple[float, int, str | None]:
    """Up to `limit` more epochs, one at a time, while over the budget, improving, and not hopeless."""
    extra = 0
    while extra < limit and not task.within(floor, value):
        recovery.finetune(model, ctx, 1, f"{label} (recovery)")
        extra += 1
        after = task.keras(model).value
        improved = task.drop(value, after) < 0
        if extra < limit and not task.within(floor, after) and improved and hopeless(task, floor, value, after,
                                                                                        limit - extra):
            return after, extra, f"hopeless after {extra} recovery epoch(s): {after:.4f}"
        value = after
        if not improved:
            break
    return value, extra, None
