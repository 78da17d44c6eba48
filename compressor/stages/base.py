"""The uniform stage interface: every stage takes a model and returns a new one plus what it did.

A stage is one module with `apply(model, config, context, amount) -> StageOutcome`. `amount` in
(0, 1] scales how aggressive the stage is; the pipeline lowers it when the accuracy budget is
crossed, so a new criterion only has to say what "less" means for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from compressor.data.sources import Dataset
from compressor.config.recipe import Recipe


@dataclass
class StageContext:
    recipe: Recipe
    data: Dataset
    epoch_progress: Callable[[str, int], object] | None = None  # (label, epochs) -> keras callback or None
    log: Callable[[str], None] | None = None  # progress lines of long stages (the search's steps)
    dense_model: object | None = None  # the model before any stage (a speed goal counts from it)
    baseline_accuracy: float | None = None  # dense metric on the budget split (goal-driven stages step back by it)
    teacher: object | None = None  # the dense model that every fine-tune distills from (compressor.train.distill)
    task: object = None  # compressor.config.task.Task: loss for fine-tuning, metric and budget (None: top-1 accuracy)


@dataclass
class StageOutcome:
    model: object
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    points: dict = field(default_factory=dict)  # frontier label -> fine-tuned model (written by --keep-frontier)
