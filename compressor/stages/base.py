"""The uniform stage interface: every stage takes a model and returns a new one plus what it did.

A stage is one function `apply(model, config, context, amount) -> StageOutcome`, registered with
`@stage(ConfigClass)` (the config class is the recipe's, registered in compressor/config/recipe.py,
or a stage's own for the steps the pipeline adds, like align). `amount` in (0, 1] scales how
aggressive the stage is; the pipeline lowers it when the accuracy budget is crossed, so a new
criterion only has to say what "less" means for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from compressor.config.recipe import Recipe, stage_name
from compressor.core.registry import Registry
from compressor.data.protocol import DataSource


@dataclass
class StageContext:
    recipe: Recipe
    data: DataSource
    epoch_progress: Callable[[str, int], object] | None = None  # (label, epochs) -> keras callback or None
    log: Callable[[str], None] | None = None  # progress lines of long stages (the search's steps)
    dense_model: object | None = None  # the model before any stage (a speed goal counts from it)
    baseline_metric: float | None = None  # dense metric on the budget split (goal-driven stages step back by it)
    teacher: object | None = None  # the dense model that every fine-tune distills from (compressor.train.distill)
    task: object = None  # compressor.config.task.Task: loss for fine-tuning, metric and budget (None: top-1 accuracy)


@dataclass
class StageOutcome:
    model: object
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    points: dict = field(default_factory=dict)  # frontier label -> fine-tuned model (written by --keep-frontier)
    metric: float | None = None  # the task's metric of `model` on the budget split, when the stage measured it


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name (the config's), its `apply`, and how the pipeline treats it."""

    name: str
    apply: Callable[..., StageOutcome]
    config: type
    structured: bool = False  # removes whole units: the pipeline aligns the widths after it
    backoff: bool = True  # retried with a smaller amount when it crosses the budget (else kept as it is)


STAGES: Registry[StageSpec] = Registry("stage")


def stage(config: type, *, structured: bool = False, backoff: bool = True):
    """Decorator on a stage's `apply`: registers it under its config class's name."""

    def add(apply: Callable[..., StageOutcome]) -> Callable[..., StageOutcome]:
        STAGES.register(StageSpec(stage_name(config), apply, config, structured, backoff))
        return apply

    return add


def structured_names() -> tuple[str, ...]:
    """The stages after which widths are aligned (from the table, not a list kept by hand)."""
    return tuple(name for name, spec in STAGES.items() if spec.structured)
