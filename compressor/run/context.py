"""The run: everything the pipeline's steps read, built once before the first stage.

The task is bound to its data here and never rebound, so the stages' fine-tunes, their budget
checks, the int8 choice at export and the final scores all read the same data through it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compressor.config.recipe import Recipe
from compressor.config.task import Score, Task, resolve
from compressor.core import inputs
from compressor.core._tf import keras
from compressor.data.checks import check_model
from compressor.data.protocol import DataSource
from compressor.data.sources import check_against_model
from compressor.run.progress import Reporter
from compressor.stages.base import StageContext
from compressor.train.training import clone_with_weights


@dataclass
class Run:
    recipe: Recipe
    data: DataSource
    task: Task  # the recipe's loss/metric/budget for this model, bound to `data`
    reporter: Reporter
    model: keras.Model  # the caller's model: never touched
    dense: keras.Model  # its copy, where the stages start and what the report compares with
    baseline: Score  # the dense model on the test split
    budget_baseline: float  # the dense model's metric on the budget split: the budget counts from it
    checkpoint: object | None = None  # compressor.run.checkpoint: every finished stage is saved to it
    points: dict | None = None  # --keep-frontier: the search's other operating points, label -> model

    @classmethod
    def build(cls, model: keras.Model, data: DataSource, recipe: Recipe, reporter: Reporter | None = None,
              checkpoint=None) -> Run:
        """Check the data against the model, bind the task to it and score the dense model."""
        reporter = reporter or Reporter()
        keras.utils.set_random_seed(recipe.seed)
        check_model(model)  # several inputs, zero-width layers, nothing to prune, NaN/Inf weights: one line
        task = resolve(recipe, model)
        check_against_model(data, inputs.shapes(model), task=task)
        for note in getattr(data, "notes", ()):  # what loading the data replaced (an empty x_calib, ...)
            reporter.warn(note)
        task = dataclasses.replace(task, data=data)
        dense = clone_with_weights(model)
        baseline = task.keras(dense, "test")
        reporter.step(f"dense baseline: test {task.name} {baseline.value:.4f}")
        budget_baseline = task.keras(dense).value if data.has_val else baseline.value
        return cls(recipe, data, task, reporter, model, dense, baseline, budget_baseline, checkpoint,
                   {} if recipe.keep_frontier else None)

    def context(self) -> StageContext:
        """What a stage sees of the run."""
        return StageContext(recipe=self.recipe, data=self.data, epoch_progress=self.reporter.epoch_callback,
                            log=self.reporter.step, baseline_metric=self.budget_baseline, task=self.task,
                            dense_model=self.dense, teacher=self.dense)
