"""What every labelled data set offers the rest of the tool: the interface the in-memory `Dataset`
(compressor/data/sources.py) and the streamed `StreamDataset` (compressor/data/streams.py) share.
Stages, fine-tuning and export read data only through these members, so none of them needs the
whole data set in memory or knows which kind it holds."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Iterator, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DataSource(Protocol):
    name: str
    input_shape: tuple | None  # per-sample input shape (a stream knows it once bound to the model); a
    # multi-input model's arrays give {input name: shape}, and every x below is then a dict by input name

    @property
    def has_val(self) -> bool:
        """A validation split exists: budget decisions use it instead of the test split."""

    def bind(self, input_shape: tuple, task) -> None:
        """Fit the data to the model's input and check the labels against its outputs (the task)."""

    def errors(self) -> AbstractContextManager:
        """A context turning the source's read errors into one-line CompressorErrors."""

    def batches(self, split: str, batch_size: int = 256) -> Iterator[tuple]:
        """(x, y) batches of train, test, validation, or budget (validation else test)."""

    def sample(self, split: str, n: int) -> tuple:
        """The first `n` (x, y) samples of a split."""

    def calibration(self) -> np.ndarray:
        """The calibration inputs (activity statistics, int8 calibration)."""

    def labelled_calibration(self) -> tuple:
        """As many labelled training samples as there are calibration samples (gradient criteria)."""

    def fit_args(self, batch_size: int, seed: int = 0) -> dict:
        """Keyword arguments for `model.fit`."""

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def train_inputs(self, batch_size: int, batches: int) -> Iterator[np.ndarray]:
        """Up to `batches` training batches, inputs only (BatchNorm re-estimation)."""

    def sizes(self) -> dict:
        """Sample counts per split, for the report."""


#: The members both data classes implement (a structure test checks them).
MEMBERS = ("name", "input_shape", "has_val", "bind", "errors", "batches", "sample", "calibration",
           "labelled_calibration", "fit_args", "steps_per_epoch", "train_inputs", "sizes")
